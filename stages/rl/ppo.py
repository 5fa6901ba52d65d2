"""PPO (clipped surrogate, GAE, value clipping), written to be read top to bottom.

``PPOTrainer(model, env, config).train(total_timesteps, save_dir)`` as in the seed document.
Rollout collection is separate from the update (:meth:`PPOTrainer.update`), as in Stable-Baselines3:
the trainer is handed a collector (`stages.rl.collectors`) of one of two kinds:

- synchronous (`VectorRollouts`): the trainer's process steps a gymnasium vector env, then
  updates; simple and exactly on-policy;
- asynchronous (`AsyncRollouts`, ``config.async_collection``, needs env *constructors*): env
  workers in their own processes keep stepping with the previous policy while the learner
  updates (`stages.rl.async_collector`). Each rollout is at most one update behind the learner; PPO's
  ratio against the stored behaviour log-probabilities corrects for it. This is what keeps slow
  simulators (CARLA at 25 FPS) busy: the update no longer stalls them.

The model is `DrivingVLA` or anything with its RL interface (see `stages.rl.policies`, whose
`MLPActorCritic` runs the same code on gymnasium's Box tasks). Time-limit truncation is bootstrapped
from the value of the final observation (``info["final_obs"]``, same-step autoreset).

With a ``save_dir`` the trainer writes TensorBoard scalars and a checkpoint (model, optimiser, RNG
states, counters) every ``checkpoint_every`` updates; a new trainer given the same ``save_dir``
resumes from it at the same step count (`stages.rl.checkpoint`).

Data parallel (``torchrun --nproc-per-node N``, ``dist=`` a `stages.accel.Distributed`): every rank
owns its own env workers (seeded ``seed + 1000 * rank``, see :func:`rank_seed`) and its own
exploration noise, and collects its own rollout of ``num_steps``. ``num_steps`` and ``batch_size``
are *per rank*: one update learns from ``N * num_steps`` env steps, in minibatches of
``N * batch_size``, and a rank-0 rollout looks exactly like a single process's. ``global_step``
counts the steps of all ranks, so ``total_timesteps``, ``value_warmup_steps`` and the learning-rate
schedule mean the same at any world size. The gradients of every minibatch are averaged over the
ranks before clipping, and all ranks start from rank 0's weights, so they hold bit-identical
weights throughout. Advantages are normalised per minibatch on each rank (over that rank's share),
as in one process. Every rank must take the same number of gradient steps (each one is a
collective): the ``target_kl`` early stop and a callback's stop are decided on values agreed over
the ranks. Rank 0 alone writes the checkpoint and the scalars (the logged statistics are averages
over the ranks); a resumed run loads the checkpoint on every rank.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from stages.accel import Distributed, maybe_compile
from stages.rl.buffers import RolloutBuffer
from stages.rl.checkpoint import TrainingCheckpoint, capture_rng, restore_rng
from stages.rl.collectors import AsyncRollouts, VectorRollouts, make_rollout_collector
from stages.rl.configs import PPOConfig
from stages.rl.scalars import ScalarWriter
from stages.rl.policies import MixedPrecisionPolicy, ObsAdapter, make_obs_adapter

log = logging.getLogger(__name__)

__all__ = ["PPOConfig", "PPOTrainer", "rank_seed"]

# Seeds of different ranks lie this far apart (env i of rank r is seeded ``seed + 1000 * r + i``).
RANK_SEED_STRIDE = 1000


def rank_seed(seed: int, dist: Distributed | None) -> int:
    """This rank's seed: ``seed`` alone or on rank 0, ``seed + 1000 * rank`` on the others, so every
    rank's envs and exploration noise differ while a one-process run keeps its seeds."""
    return seed + RANK_SEED_STRIDE * (dist.rank if dist is not None else 0)


class PPOTrainer:
    """PPO on a vector env (or on env constructors, for asynchronous collection).

    ``env``: a gymnasium ``VectorEnv`` built with same-step autoreset, a single env (wrapped into a
    one-env vector), or a sequence of env constructors (picklable callables, e.g.
    `stages.envs.factory.env_fns`). Constructors are required for ``config.async_collection``;
    without it they are built into a vector env (one subprocess each when there are several).

    ``dist``: this process's place in a ``torchrun`` job (see the module docstring); ``env`` is then
    this rank's own envs, and ``seed`` the job's seed (the trainer offsets it by rank).
    """

    def __init__(self, model: torch.nn.Module, env: Any, config: PPOConfig | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, dist: Distributed | None = None):
        self.config = cfg = config or PPOConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.dist = dist or Distributed()
        self.seed = rank_seed(seed, self.dist)
        if self.dist.enabled:
            # The model is built already (alike on every rank): from here on each rank samples
            # exploration noise of its own.
            torch.manual_seed(self.seed)
        self.collector = make_rollout_collector(env, cfg.async_collection, context=cfg.start_method)
        self.env: gym.vector.VectorEnv | None = getattr(self.collector, "env", None)  # when it is a vector env
        obs_space, act_space = self.collector.observation_space, self.collector.action_space
        self.num_envs = self.collector.num_envs
        if cfg.num_steps % self.num_envs:
            raise ValueError(f"num_steps ({cfg.num_steps}) must be a multiple of the number of envs ({self.num_envs})")
        if cfg.num_envs != self.num_envs:
            log.info("ppo: config.num_envs=%d but the env has %d; using %d", cfg.num_envs, self.num_envs, self.num_envs)
        self.rollout_len = cfg.num_steps // self.num_envs
        self.action_dim = int(np.prod(act_space.shape))
        if cfg.critic_fusion:  # before anything binds the model's modules
            if not hasattr(self.model, "add_critic_fusion"):
                raise ValueError(f"critic_fusion needs a DrivingVLA, not a {type(self.model).__name__}")
            self.model.add_critic_fusion()
        # Frozen encoders: rollouts store the encoders' outputs, so updates skip the encoders.
        self.adapter: ObsAdapter = make_obs_adapter(self.model, obs_space, encoded=cfg.freeze_encoders)
        on_cuda = self.device.type == "cuda"
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_cuda)
        # The network under bf16 autocast, the distribution (log-probabilities, ratio, entropy) in
        # fp32; collection acts through the same wrapper, so behaviour and update agree.
        self.policy = MixedPrecisionPolicy(self.adapter.policy(self.model), self.model, self.device, self.bf16)
        self._evaluate_actions = maybe_compile(self.policy.evaluate_actions, cfg.compile, self.device)
        use_learner = cfg.collector_device == "learner" or (cfg.collector_device == "auto" and on_cuda)
        self.collector_device: torch.device | None = self.device if use_learner else None
        self.cuda_graphs = cfg.cuda_graphs

        if cfg.init_log_std is not None:
            self.model.set_log_std(cfg.init_log_std)
            log.info("ppo: policy log-std set to %.2f (std %.3f)", cfg.init_log_std, float(np.exp(cfg.init_log_std)))
        if cfg.freeze_encoders:
            log.info("ppo: froze %d encoder parameters", self.model.freeze_encoders())
        # What the critic warm-up holds still: everything that trains but the critic's own parameters.
        critic = {id(p) for p in self.model.parameter_groups()["critic"]}
        self._non_value_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in critic]
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=cfg.learning_rate, eps=1e-5, fused=on_cuda)  # one kernel per step
        self.rng = np.random.default_rng(self.seed)
        self.global_step = 0
        self.updates = 0
        self.episode_returns: deque[float] = deque(maxlen=50)
        self.episode_completion: deque[float] = deque(maxlen=50)

    # -- rollouts (what the collector asks of the trainer: `stages.rl.collectors.RolloutAgent`) --
    def reset_seed(self) -> int:
        # A resumed run starts new episodes from a seed of its own, not the first run's.
        return self.seed + 7919 * self.updates

    def end_episode(self, episode_return: float, completion: float) -> None:
        self.episode_returns.append(episode_return)
        self.episode_completion.append(completion)

    def collect_rollouts(self, buffer: RolloutBuffer) -> None:
        """Fill ``buffer`` with ``rollout_len`` steps of every env of a vector env, then compute GAE."""
        if not isinstance(self.collector, VectorRollouts):
            raise TypeError("collect_rollouts steps a vector env; with async_collection the collector does")
        self.collector.fill(self, buffer, self.config.gamma, self.config.gae_lambda)
        self.global_step += buffer.num_steps * self.num_envs * self.dist.world_size  # every rank steps alike

    # -- update ---------------------------------------------------------------------------------
    def update(self, buffer: RolloutBuffer) -> dict[str, float]:
        """``num_epochs`` passes of clipped-surrogate minibatch SGD over ``buffer``."""
        cfg = self.config
        self.model.train()
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": [],
                                         "clip_fraction": []}
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Critic warm-up: the rollout's steps are already counted, so "<=" includes the last one.
        warmup = self.global_step <= cfg.value_warmup_steps
        epochs = 0
        for minibatches in buffer.epochs(cfg.num_epochs, cfg.batch_size, self.device, self.rng):
            epoch_kl: list[torch.Tensor] = []
            for mb in minibatches:
                log_prob, entropy, value = self._evaluate_actions(*self.adapter.model_inputs(mb.obs), mb.actions)
                log_ratio = log_prob - mb.log_probs
                ratio = log_ratio.exp()
                if "ratio_dev" not in stats:
                    # Before any gradient step: with a lag-0 rollout (the first) this is the numeric
                    # gap between the behaviour's and the update's forward (precision, batch size).
                    stats["ratio_dev"] = [(ratio.detach() - 1).abs().max().item()]
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
                if warmup:
                    loss = cfg.value_coef * v_loss
                else:
                    loss = pg_loss + cfg.value_coef * v_loss - cfg.entropy_coef * ent
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._average_gradients(params)
                if warmup:  # only the value head moves: a shared trunk would drag the policy along
                    for p in self._non_value_params:
                        p.grad = None
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.optimizer.step()
                # Statistics stay on the device until the epoch ends: a .item() per minibatch would
                # stall the GPU while the host launches the next one.
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()  # the unbiased k3 estimator
                    epoch_kl.append(approx_kl)
                    stats["policy_loss"].append(pg_loss.detach())
                    stats["value_loss"].append(v_loss.detach())
                    stats["entropy"].append(ent.detach())
                    stats["approx_kl"].append(approx_kl)
                    stats["clip_fraction"].append(((ratio - 1).abs() > cfg.clip_epsilon).float().mean())
            epochs += 1
            # The KL averaged over the ranks: every rank takes the same decision, so none leaves
            # the gradient all-reduce while the others wait in it.
            if cfg.target_kl is not None and self.dist.mean(torch.stack(epoch_kl).mean().item()) > cfg.target_kl:
                break
        self.updates += 1
        out = {k: float(np.mean(v)) if k == "ratio_dev" else torch.stack(v).float().mean().item()
               for k, v in stats.items()}
        out["epochs"] = float(epochs)
        out["value_warmup"] = float(warmup)
        var = float(np.var(buffer.returns))
        out["explained_variance"] = float("nan") if var == 0 else 1.0 - float(np.var(buffer.returns - buffer.values)) / var
        return out

    def _average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the minibatch gradients over the ranks (nothing when alone)."""
        if not self.dist.enabled:
            return
        # Parameters outside this loss (e.g. a trajectory head) keep no gradient, as in one process,
        # so Adam leaves them alone rather than stepping on zeros. Every rank builds the same
        # graph, so the ranks agree on which ones these are.
        unused = [p for p in params if p.grad is None]
        self.dist.average_gradients(params)
        for p in unused:
            p.grad = None

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimiser, counters, RNG states, episode stats."""
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "global_step": self.global_step, "updates": self.updates,
                "rng": {**capture_rng(), "trainer": self.rng.bit_generator.state},
                "episode_returns": list(self.episode_returns),
                "episode_completion": list(self.episode_completion)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step, self.updates = int(state["global_step"]), int(state["updates"])
        restore_rng(state["rng"])
        self.rng.bit_generator.state = state["rng"]["trainer"]
        self.episode_returns.extend(state["episode_returns"])
        self.episode_completion.extend(state["episode_completion"])
        if self.dist.enabled:
            # The checkpoint holds rank 0's generators: each rank goes on with streams of its own.
            torch.manual_seed(self.seed + 7919 * self.updates)
            self.rng = np.random.default_rng([self.seed, self.updates])
        self.collector.restart()  # environments cannot be restored: new episodes start on the next rollout

    # -- loop -----------------------------------------------------------------------------------
    def train(self, total_timesteps: int, save_dir: str | Path | None = None,
              callback: Callable[[dict[str, float]], None] | None = None,
              checkpoint_every: int = 1, resume: bool = True, checkpoint_key: str | None = None) -> dict[str, float]:
        """Train until ``global_step >= total_timesteps``; returns the last update's statistics.

        ``save_dir``: TensorBoard scalars (``tensorboard/``) and ``checkpoint.pt`` every
        ``checkpoint_every`` updates; with ``resume`` an existing checkpoint there is loaded first.
        ``checkpoint_key`` (e.g. a config fingerprint) is stored with it; a checkpoint with another key
        is not resumed from. ``callback(stats)`` runs after every update (its ``global_step`` key says where training is);
        returning ``False`` stops training there.

        Under ``torchrun`` every rank calls this with the same arguments: the checkpoint is loaded on
        every rank and written by rank 0 alone, as are the scalars; the callback runs on every rank
        with the statistics averaged over the ranks, and ``False`` from any rank stops them all.
        """
        cfg = self.config
        ckpt = TrainingCheckpoint(save_dir, key=checkpoint_key) if save_dir is not None else None
        if ckpt is not None and resume and (state := ckpt.load()) is not None:
            self.load_state_dict(state)
            log.info("ppo: resumed at step %d (update %d) from %s", self.global_step, self.updates, ckpt.path)
        self._join_ranks()
        writer = _summary_writer(save_dir) if self.dist.is_main else None
        start, start_step = time.perf_counter(), self.global_step
        bar = tqdm(total=total_timesteps, initial=min(self.global_step, total_timesteps), desc="ppo", unit="step",
                   disable=None if self.dist.is_main else True)
        stats: dict[str, float] = {}
        threads_before = torch.get_num_threads()
        torch.set_num_threads(self._learner_threads())
        try:
            self.collector.start(self, cfg.gamma, cfg.gae_lambda, num_slots=cfg.async_slots)
            while self.global_step < total_timesteps:
                if cfg.anneal_lr:
                    frac = 1.0 - self.global_step / total_timesteps
                    for group in self.optimizer.param_groups:
                        group["lr"] = frac * cfg.learning_rate
                before = self.global_step
                buffer, roll = self.collector.rollout(self)
                self.global_step += self.rollout_len * self.num_envs * self.dist.world_size  # every rank steps alike
                t_update = time.perf_counter()
                stats = self.update(buffer)
                stats["update_seconds"] = time.perf_counter() - t_update
                roll.update(self.collector.release(self, buffer))
                stats.update(roll)
                stats["steps_per_second"] = (self.global_step - start_step) / (time.perf_counter() - start)
                stats = self._mean_over_ranks(stats)
                stats["global_step"] = float(self.global_step)
                stats.update(self._episode_stats())
                bar.update(self.global_step - before)
                bar.set_postfix(sps=f"{stats['steps_per_second']:.0f}",
                                ret=f"{stats.get('episode_return', float('nan')):.1f}")
                if writer is not None:
                    for key, value in stats.items():
                        writer.add_scalar(f"ppo/{key}", value, self.global_step)
                if ckpt is not None and self.dist.is_main and (self.updates % checkpoint_every == 0
                                                               or self.global_step >= total_timesteps):
                    ckpt.save(self.state_dict())
                stop = callback is not None and callback(stats) is False
                if self.dist.enabled:  # one rank leaving the loop would leave the others in its collectives
                    stop = self.dist.sum({"stop": float(stop)})["stop"] > 0
                if stop:
                    log.info("ppo: stopped by the callback at step %d", self.global_step)
                    break
        finally:
            torch.set_num_threads(threads_before)
            bar.close()
            if writer is not None:
                writer.close()
            self.collector.stop()
        return stats

    def _join_ranks(self) -> None:
        """Start every rank from rank 0's weights, and check that the ranks stand at the same step
        with the same rollout shape (else their numbers of collectives would differ and the job hang)."""
        if not self.dist.enabled:
            return
        cfg = self.config
        mine = (self.global_step, self.updates, cfg.num_steps, cfg.batch_size, cfg.num_epochs)
        everyone: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(everyone, mine)
        if any(other != everyone[0] for other in everyone):
            raise RuntimeError("ppo: the ranks disagree on (global_step, updates, num_steps, batch_size, num_epochs): "
                               f"{everyone}; every rank needs the same settings and checkpoint")
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                if t.is_floating_point():
                    torch.distributed.broadcast(t, src=0)

    def _mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """The ranks' update and rollout statistics, averaged (every rank has the same keys)."""
        if not self.dist.enabled:
            return stats
        return {k: v / self.dist.world_size for k, v in self.dist.sum(stats).items()}

    def _episode_stats(self) -> dict[str, float]:
        """Mean return and route completion of the recent episodes of all ranks."""
        if not self.dist.enabled:
            if not self.episode_returns:
                return {}
            return {"episode_return": float(np.mean(self.episode_returns)),
                    "route_completion": float(np.mean(self.episode_completion))}
        # Sums and counts, not means: a rank without a finished episode yet still joins the collective.
        totals = self.dist.sum({"n": float(len(self.episode_returns)), "return": float(np.sum(self.episode_returns)),
                                "completion": float(np.sum(self.episode_completion))})
        if totals["n"] == 0:
            return {}
        n = totals["n"]
        return {"episode_return": totals["return"] / n, "route_completion": totals["completion"] / n}

    def _learner_threads(self) -> int:
        if self.config.learner_threads is not None:
            return self.config.learner_threads
        if isinstance(self.collector, AsyncRollouts):
            # Oversubscribed OpenMP pools spin against each other: leave the collector a core.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            return max(1, min(torch.get_num_threads(), cores - 1))
        return torch.get_num_threads()

    def close(self) -> None:
        """Stop the env processes this trainer started (the collector's, or a vector env's it built)."""
        self.collector.close()


def _summary_writer(save_dir: str | Path | None) -> Any:
    if save_dir is None:
        return None
    return ScalarWriter(save_dir)
