"""What SAC's replay buffer stores of an observation, chosen from the settings (the updates compute
the same thing whichever it is):

- ``train_trunk=False``: nothing before the heads trains, so the fused features of an observation
  never change: the buffer stores them (``hidden_dim`` floats, `FeatureAdapter`) and an update runs
  the heads only;
- ``freeze_encoders``: the vision and text encoders' outputs never change: the buffer stores them
  (`stages.rl.policies.EncodedDrivingAdapter`) and an update runs the state encoder, the fusion
  and the heads, when they take no more memory than the image (the tiny model at 64 px: 4.4 KB
  against 12 KB; ViT-B at 224 px: 154 KB against 151 KB, so there the image is kept);
- otherwise the raw observation (uint8 image, state, command tokens).

Features are computed once, in eval mode (dropout, if the model has any, is not applied to them).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import gymnasium as gym
import numpy as np
import torch

from stages.rl.policies import BoxObsAdapter, EncodedDrivingAdapter, ObsAdapter, make_obs_adapter
from stages.rl.replay import SHARED_FIELDS

log = logging.getLogger(__name__)

__all__ = ["FeatureAdapter", "Storage", "add_offline_samples", "choose_storage", "mode_matters"]


class FeatureAdapter(ObsAdapter):
    """Stores the model's fused features of an observation (for a trunk that does not train)."""

    def __init__(self, inner: ObsAdapter, compute_features: Callable[..., torch.Tensor], feature_dim: int,
                 device: torch.device) -> None:
        self.inner = inner
        self.compute_features = compute_features
        self.feature_dim = int(feature_dim)
        self.device = device

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"features": ((self.feature_dim,), np.dtype(np.float32))}

    @torch.no_grad()
    def encode(self, obs: Any) -> dict[str, np.ndarray]:
        inputs = self.inner.to_inputs(obs, self.device)
        return {"features": self.compute_features(*inputs).float().cpu().numpy()}

    def stack(self, observations: Sequence[Any]) -> Any:
        return self.inner.stack(observations)

    def model_inputs(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (fields["features"],)


class Storage(NamedTuple):
    adapter: ObsAdapter                                 # turns observations into the stored fields
    kind: str                                           # "raw", "encoded" or "features"
    compute_features: Callable[..., torch.Tensor]       # stored fields -> the trunk's features


def choose_storage(model: torch.nn.Module, obs_space: gym.Space, feature_dim: int, freeze_encoders: bool,
                   trains_trunk: bool, device: torch.device) -> Storage:
    """What the replay buffer stores for ``model`` under these settings (see the module docstring)."""
    raw = make_obs_adapter(model, obs_space)
    if isinstance(raw, BoxObsAdapter):
        return Storage(raw, "raw", model.compute_features)
    encoded = make_obs_adapter(model, obs_space, encoded=True) if freeze_encoders or not trains_trunk else None
    if not isinstance(encoded, EncodedDrivingAdapter):
        encoded = None
    if not trains_trunk:
        inner, compute = (encoded, encoded.policy(model).compute_features) if encoded is not None \
            else (raw, model.compute_features)
        log.info("sac: the trunk does not train: the replay buffer stores the fused features")
        return Storage(FeatureAdapter(inner, compute, feature_dim, device), "features", lambda f: f.float())
    if encoded is not None:
        if _nbytes(encoded.fields()) <= _nbytes(raw.fields()):
            log.info("sac: frozen encoders: the replay buffer stores their outputs (%d bytes an observation)",
                     _nbytes(encoded.fields()))
            return Storage(encoded, "encoded", encoded.policy(model).compute_features)
        log.info("sac: frozen encoders, but their outputs (%d bytes) outweigh the raw observation (%d): "
                 "storing the observation", _nbytes(encoded.fields()), _nbytes(raw.fields()))
    return Storage(raw, "raw", model.compute_features)


def add_offline_samples(buffer: Any, data: Any, kind: str, model: torch.nn.Module,
                        encode: Callable[[Any], dict[str, np.ndarray]]) -> None:
    """A recorded dataset into ``buffer``'s offline partition, stored as ``kind`` says (the model
    in eval mode, where the stored fields are computed)."""
    if kind == "raw" and "tokens" in buffer.fields:
        buffer.add_offline_samples(data, lambda texts: model.tokenize(texts).cpu())
    elif kind == "raw":
        buffer.add_offline_samples(data)
    else:
        buffer.add_offline_samples(data, encode=encode)


def mode_matters(model: torch.nn.Module) -> bool:
    """Whether ``model`` computes differently in training mode (dropout, batch statistics)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return True
        p = m.p if isinstance(m, torch.nn.Dropout) else getattr(m, "dropout", 0.0)
        if isinstance(p, float) and p > 0:
            return True
    return False


def _nbytes(fields: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Replay bytes of one observation (a shared field costs one 4-byte index)."""
    return sum(4 if name in SHARED_FIELDS else int(np.prod(shape)) * np.dtype(dtype).itemsize
               for name, (shape, dtype) in fields.items())
