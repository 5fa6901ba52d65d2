"""SAC for DrivingVLA (twin Q heads, target networks, automatic entropy tuning), offline-to-online.

``SACTrainer(model, env, config).train(total_timesteps, save_dir)`` as in the seed document.

The model is anything with ``compute_features(*inputs) -> [B, F]``, ``policy_params(features)``
and ``distribution(params)`` (with ``rsample_with_log_prob``): `DrivingVLA`, whose inputs are
``(image, state, tokens)`` from a dict observation, or `stages.rl.sac_networks.MLPActor`, whose
input is a flat ``Box`` observation (gymnasium's continuous-control tasks).

Who trains what:

- the actor is the model's ``policy_head``, trained by the SAC actor loss on *detached* features;
- the critics are two Q heads (`models.q_heads.TwinQHead`) on the same fused features, trained by
  the TD loss, whose gradient also trains the shared trunk (state encoder, fusion and, unless
  ``freeze_encoders``, the vision and text encoders) when ``train_trunk``. One objective moves
  the representation, as in SAC-AE and DrQ: the policy gradient through a shared encoder is
  noisy and lets the actor and the critics pull the features in opposite directions;
- the critic target uses target copies of the Q heads, soft-updated with ``tau``, on next-state
  features from the online trunk without gradient (as in DrQ-v2): no second copy of the encoders
  in memory and one forward pass fewer per update than a target trunk would cost;
- ``alpha`` is tuned toward the target entropy (``-action_dim`` by default) when ``autotune_alpha``.
  Log-probabilities are measured with actions rescaled to ``[-1, 1]`` (as in SB3), so SB3's tuned
  settings transfer and a throttle in ``[0, 1]`` counts like a steer in ``[-1, 1]``.

The trajectory and value heads are not trained here; they read the trunk, so with ``train_trunk``
their outputs drift from what stage 2 taught them.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from models.q_heads import TwinQHead
from stages.rl.configs import SACConfig
from stages.rl.policies import BoxObsAdapter, make_obs_adapter
from stages.rl.replay import ReplayBatch, ReplayBuffer
from stages.rl.vector import as_vector_env, final_obs, final_values
from stages.training import ENCODER_PREFIXES

log = logging.getLogger(__name__)

__all__ = ["SACConfig", "SACTrainer"]

# Parameters the actor loss trains: DrivingVLA's and MLPActor's policy head (and the
# state-independent log-std of stages.rl.policies.MLPActorCritic, should one be given).
ACTOR_PREFIXES = ("policy_head", "log_std")


class SACTrainer:
    def __init__(self, model: torch.nn.Module, env: Any, config: SACConfig | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, offline_data: Any = None):
        cfg = self.config = config or SACConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.env = as_vector_env(env)
        self.num_envs = self.env.num_envs
        obs_space, act_space = self.env.single_observation_space, self.env.single_action_space
        if not isinstance(act_space, gym.spaces.Box):
            raise ValueError(f"SAC needs a continuous (Box) action space, got {act_space}")
        self.action_low = act_space.low.astype(np.float32)
        self.action_high = act_space.high.astype(np.float32)
        action_dim = int(self.action_low.size)

        if cfg.freeze_encoders:
            for name, p in self.model.named_parameters():
                if name.startswith(ENCODER_PREFIXES):
                    p.requires_grad_(False)
        actor_params = [p for n, p in self.model.named_parameters() if n.startswith(ACTOR_PREFIXES)]
        if not actor_params:
            raise ValueError(f"{type(model).__name__} has no 'policy_head' parameters: SAC trains the "
                             "policy head as its actor (DrivingVLA or stages.rl.sac_networks.MLPActor)")
        # Everything else that trains is the trunk (parameters off the feature path, such as the
        # trajectory and value heads, get no gradient and stay as they are).
        trunk_named = [(n, p) for n, p in self.model.named_parameters()
                       if not n.startswith(ACTOR_PREFIXES) and p.requires_grad] if cfg.train_trunk else []
        self.trains_trunk = bool(trunk_named)

        feature_dim = getattr(model, "feature_dim", None) or model.config.hidden_dim
        self.critic = TwinQHead(feature_dim, self.action_low, self.action_high, cfg.q_hidden_dim).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

        self.actor_optimizer = torch.optim.Adam(actor_params, lr=cfg.learning_rate)
        self.critic_optimizer = torch.optim.Adam(list(self.critic.parameters()) + [p for _, p in trunk_named],
                                                 lr=cfg.learning_rate)
        if cfg.autotune_alpha and cfg.alpha <= 0:
            raise ValueError("autotune_alpha needs a positive initial alpha (config.alpha)")
        self.log_alpha = torch.tensor(math.log(cfg.alpha) if cfg.alpha > 0 else -math.inf, device=self.device,
                                      requires_grad=cfg.autotune_alpha)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.learning_rate) if cfg.autotune_alpha else None
        self.target_entropy = float(cfg.target_entropy if cfg.target_entropy is not None else -action_dim)
        # log p(a) - log p(a scaled to [-1, 1]) = -sum(log half_range): added back to every log-prob.
        self._log_scale = float(np.log((self.action_high - self.action_low) / 2).sum())

        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.adapter = make_obs_adapter(self.model, obs_space)
        self._box = isinstance(self.adapter, BoxObsAdapter)
        fields = self.adapter.fields()
        state_shape = fields["obs" if self._box else "state"][0]
        self.buffer = ReplayBuffer(cfg.buffer_size, state_shape, action_dim, num_envs=self.num_envs,
                                   image_shape=fields["image"][0] if "image" in fields else None,
                                   token_length=fields["tokens"][0][0] if "tokens" in fields else None,
                                   offline_ratio=cfg.offline_ratio, state_dtype=np.float32)
        if offline_data is not None:
            tokenize = (lambda texts: self.model.tokenize(texts).cpu()) if "tokens" in fields else None
            self.buffer.add_offline_samples(offline_data, tokenize)
        elif cfg.offline_ratio > 0:
            log.warning("sac: offline_ratio=%s but no offline_data given: every batch is online", cfg.offline_ratio)

        self.global_step = 0
        self.updates = 0
        self.log_interval = 1000  # env steps between scalars, progress-bar updates and callbacks
        self.episode_returns: deque[float] = deque(maxlen=50)
        self.episode_completion: deque[float] = deque(maxlen=50)
        self._update_debt = 0.0
        self._obs: Any = None
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)

    # -- observations -------------------------------------------------------------------------
    # The replay buffer calls a flat observation "state"; the Box adapter calls it "obs".
    def _encode(self, obs: Any) -> dict[str, np.ndarray]:
        """A batched env observation -> the arrays the replay buffer stores (copies: they are edited)."""
        fields = {k: np.array(v) for k, v in self.adapter.encode(obs).items()}
        return {"state": fields["obs"]} if self._box else fields

    def _encode_one(self, obs: Any) -> dict[str, np.ndarray]:
        return self._encode(self.adapter.batch_one(obs))

    def _inputs(self, obs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Stored arrays (numpy or torch) -> the model's positional inputs on the device."""
        t = {k: torch.as_tensor(v, device=self.device) for k, v in obs.items()}
        return self.adapter.model_inputs({"obs": t["state"]} if self._box else t)

    # -- acting -------------------------------------------------------------------------------
    @torch.no_grad()
    def _policy_actions(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        self.model.eval()
        features = self.model.compute_features(*self._inputs(encoded))
        return self.model.distribution(self.model.policy_params(features)).sample().cpu().numpy()

    def collect_step(self) -> None:
        """One vector-env step stored in the replay buffer."""
        cfg = self.config
        if self._obs is None:
            self._obs, _ = self.env.reset(seed=self.seed)
        encoded = self._encode(self._obs)
        if cfg.random_warmup and self.global_step < cfg.learning_starts:
            actions = self.rng.uniform(self.action_low, self.action_high,
                                       size=(self.num_envs, self.action_low.size)).astype(np.float32)
        else:
            actions = self._policy_actions(encoded)
        next_obs, reward, terminated, truncated, infos = self.env.step(actions)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        done = terminated | truncated
        stored_next = self._encode(next_obs)
        for i in np.flatnonzero(done):
            # Same-step autoreset: next_obs[i] is already the reset observation; the transition
            # must end in the real final observation (bootstrapped from when truncated).
            fo = final_obs(infos, i)
            if fo is None:
                raise RuntimeError("the vector env did not return info['final_obs']; build it with "
                                   "autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP")
            for key, value in self._encode_one(fo).items():
                stored_next[key][i] = value[0]
        self.buffer.add(encoded, actions, reward, stored_next, terminated, done)
        self._ep_return += np.asarray(reward, dtype=np.float64)
        for i in np.flatnonzero(done):
            self.episode_returns.append(float(self._ep_return[i]))
            completion = final_values(infos, "route_completion", i)
            if completion is not None:
                self.episode_completion.append(float(completion))
            self._ep_return[i] = 0.0
        self._obs = next_obs
        self.global_step += self.num_envs

    # -- update ---------------------------------------------------------------------------------
    def _log_prob_scaled(self, log_prob: torch.Tensor) -> torch.Tensor:
        return log_prob + self._log_scale

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        if self.config.max_grad_norm is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)

    def _features(self, batch: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk features of the observations (with gradient when the critic trains the trunk) and
        of the next observations (never). A fixed trunk sees both in one batch."""
        if self.trains_trunk:
            features = self.model.compute_features(*self._inputs(batch.obs))
            with torch.no_grad():
                return features, self.model.compute_features(*self._inputs(batch.next_obs))
        both = {k: torch.cat([batch.obs[k], batch.next_obs[k]]) for k in batch.obs}
        with torch.no_grad():
            return self.model.compute_features(*self._inputs(both)).chunk(2)

    def update(self, batch: ReplayBatch | None = None) -> dict[str, float]:
        """One gradient step of the critics (and trunk), the actor and alpha; then the targets."""
        cfg = self.config
        if batch is None:
            batch = self.buffer.sample(cfg.batch_size, self.rng, self.device)
        self.model.train()
        alpha = self.log_alpha.detach().exp()
        features, next_features = self._features(batch)

        with torch.no_grad():
            next_dist = self.model.distribution(self.model.policy_params(next_features))
            next_actions, next_log_prob = next_dist.rsample_with_log_prob()
            q1_next, q2_next = self.critic_target(next_features, next_actions)
            soft_value = torch.min(q1_next, q2_next) - alpha * self._log_prob_scaled(next_log_prob)
            target_q = batch.rewards + cfg.gamma * (1.0 - batch.terminated) * soft_value

        q1, q2 = self.critic(features, batch.actions)
        critic_loss = 0.5 * (((q1 - target_q) ** 2).mean() + ((q2 - target_q) ** 2).mean())
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self._clip(self.critic_optimizer)
        self.critic_optimizer.step()

        # Actor on detached features, through critics that are not being trained by this loss.
        features = features.detach()
        dist = self.model.distribution(self.model.policy_params(features))
        actions, log_prob = dist.rsample_with_log_prob()
        log_prob = self._log_prob_scaled(log_prob)
        self.critic.requires_grad_(False)
        q1_pi, q2_pi = self.critic(features, actions)
        self.critic.requires_grad_(True)
        actor_loss = (alpha * log_prob - torch.min(q1_pi, q2_pi)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self._clip(self.actor_optimizer)
        self.actor_optimizer.step()

        stats = {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(),
                 "q_mean": 0.5 * (q1.mean().item() + q2.mean().item()),
                 "entropy": -log_prob.mean().item(), "offline_fraction": batch.offline.float().mean().item()}
        if self.alpha_optimizer is not None:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
            self.alpha_optimizer.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_optimizer.step()
            stats["alpha_loss"] = alpha_loss.item()
        stats["alpha"] = float(self.log_alpha.detach().exp())

        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), cfg.tau)
        self.updates += 1
        return stats

    # -- loop -----------------------------------------------------------------------------------
    def train(self, total_timesteps: int, save_dir: str | Path | None = None,
              callback: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """Step the envs until ``global_step`` reaches ``total_timesteps`` (summed over envs), with
        ``utd_ratio`` gradient updates per env step once ``learning_starts`` steps are stored."""
        cfg = self.config
        writer = None
        if save_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(Path(save_dir) / "tensorboard"))
        start, start_step = time.perf_counter(), self.global_step
        bar = tqdm(total=total_timesteps, initial=min(self.global_step, total_timesteps), desc="sac", unit="step")
        window: dict[str, list[float]] = {}
        stats: dict[str, float] = {}
        next_log = self.global_step + self.log_interval
        try:
            while self.global_step < total_timesteps:
                before = self.global_step
                self.collect_step()
                if self.global_step >= cfg.learning_starts and len(self.buffer) > 0:
                    self._update_debt += self.num_envs * cfg.utd_ratio
                    while self._update_debt >= 1.0:
                        for key, value in self.update().items():
                            window.setdefault(key, []).append(value)
                        self._update_debt -= 1.0
                bar.update(self.global_step - before)
                if self.global_step >= next_log or self.global_step >= total_timesteps:
                    next_log = self.global_step + self.log_interval
                    stats = self._summary(window, start, start_step)
                    window = {}
                    bar.set_postfix(sps=f"{stats['steps_per_second']:.0f}",
                                    ret=f"{stats.get('episode_return', float('nan')):.1f}")
                    if writer is not None:
                        for key, value in stats.items():
                            writer.add_scalar(f"sac/{key}", value, self.global_step)
                    if callback is not None:
                        callback(stats)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return stats

    def _summary(self, window: dict[str, list[float]], start: float, start_step: int) -> dict[str, float]:
        stats = {k: float(np.mean(v)) for k, v in window.items()}
        stats["steps_per_second"] = (self.global_step - start_step) / max(time.perf_counter() - start, 1e-9)
        stats["global_step"] = float(self.global_step)
        stats["updates"] = float(self.updates)
        stats["buffer_online"] = float(self.buffer.online_size)
        if self.episode_returns:
            stats["episode_return"] = float(np.mean(list(self.episode_returns)[-10:]))
        if self.episode_completion:
            stats["route_completion"] = float(np.mean(list(self.episode_completion)[-10:]))
        return stats

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, include_buffer: bool = False) -> dict[str, Any]:
        """Model, critics, targets, optimisers, alpha, counters and RNG; the replay buffer's online
        part when ``include_buffer`` (it can be large: ``buffer_size`` observations)."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(), "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "log_alpha": self.log_alpha.detach().cpu(),
            "alpha_optimizer": self.alpha_optimizer.state_dict() if self.alpha_optimizer is not None else None,
            "global_step": self.global_step, "updates": self.updates, "update_debt": self._update_debt,
            "rng": self.rng.bit_generator.state,
            "episode_returns": list(self.episode_returns), "episode_completion": list(self.episode_completion),
        }
        if include_buffer:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; the envs start fresh episodes."""
        self.model.load_state_dict(state["model"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"].to(self.device))
        if self.alpha_optimizer is not None and state.get("alpha_optimizer") is not None:
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.global_step, self.updates = int(state["global_step"]), int(state["updates"])
        self._update_debt = float(state.get("update_debt", 0.0))
        self.rng.bit_generator.state = state["rng"]
        self.episode_returns.extend(state.get("episode_returns", []))
        self.episode_completion.extend(state.get("episode_completion", []))
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        self._obs = None
