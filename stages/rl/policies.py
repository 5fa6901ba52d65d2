"""Policies the RL trainers drive, and the adapters that turn env observations into their inputs.

The trainers (`stages.rl.ppo.PPOTrainer`, `stages.rl.sac.SACTrainer`) talk to a model through one
interface, the one `models.DrivingVLA` has:

- ``forward(*inputs)`` → an object with ``action_params`` and ``value`` (``[B]``);
- ``act(*inputs, deterministic=False)`` → ``(action [B, A], log_prob [B], value [B])``;
- ``evaluate_actions(*inputs, actions)`` → ``(log_prob [B], entropy [B], value [B])``;
- ``compute_features(*inputs)``, ``policy_params(features)``, ``distribution(params)``.

What ``inputs`` are depends on the observation: ``(image, state, tokens)`` for the driving envs'
dict observation, ``(obs,)`` for a flat ``Box`` observation (gymnasium's continuous-control tasks).
An :class:`ObsAdapter` owns that difference, so the trainer code is the same for both:

- :meth:`ObsAdapter.fields` names the arrays a rollout or replay buffer stores per step;
- :meth:`ObsAdapter.encode` turns a batch of vector-env observations into those arrays (numpy);
- :meth:`ObsAdapter.model_inputs` turns a batch of stored arrays (tensors) into the model's inputs.

:class:`MLPActorCritic` is the small actor-critic for ``Box`` observations: the same PPO code that
fine-tunes DrivingVLA is checked on Pendulum with it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from models.distributions import LOG_STD_MAX, LOG_STD_MIN, SquashedGaussian

FieldSpec = dict[str, tuple[tuple[int, ...], np.dtype]]

__all__ = ["ObsAdapter", "DrivingObsAdapter", "EncodedDrivingAdapter", "EncodedDrivingPolicy", "BoxObsAdapter", "MixedPrecisionPolicy", "make_obs_adapter", "MLPActorCritic",
           "ActorCriticOutput", "mlp"]


# ---------------------------------------------------------------------------------------------
# observation adapters


class ObsAdapter(ABC):
    """Observations of one env kind ↔ buffer arrays ↔ model inputs."""

    @abstractmethod
    def fields(self) -> FieldSpec:
        """``{name: (per-step shape, dtype)}`` of what a buffer stores for one observation."""

    @abstractmethod
    def encode(self, obs: Any) -> dict[str, np.ndarray]:
        """A batched observation (``num_envs`` leading) as the arrays of :meth:`fields`."""

    @abstractmethod
    def stack(self, observations: Sequence[Any]) -> Any:
        """Single envs' observations (e.g. ``info["final_obs"][i]``) as one batched observation."""

    def batch_one(self, obs: Any) -> Any:
        """One env's observation as a batch of one."""
        return self.stack([obs])

    @abstractmethod
    def model_inputs(self, fields: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """Stored arrays (as tensors on the model's device) → positional inputs of the model."""

    def to_inputs(self, obs: Any, device: str | torch.device) -> tuple[Tensor, ...]:
        """A batched observation straight to model inputs (rollouts)."""
        return self.model_inputs({k: torch.as_tensor(v, device=device) for k, v in self.encode(obs).items()})

    def policy(self, model: nn.Module) -> nn.Module:
        """What the trainer calls ``act`` / ``evaluate_actions`` / ``forward`` on with
        :meth:`model_inputs`: the model itself, unless the adapter stores pre-encoded inputs."""
        return model

    def bind(self, model: nn.Module) -> None:
        """Use ``model`` (e.g. a collector process's copy) where :meth:`encode` needs one."""


class DrivingObsAdapter(ObsAdapter):
    """The driving envs' dict observation (``image``, ``state``, ``command``) for `DrivingVLA`.

    Commands are tokenised once per distinct string (they repeat a lot) and stored padded to the
    model's ``max_text_length``; :meth:`model_inputs` trims the all-padding tail of a batch, which
    the model masks anyway, so the text encoder does less work.
    """

    def __init__(self, model: nn.Module, observation_space: gym.spaces.Dict) -> None:
        self.model = model
        self.image_shape = tuple(observation_space["image"].shape)
        self.state_dim = int(observation_space["state"].shape[0])
        self.token_length = int(model.config.max_text_length)
        self._token_cache: dict[str, np.ndarray] = {}

    def fields(self) -> FieldSpec:
        return {"image": (self.image_shape, np.dtype(np.uint8)),
                "state": ((self.state_dim,), np.dtype(np.float32)),
                "tokens": ((self.token_length,), np.dtype(np.int64))}

    def tokens(self, commands: Sequence[str]) -> np.ndarray:
        missing = [c for c in dict.fromkeys(commands) if c not in self._token_cache]
        if missing:
            for c, ids in zip(missing, self.model.tokenize(list(missing))):
                self._token_cache[c] = ids.cpu().numpy()
        return np.stack([self._token_cache[c] for c in commands])

    def encode(self, obs: Any) -> dict[str, np.ndarray]:
        return {"image": np.asarray(obs["image"], dtype=np.uint8),
                "state": np.asarray(obs["state"], dtype=np.float32),
                "tokens": self.tokens([str(c) for c in obs["command"]])}

    def stack(self, observations: Sequence[Any]) -> Any:
        return {"image": np.stack([np.asarray(o["image"]) for o in observations]),
                "state": np.stack([np.asarray(o["state"]) for o in observations]),
                "command": [str(o["command"]) for o in observations]}

    def model_inputs(self, fields: dict[str, Tensor]) -> tuple[Tensor, ...]:
        from stages.training import trim_padding

        return fields["image"], fields["state"].float(), trim_padding(fields["tokens"])

    def bind(self, model: nn.Module) -> None:
        self.model = model

    def __getstate__(self) -> dict[str, Any]:
        # Sent to collector processes without the model (they hold their own copy and bind() it):
        # the tokenizer is all encode() needs, and it is tiny.
        state = dict(self.__dict__)
        state["model"] = _TokenizerOnly(self.model)
        return state


class EncodedDrivingAdapter(DrivingObsAdapter):
    """`DrivingObsAdapter` for frozen encoders: stores what the encoders make of an observation.

    With the vision and text encoders frozen (``freeze_encoders``), their outputs for a stored
    observation never change, yet a PPO update would recompute them for every minibatch of every
    epoch — most of the update's cost with the ViT. Here the rollout stores the vision tokens
    (``[P, hidden]``, P = 17 for the tiny model at 64 px) and the pooled text feature instead of the
    image and the command, computed once during collection, and the update runs only the state
    encoder, the fusion transformer and the heads (:class:`EncodedDrivingPolicy`). The result is
    the same as running `DrivingVLA` on the raw observation (a unit test checks it); dropout in
    the encoders, if configured, is not applied.
    """

    def __init__(self, model: nn.Module, observation_space: gym.spaces.Dict) -> None:
        super().__init__(model, observation_space)
        cfg = model.config
        self.vision_tokens = int(model.vision.tokens_per_camera * cfg.num_cameras)
        self.hidden_dim = int(cfg.hidden_dim)
        self._text_cache: dict[str, np.ndarray] = {}

    def fields(self) -> FieldSpec:
        return {"vision_tokens": ((self.vision_tokens, self.hidden_dim), np.dtype(np.float32)),
                "text_features": ((self.hidden_dim,), np.dtype(np.float32)),
                "state": ((self.state_dim,), np.dtype(np.float32))}

    @torch.no_grad()
    def encode(self, obs: Any) -> dict[str, np.ndarray]:
        device = next(self.model.parameters()).device
        image = torch.as_tensor(np.asarray(obs["image"], dtype=np.uint8), device=device)
        _, vision_tokens = self.model.vision(image)
        return {"vision_tokens": vision_tokens.float().cpu().numpy(),
                "text_features": self.text_features([str(c) for c in obs["command"]]),
                "state": np.asarray(obs["state"], dtype=np.float32)}

    @torch.no_grad()
    def text_features(self, commands: Sequence[str]) -> np.ndarray:
        """The text encoder's pooled feature of each command (a handful of distinct commands: each
        goes through the encoder once)."""
        from stages.training import trim_padding

        missing = [c for c in dict.fromkeys(commands) if c not in self._text_cache]
        if missing:
            device = next(self.model.parameters()).device
            tokens = trim_padding(torch.as_tensor(self.tokens(missing), device=device))
            for c, feature in zip(missing, self.model.text(tokens).float().cpu().numpy()):
                self._text_cache[c] = feature
        return np.stack([self._text_cache[c] for c in commands])

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self._text_cache = {}

    def model_inputs(self, fields: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return fields["vision_tokens"], fields["text_features"], fields["state"].float()

    def policy(self, model: nn.Module) -> nn.Module:
        return EncodedDrivingPolicy(model)


class EncodedDrivingPolicy(nn.Module):
    """`DrivingVLA`'s RL interface over pre-encoded inputs ``(vision_tokens, text_features, state)``.

    It shares the model's parameters (no copy) and goes on from where the encoders' outputs enter
    the fusion sequence (`DrivingVLA.fusion_sequence`), with the model's own critic (`critic_value`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute_features(self, vision_tokens: Tensor, text_features: Tensor, state: Tensor) -> Tensor:
        return self.model.fuse(self.model.fusion_sequence(vision_tokens, text_features, state), state)

    def forward(self, vision_tokens: Tensor, text_features: Tensor, state: Tensor) -> ActorCriticOutput:
        m = self.model
        sequence = m.fusion_sequence(vision_tokens, text_features, state)
        features = m.fuse(sequence, state)
        return ActorCriticOutput(m.policy_params(features), m.critic_value(sequence, features))

    def act(self, vision_tokens: Tensor, text_features: Tensor, state: Tensor,
            deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        out = self(vision_tokens, text_features, state)
        dist = self.model.distribution(out.action_params)
        action = dist.mode().detach() if deterministic else dist.sample()
        return action, dist.log_prob(action), out.value

    def evaluate_actions(self, vision_tokens: Tensor, text_features: Tensor, state: Tensor,
                         actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self(vision_tokens, text_features, state)
        dist = self.model.distribution(out.action_params)
        return dist.log_prob(actions), dist.entropy(), out.value


class MixedPrecisionPolicy(nn.Module):
    """A policy's RL interface with its network under bf16 autocast and its distribution in fp32.

    The log-probabilities PPO takes a ratio of, and the entropy, are computed in fp32 from the
    network's (bf16) outputs: a squashed Gaussian's log-density in bf16 would carry errors of the
    order of the clip range. The behaviour policy (collection) and the update must use the same
    wrapper, so the ratio of an unchanged policy stays at 1 up to the batch-size dependence of the
    kernels (measured: ``ratio_dev`` in the update statistics). ``enabled=False`` is the plain policy.
    """

    def __init__(self, policy: nn.Module, model: nn.Module, device: str | torch.device, enabled: bool) -> None:
        super().__init__()
        self.policy, self.dist_owner = policy, model
        self.device_type = torch.device(device).type
        self.enabled = bool(enabled) and self.device_type == "cuda"

    def _out(self, inputs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, Tensor], Tensor]:
        # cache_enabled=False: the weight casts must be re-done inside a captured CUDA graph.
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled, cache_enabled=False):
            out = self.policy(*inputs)
        return tuple(p.float() for p in out.action_params), out.value.float()

    def forward(self, *inputs: Tensor) -> ActorCriticOutput:
        params, value = self._out(inputs)
        return ActorCriticOutput(params, value)

    def act(self, *inputs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        params, value = self._out(inputs)
        dist = self.dist_owner.distribution(params)
        action = dist.mode().detach() if deterministic else dist.sample()
        return action, dist.log_prob(action), value

    def evaluate_actions(self, *args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        *inputs, actions = args
        params, value = self._out(tuple(inputs))
        dist = self.dist_owner.distribution(params)
        return dist.log_prob(actions), dist.entropy(), value


class _TokenizerOnly:
    """What `DrivingObsAdapter` needs of a model in a worker process: ``tokenize`` and the config."""

    def __init__(self, model: nn.Module) -> None:
        self.tokenizer = model.tokenizer
        self.config = model.config

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer.encode(texts)


class BoxObsAdapter(ObsAdapter):
    """A flat ``Box`` observation, stored as float32; the model's input is ``(obs,)``."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        self.shape = tuple(observation_space.shape)

    def fields(self) -> FieldSpec:
        return {"obs": (self.shape, np.dtype(np.float32))}

    def encode(self, obs: Any) -> dict[str, np.ndarray]:
        return {"obs": np.asarray(obs, dtype=np.float32)}

    def stack(self, observations: Sequence[Any]) -> Any:
        return np.stack([np.asarray(o, dtype=np.float32) for o in observations])

    def model_inputs(self, fields: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return (fields["obs"],)


def make_obs_adapter(model: nn.Module, observation_space: gym.Space, encoded: bool = False) -> ObsAdapter:
    """The adapter for ``observation_space`` (a single env's space, not the batched one).

    ``encoded``: the model's encoders are frozen, so store their outputs
    (:class:`EncodedDrivingAdapter`) where the model has them (`DrivingVLA`).
    """
    if isinstance(observation_space, gym.spaces.Dict) and {"image", "state", "command"} <= set(observation_space.spaces):
        if encoded and hasattr(model, "vision") and hasattr(model, "text"):
            return EncodedDrivingAdapter(model, observation_space)
        return DrivingObsAdapter(model, observation_space)
    if isinstance(observation_space, gym.spaces.Box):
        return BoxObsAdapter(observation_space)
    raise TypeError(f"no observation adapter for {observation_space}: expected the driving Dict "
                    "(image, state, command) or a Box")


# ---------------------------------------------------------------------------------------------
# a small actor-critic for Box observations


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """``in → hidden… → out`` with ``activation`` between layers (none after the last)."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ActorCriticOutput(NamedTuple):
    action_params: tuple[Tensor, Tensor]
    value: Tensor


class VectorObsModel(nn.Module):
    """A small model on vector observations: its features are the observation, and it has no encoders
    to freeze (what `DrivingVLA` names its encoders is empty here)."""

    def encoder_parameters(self) -> list[nn.Parameter]:
        return []

    def freeze_encoders(self) -> int:
        return 0

    def compute_features(self, obs: Tensor) -> Tensor:
        return obs.float().flatten(1)


class MLPActorCritic(VectorObsModel):
    """Separate policy and value MLPs over a flat observation, with `DrivingVLA`'s RL interface.

    The policy is a squashed Gaussian over ``action_low .. action_high``
    (`models.distributions.SquashedGaussian`) whose ``log_std`` is a learned, state-independent
    parameter — the usual choice for PPO (cleanrl, SB3). Layers are orthogonally initialised,
    the last policy layer with gain 0.01 so the first actions sit near the centre of the box.

    ``MLPActorCritic.for_env(env)`` sizes it from a (single or vector) env with Box spaces.
    """

    def __init__(self, obs_dim: int, action_low: Sequence[float] | np.ndarray, action_high: Sequence[float] | np.ndarray,
                 hidden: Sequence[int] = (64, 64), init_log_std: float = 0.0) -> None:
        super().__init__()
        low = torch.as_tensor(np.asarray(action_low, dtype=np.float32)).flatten()
        high = torch.as_tensor(np.asarray(action_high, dtype=np.float32)).flatten()
        if low.shape != high.shape or not bool((high > low).all()):
            raise ValueError(f"action bounds must have one shape and low < high, got {low} / {high}")
        self.obs_dim, self.action_dim = int(obs_dim), int(low.numel())
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        self.policy_head = mlp(self.obs_dim, hidden, self.action_dim)
        self.value_head = mlp(self.obs_dim, hidden, 1)
        self.log_std = nn.Parameter(torch.full((self.action_dim,), float(init_log_std)))
        for net, last_gain in ((self.policy_head, 0.01), (self.value_head, 1.0)):
            linears = [m for m in net if isinstance(m, nn.Linear)]
            for i, layer in enumerate(linears):
                nn.init.orthogonal_(layer.weight, last_gain if i == len(linears) - 1 else np.sqrt(2))
                nn.init.zeros_(layer.bias)

    @classmethod
    def for_env(cls, env: Any, hidden: Sequence[int] = (64, 64), init_log_std: float = 0.0) -> "MLPActorCritic":
        obs_space = getattr(env, "single_observation_space", env.observation_space)
        act_space = getattr(env, "single_action_space", env.action_space)
        return cls(int(np.prod(obs_space.shape)), act_space.low, act_space.high, hidden, init_log_std)

    @torch.no_grad()
    def set_log_std(self, value: float) -> None:
        self.log_std.fill_(float(value))

    # Parameter groups as `DrivingVLA` names them; there are no encoders and no shared trunk.
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoders": [], "actor": [*self.policy_head.parameters(), self.log_std],
                "critic": list(self.value_head.parameters()), "trunk": []}

    def policy_params(self, features: Tensor) -> tuple[Tensor, Tensor]:
        loc = self.policy_head(features)
        return loc, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).expand_as(loc)

    def distribution(self, params: tuple[Tensor, Tensor]) -> SquashedGaussian:
        return SquashedGaussian(params[0], params[1], self.action_low, self.action_high)

    def forward(self, obs: Tensor) -> ActorCriticOutput:
        features = self.compute_features(obs)
        return ActorCriticOutput(self.policy_params(features), self.value_head(features).squeeze(-1))

    def act(self, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        out = self(obs)
        dist = self.distribution(out.action_params)
        action = dist.mode().detach() if deterministic else dist.sample()
        return action, dist.log_prob(action), out.value

    def evaluate_actions(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self(obs)
        dist = self.distribution(out.action_params)
        return dist.log_prob(actions), dist.entropy(), out.value
