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

What the replay buffer stores is chosen from the settings (`stages.rl.sac_storage`): the raw
observation, the frozen encoders' outputs or, when the trunk does not train, the fused features.

Collection lives apart (`stages.rl.sac_collection`): a vector env steps in lockstep while the
updates it is owed run (deterministic for a seed); env constructors step each at its own pace in
worker processes while a learner thread updates. ``utd_ratio`` is gradient updates per env step
(summed over envs) either way.

Checkpoints: ``train(..., save_dir)`` writes and resumes them (`stages.rl.sac_state`).

Data parallel (``dist``, a `stages.accel.Distributed` under ``torchrun``): every rank steps its own
envs (seeds ``seed + 1000 * rank``) into its own replay buffer and samples its own minibatch; the
gradients of the critics (and trunk), the actor and α are averaged over ranks before each step, so
the parameters stay identical (they are broadcast from rank 0 at the start). ``global_step``
counts the env steps of all ranks; ``utd_ratio`` counts per rank (each rank runs ``utd_ratio``
updates per env step of its own, each on ``world_size`` × ``batch_size`` samples in all). Rank 0
alone writes the checkpoint (holding every rank's RNG states and replay buffer) and the scalars;
every rank reads the checkpoint to resume.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from models.q_heads import TwinQHead
from stages.accel import Distributed
from stages.rl import sac_state
from stages.rl.checkpoint import TrainingCheckpoint
from stages.rl.configs import SACConfig
from stages.rl.policies import BoxObsAdapter
from stages.rl.replay import ReplayBatch, ReplayBuffer
from stages.rl.sac_collection import LearnerThread, make_collector
from stages.rl.sac_storage import add_offline_samples, choose_storage, mode_matters
from stages.rl.scalars import ScalarWriter

log = logging.getLogger(__name__)

__all__ = ["SACConfig", "SACTrainer", "CHECKPOINT_BUFFER_BYTES"]

# The online replay buffer goes into a checkpoint up to this size: a 64 px driving buffer of ~20k
# raw transitions (or ~60k encoded), a Pendulum buffer of any size. Larger buffers would make
# every checkpoint a multi-GB write; a resumed run refills them instead.
CHECKPOINT_BUFFER_BYTES = 256 * 2**20


class SACTrainer:
    """SAC on a vector env (updates overlapping its ``step_async``), a single env, or env
    constructors (each env at its own pace in a worker process, the updates in a learner thread).

    ``env``: a gymnasium ``VectorEnv`` with same-step autoreset, a single env (wrapped into a
    one-env vector), or a sequence of picklable env constructors (e.g.
    `stages.envs.factory.env_fns`), which the trainer starts and :meth:`close` stops. Under data
    parallelism constructors are built into a vector env instead: the ranks step in lockstep.
    """
    def __init__(self, model: torch.nn.Module, env: Any, config: SACConfig | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, offline_data: Any = None,
                 dist: Distributed | None = None):
        self.config = cfg = config or SACConfig()
        self.device = torch.device(device)
        self.model = model = model.to(self.device)
        self.dist = dist or Distributed()
        self.world_size = self.dist.world_size
        self.seed = seed
        self.collector = make_collector(env, lockstep=self.dist.enabled)
        self.env: Any = getattr(self.collector, "env", None)  # the vector env, when it is one
        self.num_envs = self.collector.num_envs
        try:
            act_space = self.collector.action_space
            if not isinstance(act_space, gym.spaces.Box):
                raise ValueError(f"SAC needs a continuous (Box) action space, got {act_space}")
            self.action_low = act_space.low.astype(np.float32)
            self.action_high = act_space.high.astype(np.float32)
            action_dim = int(self.action_low.size)

            # The actor loss trains the actor (the policy head); the critic loss trains the critics
            # and, with train_trunk, everything else that trains (parameters off the feature path,
            # such as the trajectory and value heads, get no gradient and stay as they are).
            if cfg.freeze_encoders:
                model.freeze_encoders()
            actor_params = model.parameter_groups()["actor"]
            if not actor_params:
                raise ValueError(f"{type(model).__name__} has no actor parameters: SAC trains the policy head "
                                 "as its actor (DrivingVLA or stages.rl.sac_networks.MLPActor)")
            actor = {id(p) for p in actor_params}
            trunk = [p for p in model.parameters() if p.requires_grad and id(p) not in actor] if cfg.train_trunk else []
            self.trains_trunk = bool(trunk)

            feature_dim = getattr(model, "feature_dim", None) or model.config.hidden_dim
            self.critic = TwinQHead(feature_dim, self.action_low, self.action_high, cfg.q_hidden_dim).to(self.device)
            self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
            self.actor_optimizer = torch.optim.Adam(actor_params, lr=cfg.learning_rate)
            self.critic_optimizer = torch.optim.Adam(list(self.critic.parameters()) + trunk, lr=cfg.learning_rate)
            if cfg.autotune_alpha and cfg.alpha <= 0:
                raise ValueError("autotune_alpha needs a positive initial alpha (config.alpha)")
            self.log_alpha = torch.tensor(math.log(cfg.alpha) if cfg.alpha > 0 else -math.inf, device=self.device,
                                          requires_grad=cfg.autotune_alpha)
            self.alpha_optimizer = (torch.optim.Adam([self.log_alpha], lr=cfg.learning_rate)
                                    if cfg.autotune_alpha else None)
            self.target_entropy = float(cfg.target_entropy if cfg.target_entropy is not None else -action_dim)
            # log p(a) - log p(a scaled to [-1, 1]) = -sum(log half_range): added back to every log-prob.
            self._log_scale = float(np.log((self.action_high - self.action_low) / 2).sum())

            self.rank_seed = self.seed + 1000 * self.dist.rank  # each rank's envs and minibatches of its own
            self.rng = np.random.default_rng(self.rank_seed)  # minibatches
            self.action_rng = np.random.default_rng([self.rank_seed, 1])  # random warm-up actions
            if self.dist.enabled:
                sac_state.broadcast_from_rank0(self)
                # Action and reparameterisation noise of its own (the model was built alike on every rank).
                torch.manual_seed(self.rank_seed)

            self._mode_matters = mode_matters(model)
            self.adapter, self.storage, self._compute_features = choose_storage(
                model, self.collector.observation_space, feature_dim, cfg.freeze_encoders, self.trains_trunk,
                self.device)
            self._box = isinstance(self.adapter, BoxObsAdapter)
            fields = self.adapter.fields()
            # The Box adapter calls its one field "obs"; the replay buffer and its batches call it "state".
            buffer_fields = {"state": fields["obs"]} if self._box else fields
            self.buffer = ReplayBuffer.for_fields(cfg.buffer_size, buffer_fields, action_dim,
                                                  num_envs=self.num_envs, offline_ratio=cfg.offline_ratio)
            if offline_data is not None:
                if self.storage != "raw":
                    self._set_training(False)  # stored encodings are computed in eval mode
                add_offline_samples(self.buffer, offline_data, self.storage, model, self.encode)
            elif cfg.offline_ratio > 0:
                log.warning("sac: offline_ratio=%s but no offline_data given: every batch is online",
                            cfg.offline_ratio)
        except BaseException:
            self.close()  # the env processes started here
            raise

        self.global_step = 0
        self.updates = 0
        self.log_interval = 1000  # env steps between scalars, progress-bar updates and callbacks
        self.episode_returns: deque[float] = deque(maxlen=50)
        self.episode_completion: deque[float] = deque(maxlen=50)
        self.update_debt = 0.0  # updates owed by the env steps taken, not run yet
        self._updates_from = cfg.learning_starts  # global step from which updates are owed
        self._buffer_left_out_logged = False
        # With a learner thread: the buffer is shared; the model too where its mode matters.
        self._buffer_lock = threading.Lock()
        self._model_lock = threading.Lock() if self._mode_matters else contextlib.nullcontext()

    # -- acting (the collector's `stages.rl.sac_collection.Agent`) ------------------------------
    def encode(self, obs: Any) -> dict[str, np.ndarray]:
        """A batched env observation -> the arrays the replay buffer stores."""
        # Copies: a vector env may reuse its observation arrays (SyncVectorEnv with copy=False).
        fields = {k: np.array(v) for k, v in self.adapter.encode(obs).items()}
        return {"state": fields["obs"]} if self._box else fields

    def encode_one(self, obs: Any) -> dict[str, np.ndarray]:
        return self.encode(self.adapter.batch_one(obs))

    def _inputs(self, obs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Stored arrays (numpy or torch) -> the model's positional inputs on the device."""
        t = {k: torch.as_tensor(v, device=self.device) for k, v in obs.items()}
        return self.adapter.model_inputs({"obs": t["state"]} if self._box else t)

    def _set_training(self, mode: bool) -> None:
        # Module.train() walks every submodule (~0.5 ms for DrivingVLA, paid twice per env step):
        # only where dropout or batch norm makes the two modes differ.
        if self._mode_matters and self.model.training != mode:
            self.model.train(mode)

    @torch.no_grad()
    def actions(self, encoded: dict[str, np.ndarray], count: int) -> np.ndarray:
        """Actions for ``count`` encoded observations: uniform before ``learning_starts`` (with
        ``random_warmup``), else sampled from the policy."""
        if self.config.random_warmup and self.global_step < self.config.learning_starts:
            return self.action_rng.uniform(self.action_low, self.action_high,
                                           size=(count, self.action_low.size)).astype(np.float32)
        with self._model_lock:
            self._set_training(False)
            features = self._compute_features(*self._inputs(encoded))
            return self.model.distribution(self.model.policy_params(features)).sample().cpu().numpy()

    def store(self, obs: dict[str, np.ndarray], actions: np.ndarray, rewards: np.ndarray,
              next_obs: dict[str, np.ndarray], terminated: np.ndarray, done: np.ndarray,
              envs: np.ndarray | None = None) -> None:
        with self._buffer_lock:
            self.buffer.add(obs, actions, rewards, next_obs, terminated, done, envs=envs)

    def end_episode(self, episode_return: float, completion: Any) -> None:
        self.episode_returns.append(episode_return)
        if completion is not None:
            self.episode_completion.append(float(completion))

    def reset_seed(self) -> int:
        # A resumed run starts new episodes from seeds of its own, not the first run's.
        return self.rank_seed + 7919 * self.global_step

    # -- update ---------------------------------------------------------------------------------
    def _log_prob_scaled(self, log_prob: torch.Tensor) -> torch.Tensor:
        return log_prob + self._log_scale

    def _step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: bool = True) -> None:
        """Backward, average the gradients over the ranks, clip them (``max_grad_norm``), step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Every rank runs the same graph, so the same parameters have gradients on every rank.
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.dist.enabled:
            self.dist.average_gradients(params)
        if clip and self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()

    def _features(self, batch: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk features of the observations (with gradient when the critic trains the trunk) and
        of the next observations (never). A fixed trunk sees both in one batch."""
        if self.trains_trunk:
            features = self._compute_features(*self._inputs(batch.obs))
            with torch.no_grad():
                return features, self._compute_features(*self._inputs(batch.next_obs))
        both = {k: torch.cat([batch.obs[k], batch.next_obs[k]]) for k in batch.obs}
        with torch.no_grad():
            return self._compute_features(*self._inputs(both)).chunk(2)

    def update(self, batch: ReplayBatch | None = None) -> dict[str, float]:
        """One gradient step of the critics (and trunk), the actor and alpha; then the targets."""
        if batch is None:
            with self._buffer_lock:
                batch = self.buffer.sample(self.config.batch_size, self.rng, self.device)
        with self._model_lock:
            return self._update(batch)

    def _update(self, batch: ReplayBatch) -> dict[str, float]:
        cfg = self.config
        self._set_training(True)
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
        self._step(self.critic_optimizer, critic_loss)

        stats = {"critic_loss": critic_loss.item(), "q_mean": 0.5 * (q1.mean().item() + q2.mean().item()),
                 "offline_fraction": batch.offline.float().mean().item(),
                 "actor_warmup": float(self.updates < cfg.actor_warmup_updates)}
        if self.updates >= cfg.actor_warmup_updates:
            stats.update(self._actor_and_alpha_step(features.detach(), alpha))
        stats["alpha"] = float(self.log_alpha.detach().exp())

        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), cfg.tau)
        self.updates += 1
        return stats

    def _actor_and_alpha_step(self, features: torch.Tensor, alpha: torch.Tensor) -> dict[str, float]:
        """The actor on detached ``features``, through critics this loss does not train; then alpha."""
        dist = self.model.distribution(self.model.policy_params(features))
        actions, log_prob = dist.rsample_with_log_prob()
        log_prob = self._log_prob_scaled(log_prob)
        self.critic.requires_grad_(False)
        q1_pi, q2_pi = self.critic(features, actions)
        self.critic.requires_grad_(True)
        actor_loss = (alpha * log_prob - torch.min(q1_pi, q2_pi)).mean()
        self._step(self.actor_optimizer, actor_loss)
        stats = {"actor_loss": actor_loss.item(), "entropy": -log_prob.mean().item()}
        if self.alpha_optimizer is not None:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
            self._step(self.alpha_optimizer, alpha_loss, clip=False)
            stats["alpha_loss"] = alpha_loss.item()
        return stats

    # -- loop -----------------------------------------------------------------------------------
    def train(self, total_timesteps: int, save_dir: str | Path | None = None,
              callback: Callable[[dict[str, float]], Any] | None = None,
              checkpoint_every_steps: int = 10_000, resume: bool = True, checkpoint_key: str | None = None,
              checkpoint_buffer_bytes: int = CHECKPOINT_BUFFER_BYTES) -> dict[str, float]:
        """Step the envs until ``global_step`` reaches ``total_timesteps`` (summed over envs and
        ranks), with ``utd_ratio`` gradient updates per env step once ``learning_starts`` steps
        are stored; returns the last logged statistics.

        ``save_dir``: scalars (``tensorboard/``, ``scalars.jsonl``) and ``checkpoint.pt`` every
        ``checkpoint_every_steps`` env steps and at the end; with ``resume`` an existing checkpoint
        there is loaded first (one made with another ``checkpoint_key`` is not). The online replay
        buffer is saved with it while it takes at most ``checkpoint_buffer_bytes``.
        ``callback(stats)`` runs every ``log_interval`` env steps (on rank 0); returning ``False``
        stops training there (the checkpoint is written first).
        """
        cfg = self.config
        main = self.dist.is_main
        if checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be >= 1, got {checkpoint_every_steps}")
        ckpt = TrainingCheckpoint(save_dir, key=checkpoint_key) if save_dir is not None else None
        if ckpt is not None and resume:
            sac_state.resume(self, ckpt)
        writer = ScalarWriter(save_dir) if save_dir is not None and main else None
        start, start_step = time.perf_counter(), self.global_step
        bar = tqdm(total=total_timesteps, initial=min(self.global_step, total_timesteps), desc="sac", unit="step",
                   disable=None if main else True)
        window: dict[str, list[float]] = {}
        stats: dict[str, float] = {}
        next_log = self.global_step + self.log_interval
        next_ckpt = (self.global_step // checkpoint_every_steps + 1) * checkpoint_every_steps
        saved_at: int | None = None
        learner: LearnerThread | None = None
        threads_before = torch.get_num_threads()

        def run_updates() -> None:
            while self.update_debt >= 1.0:
                for key, value in self.update().items():
                    window.setdefault(key, []).append(value)
                self.update_debt -= 1.0

        def save() -> None:
            nonlocal saved_at
            with learner.paused() if learner is not None else contextlib.nullcontext():
                sac_state.save(self, ckpt, checkpoint_buffer_bytes)
            saved_at = self.global_step

        try:
            if self.collector.concurrent_learner:
                # Two threads (acting, learning) of one intra-op thread each: more would oversubscribe.
                torch.set_num_threads(1)
                learner = LearnerThread(self, window, max_debt=max(2.0, 2 * self.num_envs * cfg.utd_ratio))
            while self.global_step < total_timesteps:
                before = self.global_step
                if learner is None:
                    # The updates this step is owed run while its envs step, on what is stored so far.
                    if before + self.num_envs * self.world_size >= self._updates_from and len(self.buffer) > 0:
                        self.update_debt += self.num_envs * cfg.utd_ratio
                    self.global_step += self.collector.step(self, during=run_updates) * self.world_size
                else:
                    learner.check()
                    stored = self.collector.step(self)
                    if not stored:
                        continue
                    self.global_step += stored * self.world_size
                    # Steps before + 1 … global_step that are at or past updates_from owe updates.
                    owing = min(self.global_step - before, self.global_step - self._updates_from + 1)
                    if owing > 0:
                        learner.owe(owing * cfg.utd_ratio)
                bar.update(self.global_step - before)
                finished = self.global_step >= total_timesteps
                if finished and learner is not None:
                    learner.drain()
                if ckpt is not None and (self.global_step >= next_ckpt or finished):
                    next_ckpt = (self.global_step // checkpoint_every_steps + 1) * checkpoint_every_steps
                    save()
                if self.global_step >= next_log or finished:
                    next_log = self.global_step + self.log_interval
                    with learner.paused() if learner is not None else contextlib.nullcontext():
                        stats = self._summary(window, start, start_step)
                        window.clear()
                    bar.set_postfix(sps=f"{stats['steps_per_second']:.0f}",
                                    ret=f"{stats.get('episode_return', float('nan')):.1f}")
                    if writer is not None:
                        for key, value in stats.items():
                            writer.add_scalar(f"sac/{key}", value, self.global_step)
                        writer.flush()
                    # The callback may read or drive the model (e.g. stages.rl.selection's keeper): the
                    # learner thread holds still meanwhile.
                    with learner.paused() if learner is not None else contextlib.nullcontext():
                        stop = main and callback is not None and callback(stats) is False
                    if self.dist.enabled:  # every rank stops together (rank 0's callback decides)
                        stop = self.dist.sum({"stop": float(stop)})["stop"] > 0
                    if stop:
                        log.info("sac: stopped by the callback at step %d", self.global_step)
                        if ckpt is not None and saved_at != self.global_step:
                            save()
                        break
        finally:
            if learner is not None:
                learner.close()
            torch.set_num_threads(threads_before)
            bar.close()
            if writer is not None:
                writer.close()
        return stats

    def close(self) -> None:
        """Stop the env workers this trainer started (or the vector env it built)."""
        if getattr(self, "collector", None) is not None:
            self.collector.close()

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

    # -- checkpoints (`stages.rl.sac_state`) --------------------------------------------------
    def state_dict(self, include_buffer: bool = False) -> dict[str, Any]:
        """Model, critics, targets, optimisers, alpha, counters, RNG states and episode statistics;
        the replay buffer's online part when ``include_buffer``."""
        return sac_state.state_dict(self, include_buffer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` or a checkpoint; the envs start fresh episodes."""
        sac_state.load_state_dict(self, state)
