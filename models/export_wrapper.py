"""What a deployment runs: the deterministic policy as one plain tensor-in, tensor-out module.

Every exported artifact (ONNX, TorchScript, ``torch.export``) is made from :class:`DeterministicPolicy`,
so they all share its inputs, outputs and preprocessing. :func:`io_spec` describes them in a form
that needs no torch to read (it goes into the ONNX metadata and the model card).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.driving_vla import DrivingVLA

INPUT_NAMES: tuple[str, ...] = ("image", "state", "tokens")
OUTPUT_NAMES: tuple[str, ...] = ("controls", "trajectory")
CONTROL_NAMES: tuple[str, ...] = ("throttle", "steer", "brake")


class DeterministicPolicy(nn.Module):
    """``forward(image, state, tokens) -> (controls [B, 3], trajectory [B, T, 2])``.

    Inputs (``B`` is dynamic in every export; the rest is fixed by the model's config):

    - ``image``: uint8 ``[B, H, W, 3]`` RGB (``[B, N, H, W, 3]`` with ``N = num_cameras > 1``),
      ``H = W = image_size``. The conversion to float and the ImageNet normalisation happen inside
      (in :class:`~models.driving_vla.VisionEncoder`), so a deployment feeds camera bytes as they are.
    - ``state``: float32 ``[B, state_dim]`` ego state in the order of the environment's
      ``STATE_FIELDS`` (speed, lateral offset, heading error, last controls, ...). Other float
      dtypes are cast to the model's dtype.
    - ``tokens``: int64 ``[B, max_text_length]`` ids of the command from
      :class:`~models.tokenizer.ByteTokenizer` (0 pad, 1 bos, 2 eos, byte ``b`` -> ``b + 3``,
      right-padded to ``max_text_length``). The attention mask is derived from ``tokens != 0``.

    Outputs:

    - ``controls``: float32 ``[B, 3]`` = ``model.distribution(params).mode()``: throttle in [0, 1],
      steer in [-1, 1], brake in [0, 1].
    - ``trajectory``: float32 ``[B, T, 2]`` waypoints in metres, ego frame (x forward, y left).

    NOT included, so a deployment has to do it (or does not need it):

    - **text tokenisation**: the command comes in as ids. The tokenizer is a few lines of byte
      arithmetic (``flows/predict_cli.py`` has a numpy version); commands are few and can be
      tokenised once.
    - **image resizing / cropping / colour conversion**: the camera image must already be
      ``image_size`` square RGB uint8.
    - **sampling**: the output is the mode of the policy, with no exploration noise, so the exported
      graph holds no random numbers and the same input always gives the same controls.
    - **the value head, log-probabilities, the contrastive (CLIP) embeddings**: training-only.
    - **safety logic**: no clamping to vehicle limits, no smoothing over time, no fallback on
      stale inputs; a vehicle stack must add these.

    Call ``.eval()`` before exporting so that dropout is off.
    """

    def __init__(self, model: DrivingVLA) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, state: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.compute_features(image, state, tokens)
        controls = self.model.distribution(self.model.policy_params(features)).mode()
        return controls, self.model.predict_trajectory(features, state)


def image_shape(model: DrivingVLA, batch: int | str = "batch") -> list[int | str]:
    """The ``image`` input's shape, ``batch`` standing for the (dynamic) first dimension."""
    c = model.config
    if c.num_cameras == 1:
        return [batch, c.image_size, c.image_size, 3]
    return [batch, c.num_cameras, c.image_size, c.image_size, 3]


def io_spec(model: DrivingVLA) -> dict[str, Any]:
    """Names, dtypes and shapes of the inputs and outputs (``"batch"`` marks the dynamic axis)."""
    c = model.config
    return {
        "inputs": [
            {"name": "image", "dtype": "uint8", "shape": image_shape(model)},
            {"name": "state", "dtype": "float32", "shape": ["batch", c.state_dim]},
            {"name": "tokens", "dtype": "int64", "shape": ["batch", c.max_text_length]},
        ],
        "outputs": [
            {"name": "controls", "dtype": "float32", "shape": ["batch", c.action_dim],
             "fields": list(CONTROL_NAMES)},
            {"name": "trajectory", "dtype": "float32", "shape": ["batch", c.trajectory_length, 2]},
        ],
    }


DEFAULT_COMMANDS = ("follow the lane", "turn left at the next intersection", "change to the right lane")


def random_inputs(model: DrivingVLA, batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh example inputs of the right dtypes and shapes: random pixels and states, real commands."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, image_shape(model, batch), dtype=torch.uint8, generator=g)
    state = torch.randn(batch, model.config.state_dim, generator=g)
    tokens = model.tokenizer.encode([DEFAULT_COMMANDS[i % len(DEFAULT_COMMANDS)] for i in range(batch)])
    return image, state, tokens
