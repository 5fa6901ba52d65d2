"""What a deployment runs: the deterministic policy as a plain tensor-in, tensor-out module."""

from __future__ import annotations

from torch import Tensor, nn

from models.driving_vla import DrivingVLA


class DeterministicPolicy(nn.Module):
    """``forward(image uint8, state float32, tokens int64) -> (controls [B, 3], trajectory [B, T, 2])``.

    ``controls`` is ``model.distribution(params).mode()`` (throttle, steer, brake inside
    ``ACTION_LOW .. ACTION_HIGH``); ``trajectory`` is the model's waypoint prediction in metres,
    ego frame (x forward, y left). Images are normalised inside, as in :class:`DrivingVLA`.

    Not included: text tokenisation (``tokens`` come in as ids, e.g. from ``ByteTokenizer.encode``;
    the command set is small and can be tokenised once by the caller), sampling (no exploration
    noise, so no randomness in the exported graph), and the value head (only needed for training).
    Call ``.eval()`` before exporting so dropout is off.
    """

    def __init__(self, model: DrivingVLA) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, state: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.compute_features(image, state, tokens)
        controls = self.model.distribution(self.model.policy_params(features)).mode()
        return controls, self.model.predict_trajectory(features)
