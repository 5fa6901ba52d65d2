"""Configuration of the DrivingVLA model.

The defaults are the ``base`` size so that ``DrivingVLAConfig(num_cameras=1, image_size=224)``
(the form used in the seed documents) builds the GPU model; ``from_size`` picks a preset.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Presets: the architecture sizes that change between sizes. Everything else keeps its default.
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: a forward pass takes milliseconds.
    "tiny": dict(
        image_size=64, patch_size=8, hidden_dim=64, vision_layers=2, text_layers=1,
        fusion_layers=1, num_heads=4, embed_dim=64,
    ),
    # CPU smoke runs of the whole pipeline.
    "small": dict(
        image_size=96, patch_size=8, hidden_dim=128, vision_layers=4, text_layers=2,
        fusion_layers=2, num_heads=4, embed_dim=128,
    ),
    # GPU training: a ViT-B/16 vision tower.
    "base": dict(
        image_size=224, patch_size=16, hidden_dim=768, vision_layers=12, text_layers=6,
        fusion_layers=4, num_heads=12, embed_dim=512,
    ),
}


class DrivingVLAConfig(BaseModel):
    """Hyper-parameters of :class:`models.driving_vla.DrivingVLA` (serialised as ``config.json``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_cameras: int = Field(1, ge=1, description="cameras per observation, sharing one vision tower")
    image_size: int = Field(224, ge=1, description="square input resolution in pixels")
    action_dim: int = Field(3, description="throttle, steer, brake; must be 3")
    trajectory_length: int = Field(10, ge=1, description="number of predicted (x, y) waypoints")
    waypoint_seconds: float = Field(0.3, gt=0, description="time between consecutive waypoints, s")
    trajectory_prior: Literal["none", "constant_velocity"] = Field(
        "constant_velocity", description="constant_velocity: the head predicts corrections to driving on "
                                         "straight at the current speed (state[0]), which it sees directly")
    state_dim: int = Field(8, ge=1, description="length of the ego-state vector")
    state_skip: bool = Field(False, description="add a linear map of the normalised ego state to the fused "
                                                "features, so every head reads the state directly")
    ignored_state: list[int] = Field(default_factory=list, description="indices of state entries the model "
                                                                        "reads as zero (e.g. the last action)")
    patch_size: int = Field(16, ge=1, description="side of a square ViT patch in pixels")
    hidden_dim: int = Field(768, ge=1, description="width of every transformer")
    vision_layers: int = Field(12, ge=1)
    text_layers: int = Field(6, ge=1)
    fusion_layers: int = Field(4, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0, description="MLP width as a multiple of hidden_dim")
    max_text_length: int = Field(48, ge=2, description="token budget incl. bos and eos")
    embed_dim: int = Field(512, ge=1, description="contrastive (CLIP-style) embedding size")
    policy: Literal["squashed_gaussian", "beta"] = "squashed_gaussian"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    critic_fusion: bool = Field(False, description="the value head reads a fusion transformer of its own, so "
                                                   "fitting the critic does not move the policy")

    @model_validator(mode="after")
    def _check_consistency(self) -> DrivingVLAConfig:
        # Each message starts with the offending field so errors read like field errors.
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if any(not 0 <= i < self.state_dim for i in self.ignored_state):
            raise ValueError(f"ignored_state ({self.ignored_state}) must hold indices below state_dim ({self.state_dim})")
        if self.action_dim != 3:
            raise ValueError(
                f"action_dim ({self.action_dim}) must be 3: the action is [throttle, steer, brake]"
            )
        return self

    @property
    def grid_size(self) -> int:
        """Patches along one side of an image."""
        return self.image_size // self.patch_size

    @classmethod
    def from_size(cls, name: str, **overrides: Any) -> DrivingVLAConfig:
        """Build the ``tiny`` / ``small`` / ``base`` preset, then apply ``overrides``."""
        if name not in SIZE_PRESETS:
            raise ValueError(f"unknown model size {name!r}; expected one of {sorted(SIZE_PRESETS)}")
        return cls(**{**SIZE_PRESETS[name], **overrides})
