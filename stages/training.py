"""What the training stages share: building or loading the model, text → token ids, checkpoints."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.common import staged_dir, write_json
from stages.config import PipelineConfig

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
# The model names its parameter groups (`DrivingVLA.parameter_groups`); these stay for the callers.
ENCODER_PREFIXES = DrivingVLA.ENCODER_MODULES


def encoder_parameters(model: DrivingVLA) -> list[torch.nn.Parameter]:
    """The encoders' parameters and their contrastive projections (what stage 1 trains)."""
    return model.encoder_parameters()


def model_config(cfg: PipelineConfig) -> DrivingVLAConfig:
    m = cfg.model
    return DrivingVLAConfig.from_size(m.size, image_size=m.image_size, num_cameras=m.num_cameras,
                                      trajectory_length=m.trajectory_length, policy=m.policy,
                                      max_text_length=m.max_text_length,
                                      waypoint_seconds=cfg.data.waypoint_stride / cfg.env.policy_frequency)


def load_or_init(cfg: PipelineConfig, upstream: str | Path | None) -> DrivingVLA:
    """Start from the upstream stage's checkpoint when it exists, else from scratch (stage 1)."""
    if upstream is not None:
        path = Path(upstream)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"upstream checkpoint {path} not found: run the previous stage first")
        model = DrivingVLA.from_pretrained(path)
        want = model_config(cfg)
        if (model.config.image_size, model.config.hidden_dim) != (want.image_size, want.hidden_dim):
            raise ValueError(f"checkpoint {path} was trained with image_size={model.config.image_size}, "
                             f"hidden_dim={model.config.hidden_dim} but the config asks for "
                             f"{want.image_size}/{want.hidden_dim}: rerun the upstream stages with this config")
        return model
    return DrivingVLA(model_config(cfg))


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row.

    Padding is masked inside the model, so the result is the same; the text encoder just does
    less work (commands are ~25 bytes, the token budget is sized for ~200-byte captions).
    """
    used = (tokens != 0).any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return tokens[:, :length]


class TokenCache:
    """Commands and captions repeat a lot: tokenise each distinct string once."""

    def __init__(self, model: DrivingVLA):
        self.model = model
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str], device: str | torch.device = "cpu") -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, ids in zip(missing, self.model.tokenize(missing)):
                self._cache[text] = ids
        return trim_padding(torch.stack([self._cache[t] for t in texts])).to(device)


def save_checkpoint(model: DrivingVLA, out: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the model (and a small JSON of facts about it) atomically into ``out``."""
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        if extra:
            write_json(tmp / "training.json", extra)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_trainer_state(path: str | Path, state: dict[str, Any]) -> None:
    """Resumable state (optimiser, counters, RNG) written atomically next to the outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
