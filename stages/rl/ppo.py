"""PPO for DrivingVLA (clipped surrogate, GAE, value clipping), written to be read top to bottom.

``PPOTrainer(model, env, config).train(total_timesteps, save_dir)`` as in the seed document.
Rollout collection (:meth:`PPOTrainer.collect_rollouts`) is separate from the update
(:meth:`PPOTrainer.update`), as in Stable-Baselines3.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from stages.rl.buffers import RolloutBuffer
from stages.rl.configs import PPOConfig
from stages.training import ENCODER_PREFIXES, trim_padding
from stages.rl.vector import as_vector_env, commands_of, final_obs, final_values

log = logging.getLogger(__name__)

__all__ = ["PPOConfig", "PPOTrainer"]



class PPOTrainer:
    def __init__(self, model: torch.nn.Module, env: Any, config: PPOConfig | None = None,
                 device: str | torch.device = "cpu", seed: int = 0):
        self.config = config or PPOConfig()
        self.model = model.to(device)
        self.env = as_vector_env(env)
        self.device = torch.device(device)
        self.num_envs = self.env.num_envs
        self.rollout_len = max(1, self.config.num_steps // self.num_envs)
        if self.config.freeze_encoders:
            for name, p in self.model.named_parameters():
                if name.startswith(ENCODER_PREFIXES):
                    p.requires_grad_(False)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=self.config.learning_rate, eps=1e-5)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.global_step = 0
        self.updates = 0
        self.episode_returns: deque[float] = deque(maxlen=50)
        self.episode_completion: deque[float] = deque(maxlen=50)
        self._token_cache: dict[str, np.ndarray] = {}
        self._obs: dict[str, Any] | None = None
        self._dones = np.zeros(self.num_envs, dtype=bool)
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)

    # -- observations -------------------------------------------------------------------------
    def _tokens(self, commands: list[str]) -> np.ndarray:
        missing = [c for c in dict.fromkeys(commands) if c not in self._token_cache]
        if missing:
            for c, ids in zip(missing, self.model.tokenize(missing)):
                self._token_cache[c] = ids.numpy()
        return np.stack([self._token_cache[c] for c in commands])

    def _to_tensors(self, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self._tokens(commands_of(obs))
        return (torch.as_tensor(np.asarray(obs["image"]), device=self.device),
                torch.as_tensor(np.asarray(obs["state"], dtype=np.float32), device=self.device),
                trim_padding(torch.as_tensor(tokens, device=self.device)))

    @torch.no_grad()
    def _value_of(self, obs: dict[str, Any]) -> float:
        batched = {k: (np.asarray(v)[None] if k != "command" else [v]) for k, v in obs.items()}
        return float(self.model(*self._to_tensors(batched)).value[0])

    # -- rollout --------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_rollouts(self, buffer: RolloutBuffer) -> None:
        cfg = self.config
        self.model.eval()
        if self._obs is None:
            self._obs, _ = self.env.reset(seed=self.seed)
        buffer.reset()
        while not buffer.full:
            image, state, tokens = self._to_tensors(self._obs)
            action, log_prob, value = self.model.act(image, state, tokens)
            actions = action.cpu().numpy()
            next_obs, reward, terminated, truncated, infos = self.env.step(actions)
            reward = np.asarray(reward, dtype=np.float32).copy()
            self._ep_return += reward
            done = np.logical_or(terminated, truncated)
            for i in np.flatnonzero(done):
                # Time-limit truncation: the episode did not really end, so bootstrap from V(s_T).
                if truncated[i] and not terminated[i] and (fo := final_obs(infos, i)) is not None:
                    reward[i] += cfg.gamma * self._value_of(fo)
                self.episode_returns.append(float(self._ep_return[i]))
                self.episode_completion.append(float(final_values(infos, "route_completion", i, 0.0)))
                self._ep_return[i] = 0.0
            full = np.zeros((self.num_envs, buffer.tokens.shape[-1]), dtype=np.int64)
            full[:, :tokens.shape[1]] = tokens.cpu().numpy()
            buffer.add(image.cpu().numpy(), state.cpu().numpy(), full, actions,
                       log_prob.cpu().numpy(), value.cpu().numpy(), reward, self._dones)
            self._obs, self._dones = next_obs, done
            self.global_step += self.num_envs
        last_value = self.model(*self._to_tensors(self._obs)).value.cpu().numpy()
        buffer.finish(last_value, self._dones, cfg.gamma, cfg.gae_lambda)

    # -- update ---------------------------------------------------------------------------------
    def update(self, buffer: RolloutBuffer) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": [],
                                         "clip_fraction": []}
        for _ in range(cfg.num_epochs):
            for mb in buffer.minibatches(cfg.batch_size, self.device, self.rng):
                log_prob, entropy, value = self.model.evaluate_actions(mb.images, mb.states, trim_padding(mb.tokens),
                                                                       mb.actions)
                log_ratio = log_prob - mb.log_probs
                ratio = log_ratio.exp()
                adv = mb.advantages
                if cfg.normalize_advantages and len(adv) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio,
                                    -adv * ratio.clamp(1 - cfg.clip_epsilon, 1 + cfg.clip_epsilon)).mean()
                if cfg.clip_value:
                    v_clipped = mb.values + (value - mb.values).clamp(-cfg.clip_epsilon, cfg.clip_epsilon)
                    v_loss = 0.5 * torch.max((value - mb.returns) ** 2, (v_clipped - mb.returns) ** 2).mean()
                else:
                    v_loss = 0.5 * ((value - mb.returns) ** 2).mean()
                ent = entropy.mean()
                loss = pg_loss + cfg.value_coef * v_loss - cfg.entropy_coef * ent
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean().item()  # the unbiased k3 estimator
                stats["policy_loss"].append(pg_loss.item())
                stats["value_loss"].append(v_loss.item())
                stats["entropy"].append(ent.item())
                stats["approx_kl"].append(approx_kl)
                stats["clip_fraction"].append(((ratio - 1).abs() > cfg.clip_epsilon).float().mean().item())
            if cfg.target_kl is not None and np.mean(stats["approx_kl"][-5:]) > cfg.target_kl:
                break
        self.updates += 1
        return {k: float(np.mean(v)) for k, v in stats.items()}

    # -- loop -----------------------------------------------------------------------------------
    def train(self, total_timesteps: int, save_dir: str | Path | None = None,
              callback: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        obs_space = self.env.single_observation_space
        buffer = RolloutBuffer(self.rollout_len, self.num_envs, obs_space["image"].shape,
                               obs_space["state"].shape[0], self.model.config.max_text_length)
        writer = None
        if save_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(Path(save_dir) / "tensorboard"))
        start, start_step = time.perf_counter(), self.global_step
        bar = tqdm(total=total_timesteps, initial=min(self.global_step, total_timesteps), desc="ppo", unit="step")
        stats: dict[str, float] = {}
        try:
            while self.global_step < total_timesteps:
                if self.config.anneal_lr:
                    frac = 1.0 - self.global_step / total_timesteps
                    for group in self.optimizer.param_groups:
                        group["lr"] = frac * self.config.learning_rate
                before = self.global_step
                self.collect_rollouts(buffer)
                stats = self.update(buffer)
                stats["steps_per_second"] = (self.global_step - start_step) / (time.perf_counter() - start)
                if self.episode_returns:
                    stats["episode_return"] = float(np.mean(self.episode_returns))
                    stats["route_completion"] = float(np.mean(self.episode_completion))
                bar.update(self.global_step - before)
                bar.set_postfix(sps=f"{stats['steps_per_second']:.0f}", ret=f"{stats.get('episode_return', float('nan')):.1f}")
                if writer is not None:
                    for key, value in stats.items():
                        writer.add_scalar(f"ppo/{key}", value, self.global_step)
                if callback is not None:
                    callback(stats)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return stats
