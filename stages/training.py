"""What the training stages share: building or loading the model, text → token ids, the model checkpoint.

Resumable state (optimiser, counters, RNG) lives in `stages.checkpoint`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models import DrivingVLA, DrivingVLAConfig
from models.driving_vla import CheckpointFileError
from stages.common import StageInputError, staged_dir, write_json
from stages.config import PipelineConfig
from stages.envs.spaces import STATE_FIELDS

log = logging.getLogger(__name__)

def model_config(cfg: PipelineConfig) -> DrivingVLAConfig:
    m = cfg.model
    return DrivingVLAConfig.from_size(m.size, image_size=m.image_size, num_cameras=m.num_cameras,
                                      trajectory_length=m.trajectory_length, policy=m.policy,
                                      max_text_length=m.max_text_length,
                                      state_skip=m.state_skip, ignored_state=[STATE_FIELDS.index(f) for f in m.ignore_state],
                                      waypoint_seconds=cfg.data.waypoint_stride / cfg.env.policy_frequency)


def load_or_init(cfg: PipelineConfig, upstream: str | Path | None) -> DrivingVLA:
    """Start from the upstream stage's checkpoint when it exists, else from scratch (stage 1)."""
    if upstream is not None:
        path = Path(upstream)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"upstream checkpoint {path} not found: run the previous stage first")
        try:
            model = DrivingVLA.from_pretrained(path)
        except CheckpointFileError as exc:
            raise StageInputError(str(exc)) from exc
        want = model_config(cfg)
        if (model.config.image_size, model.config.hidden_dim) != (want.image_size, want.hidden_dim):
            raise StageInputError(f"checkpoint {path} was trained with image_size={model.config.image_size}, "
                             f"hidden_dim={model.config.hidden_dim} but the config asks for "
                             f"{want.image_size}/{want.hidden_dim}: rerun the upstream stages with this config")
        # Which state inputs the policy reads is this stage's choice (pretraining reads no state).
        model.ignore_state(want.ignored_state)
        if want.state_skip:
            model.add_state_skip()
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


def save_checkpoint(model: DrivingVLA, out: str | Path, extra: dict[str, Any] | None = None,
                    state_dicts: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write the model (a small JSON of facts about it, and ``state_dicts``: file name -> tensors, e.g.
    a critic's) into ``out``, all of it or nothing."""
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        if extra:
            write_json(tmp / "training.json", extra)
        for name, tensors in (state_dicts or {}).items():
            torch.save(tensors, tmp / name)
