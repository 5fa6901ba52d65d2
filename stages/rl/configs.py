"""Hyper-parameters of the online RL algorithms (names as in the seed document)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.config_model import StrictModel


class PPOConfig(StrictModel):
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
    # Off by default (as in SB3): the clip range is in the value's own units, so with driving returns
    # in the hundreds a ±clip_epsilon step per update leaves the critic stuck near its start.
    clip_value: bool = False
    max_grad_norm: float = Field(0.5, gt=0)
    target_kl: float | None = Field(None, gt=0)
    normalize_advantages: bool = True
    anneal_lr: bool = False
    value_warmup_steps: int = Field(
        0, ge=0, description="env steps at the start whose updates train only the value head: a policy taken "
                             "from imitation comes with a value head that does not know the online "
                             "reward, and advantages from it would only add noise to the policy")
    freeze_encoders: bool = Field(False, description="train only fusion and heads, not the vision/text encoders")
    critic_fusion: bool = Field(
        False, description="give the value head a fusion transformer of its own, copied from the policy's "
                           "(DrivingVLA.add_critic_fusion), so the critic warm-up can fit it without moving the policy")
    compile: bool | None = Field(None, description="torch.compile the update's forward and backward; None: on "
                                                   "for CUDA, off on CPU")
    init_log_std: float | None = Field(
        None, ge=-5, le=2, description="set the policy's log-std to this (for every state) before fine-tuning; "
                                       "None: keep the checkpoint's spread")
    async_collection: bool = Field(
        False, description="env workers keep stepping with the previous policy while the learner updates "
                           "(needs env constructors; see stages.rl.async_collector)")
    async_slots: int = Field(2, ge=2, le=8, description="rollout buffers in flight with async_collection")
    learner_threads: int | None = Field(
        None, ge=1, description="torch threads of the update; None: torch's default, or one core less "
                                "with async_collection (the collector's inference has the other one)")
    collector_device: Literal["auto", "learner", "cpu"] = Field(
        "auto", description="where async_collection's behaviour policy infers: 'learner' = on the learner's "
                            "device, in a thread of the learner's process (weights copied device to device); "
                            "'cpu' = a collector process with a CPU copy; 'auto' = 'learner' when the learner "
                            "is on CUDA, else 'cpu'")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the network's precision in the update and the behaviour policy (bf16 autocast; "
                            "the distribution, ratio and losses stay fp32); 'auto' = bf16 on CUDA, fp32 on CPU")
    cuda_graphs: bool = Field(True, description="replay the behaviour policy's forward as CUDA graphs (per "
                                                "power-of-two batch) when it infers on a GPU")
    start_method: Literal["spawn", "forkserver", "fork"] | None = Field(
        None, description="multiprocessing start method of env workers; None: the platform default "
                          "(async_collection always uses spawn or forkserver, never fork)")

    @model_validator(mode="after")
    def _rollout_divides(self) -> "PPOConfig":
        if self.num_steps % self.num_envs:
            raise ValueError(f"num_steps ({self.num_steps}) must be a multiple of num_envs ({self.num_envs})")
        if self.batch_size > self.num_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed num_steps ({self.num_steps})")
        return self


class SACConfig(StrictModel):
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
    target_entropy: float | None = Field(None, description="entropy alpha is tuned toward, measured with the "
                                         "actions scaled to [-1, 1]; None = -action_dim (SB3's choice)")
    random_warmup: bool = Field(True, description="uniform random actions before learning_starts (SB3); "
                                "False acts with the policy, the better start from a trained checkpoint")
    train_trunk: bool = Field(True, description="the critic's TD loss trains the shared feature trunk "
                              "(the encoders too unless freeze_encoders); False trains the heads only")
    q_hidden_dim: int = Field(256, ge=1, description="width of the twin Q heads' two hidden layers")
    actor_warmup_updates: int = Field(
        0, ge=0, description="first updates that train only the critics (and trunk): fine-tuning a trained "
                             "actor against fresh Q heads would follow their noise and wreck the actor")
    max_grad_norm: float | None = Field(None, gt=0, description="clip each loss's gradient norm; None = no clipping")
