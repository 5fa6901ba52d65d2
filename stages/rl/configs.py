"""Hyper-parameters of the online RL algorithms (names as in the seed document)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PPOConfig(_Strict):
    """PPO settings. The first seven fields are the seed's; defaults follow cleanrl/SB3."""

    learning_rate: float = Field(3e-4, gt=0, le=1)
    gamma: float = Field(0.99, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_epsilon: float = Field(0.2, gt=0, lt=1)
    num_epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="minibatch size of each gradient step")
    num_steps: int = Field(2048, ge=1, description="env steps per rollout, summed over all envs")
    num_envs: int = Field(1, ge=1)
    entropy_coef: float = Field(0.0, ge=0)
    value_coef: float = Field(0.5, ge=0)
    clip_value: bool = True
    max_grad_norm: float = Field(0.5, gt=0)
    target_kl: float | None = Field(None, gt=0)
    normalize_advantages: bool = True
    anneal_lr: bool = False
    freeze_encoders: bool = False

    @model_validator(mode="after")
    def _rollout_divides(self) -> "PPOConfig":
        if self.num_steps % self.num_envs:
            raise ValueError(f"num_steps ({self.num_steps}) must be a multiple of num_envs ({self.num_envs})")
        if self.batch_size > self.num_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed num_steps ({self.num_steps})")
        return self


class SACConfig(_Strict):
    """SAC settings. The first six fields are the seed's."""

    learning_rate: float = Field(3e-4, gt=0, le=1)
    gamma: float = Field(0.99, ge=0, le=1)
    tau: float = Field(0.005, gt=0, le=1)
    alpha: float = Field(0.2, ge=0)
    batch_size: int = Field(256, ge=1)
    buffer_size: int = Field(1_000_000, ge=1)
    autotune_alpha: bool = True
    learning_starts: int = Field(1000, ge=0)
    utd_ratio: float = Field(1.0, gt=0, description="gradient updates per env step")
    num_envs: int = Field(1, ge=1)
    offline_ratio: float = Field(0.0, ge=0, le=1, description="share of each batch drawn from offline data")
    freeze_encoders: bool = False
