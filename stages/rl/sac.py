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

What the replay buffer stores (chosen from the settings; the updates compute the same thing):

- ``train_trunk=False``: nothing before the heads trains, so the fused features of an observation
  never change: the buffer stores them (``hidden_dim`` floats) and an update runs the heads only;
- ``freeze_encoders``: the vision and text encoders' outputs never change: the buffer stores them
  (`stages.rl.policies.EncodedDrivingAdapter`) and an update runs the state encoder, the fusion
  and the heads, when they take no more memory than the image (the tiny model at 64 px: 4.4 KB
  against 12 KB; ViT-B at 224 px: 154 KB against 151 KB, so there the image is kept);
- otherwise the raw observation (uint8 image, state, command tokens).

Features are computed once, in eval mode (dropout, if the model has any, is not applied to them).

Loop. ``utd_ratio`` is gradient updates per env step (summed over envs), whichever loop runs:

- a vector env: while its envs step (``step_async``, e.g. gymnasium's ``AsyncVectorEnv``, one
  process per env), the learner runs the updates that step is owed, then collects the step
  (``step_wait``): a slow simulator and the updates overlap instead of taking turns. The updates
  of step t sample what steps 1 … t-1 stored. Deterministic for a given seed. Every step still
  waits for the slowest env, and the policy's forward pass for all of them sits between two
  steps (the tiny model at N = 8: ~4 ms of a 44 ms step);
- env constructors (an `EnvPool`): each env gets its next action as soon as its own step is back
  (a forward pass for the envs that are back), and the updates run in a learner thread
  (`_Learner`) while the main thread acts; the learner may fall at most ``2 × num_envs ×
  utd_ratio`` updates behind, else acting waits for it. Which transitions an update samples
  depends on timing, so runs are not bit-for-bit repeatable. The benchmark
  (``benchmarks/parallel_envs.py --algo sac``) compares the loops.

Checkpoints. With a ``save_dir``, ``train`` writes ``checkpoint.pt`` every
``checkpoint_every_steps`` env steps and at the end (model, critics, targets, optimisers, α,
counters, RNG states, episode statistics and the online replay buffer when it is at most
``checkpoint_buffer_bytes``, 256 MiB by default), and scalars (TensorBoard and ``scalars.jsonl``).
A new trainer given the same ``save_dir`` resumes at the saved step count; a buffer left out of the
checkpoint is refilled first (no updates for ``batch_size`` steps of every env), so a resumed run
never trains on a handful of transitions.

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
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from models.q_heads import TwinQHead
from stages.accel import Distributed
from stages.rl.checkpoint import TrainingCheckpoint, capture_rng, restore_rng
from stages.rl.env_worker import close_workers, env_worker
from stages.rl.configs import SACConfig
from stages.rl.policies import BoxObsAdapter, EncodedDrivingAdapter, ObsAdapter, make_obs_adapter
from stages.rl.replay import SHARED_FIELDS, ReplayBatch, ReplayBuffer
from stages.rl.scalars import ScalarWriter
from stages.rl.vector import as_vector_env, final_obs, final_values, vector_env_from_fns
from stages.training import ENCODER_PREFIXES

log = logging.getLogger(__name__)

__all__ = ["SACConfig", "SACTrainer", "EnvPool", "CHECKPOINT_BUFFER_BYTES"]

# Parameters the actor loss trains: DrivingVLA's and MLPActor's policy head (and the
# state-independent log-std of stages.rl.policies.MLPActorCritic, should one be given).
ACTOR_PREFIXES = ("policy_head", "log_std")
# The online replay buffer goes into a checkpoint up to this size: a 64 px driving buffer of ~20k
# raw transitions (or ~60k encoded), a Pendulum buffer of any size. Larger buffers would make
# every checkpoint a multi-GB write; a resumed run refills them instead.
CHECKPOINT_BUFFER_BYTES = 256 * 2**20


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


def _mode_matters(model: torch.nn.Module) -> bool:
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

_POLL_S = 0.2


class EnvPool:
    """Env constructors, each in a process of its own (`stages.rl.env_worker`), stepped one by one:
    an env's next action goes out as soon as its own step is back, not when the slowest env's is.

    Workers start with ``forkserver`` (or ``spawn``): forking a process that runs torch threads is
    unsafe, so the constructors must be picklable (`stages.envs.factory.env_fns`). Episodes reset
    in the worker on the step that ends them; the reply then carries the final observation.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], context: str | None = None) -> None:
        if not env_fns:
            raise ValueError("EnvPool needs at least one env constructor")
        ctx = mp.get_context(context if context in ("spawn", "forkserver") else "forkserver")
        self.num_envs = len(env_fns)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for fn in env_fns:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=env_worker, args=(child, fn), daemon=True, name="env-worker")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._index = {id(c): i for i, c in enumerate(self._conns)}
        self.in_flight: set[int] = set()
        try:
            spaces = [self._recv(i) for i in range(self.num_envs)]
        except BaseException:
            self.close()
            raise
        self.single_observation_space, self.single_action_space = spaces[0]

    def _recv(self, i: int) -> Any:
        try:
            status, payload = self._conns[i].recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"env worker {i} exited (code {self._procs[i].exitcode})") from exc
        if status != "ok":
            raise RuntimeError(f"env worker {i} failed:\n{payload}")
        return payload

    def reset(self, seed: int) -> list[Any]:
        """Every env's first observation (seeds ``seed + i``); steps in flight are dropped."""
        for i in sorted(self.in_flight):
            self._recv(i)
        self.in_flight.clear()
        for i, conn in enumerate(self._conns):
            conn.send(("reset", seed + i))
        return [self._recv(i) for i in range(self.num_envs)]

    def send(self, i: int, action: np.ndarray) -> None:
        self._conns[i].send(("step", action))
        self.in_flight.add(i)

    def ready(self, timeout: float | None) -> list[int]:
        """Envs in flight whose step is back (waits up to ``timeout`` for one)."""
        conns = [self._conns[i] for i in self.in_flight]
        return sorted(self._index[id(c)] for c in wait(conns, timeout)) if conns else []

    def recv(self, i: int) -> tuple[Any, float, bool, bool, tuple[Any, dict] | None]:
        """``(obs, reward, terminated, truncated, final)``; ``final`` = ``(final_obs, final_info)``
        when the step ended the episode (``obs`` then starts the next one)."""
        self.in_flight.discard(i)
        return self._recv(i)

    def close(self) -> None:
        close_workers(self._conns, self._procs)
        self._conns, self._procs, self.in_flight = [], [], set()


class _Learner:
    """The gradient updates in a thread of their own, while the main thread steps the envs.

    The main thread adds what each env step owes (``owe``: ``utd_ratio`` updates per step); the
    thread runs them. When it falls ``max_debt`` updates behind, ``owe`` waits (no new actions go
    out), so a learner slower than the envs lowers the step rate instead of ``utd_ratio``.
    ``paused()`` holds it between two updates (checkpoints, statistics).
    """

    def __init__(self, trainer: "SACTrainer", window: dict[str, list[float]], max_debt: float) -> None:
        self.trainer, self.window, self.max_debt = trainer, window, max_debt
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self._stop = False
        self._pauses = 0
        self._busy = False
        self.thread = threading.Thread(target=self._run, name="sac-learner", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t = self.trainer
        try:
            while True:
                with self.cond:
                    while not self._stop and (self._pauses or t._update_debt < 1.0):
                        self.cond.wait()
                    if self._stop:
                        return
                    self._busy = True
                with t._buffer_lock:
                    batch = t.buffer.sample(t.config.batch_size, t.rng, t.device)
                stats = t.update(batch)
                with self.cond:
                    t._update_debt -= 1.0
                    for key, value in stats.items():
                        self.window.setdefault(key, []).append(value)
                    self._busy = False
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread
            with self.cond:
                self.error, self._busy = exc, False
                self.cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError("the SAC learner thread failed") from self.error

    def owe(self, updates: float) -> None:
        with self.cond:
            self.trainer._update_debt += updates
            self.cond.notify_all()
            while self.trainer._update_debt > self.max_debt and self.error is None:
                self.cond.wait()
        self.check()

    def drain(self) -> None:
        """Wait until every owed update has run."""
        with self.cond:
            while self.trainer._update_debt >= 1.0 and self.error is None:
                self.cond.wait()
        self.check()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self.cond:
            self._pauses += 1
            while self._busy:
                self.cond.wait()
        try:
            yield
        finally:
            with self.cond:
                self._pauses -= 1
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join()


def _is_env_fns(env: Any) -> bool:
    return isinstance(env, Sequence) and not isinstance(env, (str, bytes)) and all(callable(f) for f in env)


class SACTrainer:
    """SAC on a vector env (updates overlapping its ``step_async``), a single env, or env
    constructors (an `EnvPool`: each env at its own pace, the updates in a learner thread).

    ``env``: a gymnasium ``VectorEnv`` with same-step autoreset, a single env (wrapped into a
    one-env vector), or a sequence of picklable env constructors (e.g.
    `stages.envs.factory.env_fns`), which the trainer starts and :meth:`close` stops. Under data
    parallelism constructors are built into a vector env instead: the ranks step in lockstep.
    """
    def __init__(self, model: torch.nn.Module, env: Any, config: SACConfig | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, offline_data: Any = None,
                 dist: Distributed | None = None):
        self.config = config or SACConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.dist = dist or Distributed()
        self.world_size = self.dist.world_size
        self._pool: EnvPool | None = None
        self._owns_env = False
        self.env: Any = None
        if _is_env_fns(env) and not self.dist.enabled:
            self._pool = EnvPool(list(env))
            self.num_envs = self._pool.num_envs
            obs_space, act_space = self._pool.single_observation_space, self._pool.single_action_space
        else:
            if _is_env_fns(env):
                env = vector_env_from_fns(list(env))
                self._owns_env = True
            self.env = as_vector_env(env)
            self.num_envs = self.env.num_envs
            obs_space, act_space = self.env.single_observation_space, self.env.single_action_space
        self.seed = seed
        try:
            self._build(obs_space, act_space, offline_data)
        except BaseException:
            self.close()  # the env processes started here
            raise

    def _build(self, obs_space: gym.Space, act_space: gym.Space, offline_data: Any) -> None:
        cfg, model = self.config, self.model
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

        self.rank_seed = self.seed + 1000 * self.dist.rank  # each rank's envs and minibatches of its own
        self.rng = np.random.default_rng(self.rank_seed)  # minibatches
        self.action_rng = np.random.default_rng([self.rank_seed, 1])  # random warm-up actions
        if self.dist.enabled:
            self._broadcast_from_rank0()
            # Action and reparameterisation noise of its own (the model was built alike on every rank).
            torch.manual_seed(self.rank_seed)

        self._mode_matters = _mode_matters(self.model)
        self.adapter, self.storage = self._storage_adapter(obs_space, feature_dim)
        self._box = isinstance(self.adapter, BoxObsAdapter)
        fields = self.adapter.fields()
        # The Box adapter calls its one field "obs"; the replay buffer and its batches call it "state".
        buffer_fields = {"state": fields["obs"]} if self._box else fields
        self.buffer = ReplayBuffer.for_fields(cfg.buffer_size, buffer_fields, action_dim, num_envs=self.num_envs,
                                              offline_ratio=cfg.offline_ratio)
        if offline_data is not None:
            if self.storage == "raw" and "tokens" in fields:
                self.buffer.add_offline_samples(offline_data, lambda texts: self.model.tokenize(texts).cpu())
            elif self.storage == "raw":
                self.buffer.add_offline_samples(offline_data)
            else:
                self._set_training(False)
                self.buffer.add_offline_samples(offline_data, encode=self._encode)
        elif cfg.offline_ratio > 0:
            log.warning("sac: offline_ratio=%s but no offline_data given: every batch is online", cfg.offline_ratio)

        self.global_step = 0
        self.updates = 0
        self.log_interval = 1000  # env steps between scalars, progress-bar updates and callbacks
        self.episode_returns: deque[float] = deque(maxlen=50)
        self.episode_completion: deque[float] = deque(maxlen=50)
        self._update_debt = 0.0
        self._updates_from = cfg.learning_starts  # global step from which updates are owed
        self._obs: Any = None
        self._encoded_obs: dict[str, np.ndarray] | None = None
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self._buffer_left_out_logged = False
        # The env pool's per-env state: the observation each env acts on, the action in flight.
        self._pool_obs: dict[str, np.ndarray] | None = None
        self._pool_actions = np.zeros((self.num_envs, action_dim), dtype=np.float32)
        # With a learner thread: the buffer is shared; the model too where its mode matters.
        self._buffer_lock = threading.Lock()
        self._model_lock = threading.Lock() if self._mode_matters else contextlib.nullcontext()

    # -- set-up ---------------------------------------------------------------------------------
    def _storage_adapter(self, obs_space: gym.Space, feature_dim: int) -> tuple[ObsAdapter, str]:
        """The adapter whose fields the replay buffer stores, and its kind (see the module docstring);
        sets ``self._compute_features`` to what turns its stored fields into features."""
        raw = make_obs_adapter(self.model, obs_space)
        self._compute_features: Callable[..., torch.Tensor] = self.model.compute_features
        if isinstance(raw, BoxObsAdapter):
            return raw, "raw"
        encoded = make_obs_adapter(self.model, obs_space, encoded=True) if self.config.freeze_encoders \
            or not self.trains_trunk else None
        if not isinstance(encoded, EncodedDrivingAdapter):
            encoded = None
        if not self.trains_trunk:
            inner, compute = (encoded, encoded.policy(self.model).compute_features) if encoded is not None \
                else (raw, self.model.compute_features)
            self._compute_features = lambda features: features.float()
            log.info("sac: the trunk does not train: the replay buffer stores the fused features")
            return FeatureAdapter(inner, compute, feature_dim, self.device), "features"
        if encoded is not None:
            if _nbytes(encoded.fields()) <= _nbytes(raw.fields()):
                self._compute_features = encoded.policy(self.model).compute_features
                log.info("sac: frozen encoders: the replay buffer stores their outputs (%d bytes an observation)",
                         _nbytes(encoded.fields()))
                return encoded, "encoded"
            log.info("sac: frozen encoders, but their outputs (%d bytes) outweigh the raw observation (%d): "
                     "storing the observation", _nbytes(encoded.fields()), _nbytes(raw.fields()))
        return raw, "raw"

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model, self.critic, self.critic_target]

    @torch.no_grad()
    def _broadcast_from_rank0(self) -> None:
        """Start every rank from rank 0's weights; averaged gradients keep them equal after that."""
        for module in self._modules():
            for tensor in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)
        torch.distributed.broadcast(self.log_alpha.data, src=0)

    # -- observations -------------------------------------------------------------------------
    # The replay buffer calls a flat observation "state"; the Box adapter calls it "obs".
    def _encode(self, obs: Any) -> dict[str, np.ndarray]:
        """A batched env observation -> the arrays the replay buffer stores."""
        # Copies: a vector env may reuse its observation arrays (SyncVectorEnv with copy=False).
        fields = {k: np.array(v) for k, v in self.adapter.encode(obs).items()}
        return {"state": fields["obs"]} if self._box else fields

    def _encode_one(self, obs: Any) -> dict[str, np.ndarray]:
        return self._encode(self.adapter.batch_one(obs))

    def _inputs(self, obs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Stored arrays (numpy or torch) -> the model's positional inputs on the device."""
        t = {k: torch.as_tensor(v, device=self.device) for k, v in obs.items()}
        return self.adapter.model_inputs({"obs": t["state"]} if self._box else t)

    # -- acting -------------------------------------------------------------------------------
    def _set_training(self, mode: bool) -> None:
        # Module.train() walks every submodule (~0.5 ms for DrivingVLA, paid twice per env step):
        # only where dropout or batch norm makes the two modes differ.
        if self._mode_matters and self.model.training != mode:
            self.model.train(mode)

    @torch.no_grad()
    def _policy_actions(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        with self._model_lock:
            self._set_training(False)
            features = self._compute_features(*self._inputs(encoded))
            return self.model.distribution(self.model.policy_params(features)).sample().cpu().numpy()

    def _actions(self, encoded: dict[str, np.ndarray], count: int) -> np.ndarray:
        """Actions for ``count`` encoded observations: uniform before ``learning_starts`` (with
        ``random_warmup``), else sampled from the policy."""
        if self.config.random_warmup and self.global_step < self.config.learning_starts:
            return self.action_rng.uniform(self.action_low, self.action_high,
                                           size=(count, self.action_low.size)).astype(np.float32)
        return self._policy_actions(encoded)

    def _reset_seed(self) -> int:
        # A resumed run starts new episodes from seeds of its own, not the first run's.
        return self.rank_seed + 7919 * self.global_step

    def _record_episode_ends(self, envs: Sequence[int], done: np.ndarray, completion: Callable[[int], Any]) -> None:
        for j in np.flatnonzero(done):
            i = envs[j]
            self.episode_returns.append(float(self._ep_return[i]))
            value = completion(j)
            if value is not None:
                self.episode_completion.append(float(value))
            self._ep_return[i] = 0.0

    def collect_step(self, during: Callable[[], None] | None = None) -> None:
        """One vector-env step stored in the replay buffer. ``during()`` runs while the envs step
        (between ``step_async`` and ``step_wait`` where the vector env has them, else before the
        step). With an `EnvPool`, the steps of whichever envs are back (at least one)."""
        if self._pool is not None:
            if during is not None:
                during()
            while not self._pool_round():
                pass
            return
        if self._obs is None:
            self._obs, _ = self.env.reset(seed=self._reset_seed())
            self._encoded_obs = self._encode(self._obs)
            self._ep_return[:] = 0.0
        encoded = self._encoded_obs
        actions = self._actions(encoded, self.num_envs)
        if during is not None and hasattr(self.env, "step_async"):
            self.env.step_async(actions)
            try:
                during()
            except BaseException:
                try:  # leave the vector env ready for close(), not waiting on a step
                    self.env.step_wait()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
                raise
            next_obs, reward, terminated, truncated, infos = self.env.step_wait()
        else:
            if during is not None:
                during()
            next_obs, reward, terminated, truncated, infos = self.env.step(actions)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        done = terminated | truncated
        next_encoded = self._encode(next_obs)
        stored_next = {k: v.copy() for k, v in next_encoded.items()} if done.any() else next_encoded
        for i in np.flatnonzero(done):
            # Same-step autoreset: next_obs[i] is already the reset observation; the transition
            # must end in the real final observation (bootstrapped from when truncated).
            fo = final_obs(infos, i)
            if fo is None:
                raise RuntimeError("the vector env did not return info['final_obs']; build it with "
                                   "autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP")
            for key, value in self._encode_one(fo).items():
                stored_next[key][i] = value[0]
        with self._buffer_lock:
            self.buffer.add(encoded, actions, reward, stored_next, terminated, done)
        self._ep_return += np.asarray(reward, dtype=np.float64)
        self._record_episode_ends(range(self.num_envs), done, lambda i: final_values(infos, "route_completion", i))
        # The next step's observation is encoded already (before the final observations went in).
        self._obs, self._encoded_obs = next_obs, next_encoded
        self.global_step += self.num_envs * self.world_size

    def _pool_send(self, envs: np.ndarray) -> None:
        actions = self._actions({k: v[envs] for k, v in self._pool_obs.items()}, len(envs))
        self._pool_actions[envs] = actions
        for i, action in zip(envs, actions):
            self._pool.send(int(i), action)

    def _pool_round(self) -> int:
        """Store the steps of the envs that are back and send them their next actions; returns
        how many steps were stored (0 when none came back within a poll interval)."""
        pool = self._pool
        if self._pool_obs is None:
            first = pool.reset(self._reset_seed())
            self._pool_obs = self._encode(self.adapter.stack(first))
            self._ep_return[:] = 0.0
            self._pool_send(np.arange(self.num_envs))
            return 0
        ready = pool.ready(_POLL_S)
        if not ready:
            return 0
        replies = [pool.recv(i) for i in ready]
        envs = np.asarray(ready, dtype=np.int64)
        ended = [j for j, r in enumerate(replies) if r[4] is not None]
        # One forward pass for the new observations and the final ones of ended episodes.
        encoded = self._encode(self.adapter.stack([r[0] for r in replies] + [replies[j][4][0] for j in ended]))
        k = len(ready)
        obs = {key: v[envs] for key, v in self._pool_obs.items()}
        actions = self._pool_actions[envs]
        stored_next = {key: v[:k].copy() for key, v in encoded.items()}
        for m, j in enumerate(ended):
            for key, v in encoded.items():
                stored_next[key][j] = v[k + m]
        for key, v in encoded.items():
            self._pool_obs[key][envs] = v[:k]
        self._pool_send(envs)  # the envs step again while their transitions are stored
        rewards = np.array([r[1] for r in replies], dtype=np.float32)
        terminated = np.array([r[2] for r in replies], dtype=bool)
        done = terminated | np.array([r[3] for r in replies], dtype=bool)
        with self._buffer_lock:
            self.buffer.add(obs, actions, rewards, stored_next, terminated, done, envs=envs)
        self._ep_return[envs] += rewards
        self._record_episode_ends(envs, done, lambda j: replies[j][4][1].get("route_completion"))
        self.global_step += k * self.world_size
        return k

    # -- update ---------------------------------------------------------------------------------
    def _log_prob_scaled(self, log_prob: torch.Tensor) -> torch.Tensor:
        return log_prob + self._log_scale

    def _average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # Every rank runs the same graph, so the same parameters have gradients on every rank.
        if self.dist.enabled:
            self.dist.average_gradients([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None])

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        if self.config.max_grad_norm is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)

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
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self._average_gradients(self.critic_optimizer)
        self._clip(self.critic_optimizer)
        self.critic_optimizer.step()

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
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self._average_gradients(self.actor_optimizer)
        self._clip(self.actor_optimizer)
        self.actor_optimizer.step()
        stats = {"actor_loss": actor_loss.item(), "entropy": -log_prob.mean().item()}
        if self.alpha_optimizer is not None:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
            self.alpha_optimizer.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self._average_gradients(self.alpha_optimizer)
            self.alpha_optimizer.step()
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
        if ckpt is not None and resume and (state := ckpt.load()) is not None:
            if (misfit := self._misfit(state)) is not None:
                # Every rank reads the same file, so every rank decides alike.
                log.warning("sac: %s does not fit this trainer (%s); starting afresh", ckpt.path, misfit)
            else:
                self.load_state_dict(state)
                log.info("sac: resumed at step %d (update %d) from %s", self.global_step, self.updates, ckpt.path)
        writer = ScalarWriter(save_dir) if save_dir is not None and main else None
        start, start_step = time.perf_counter(), self.global_step
        bar = tqdm(total=total_timesteps, initial=min(self.global_step, total_timesteps), desc="sac", unit="step",
                   disable=None if main else True)
        window: dict[str, list[float]] = {}
        stats: dict[str, float] = {}
        next_log = self.global_step + self.log_interval
        next_ckpt = (self.global_step // checkpoint_every_steps + 1) * checkpoint_every_steps
        saved_at: int | None = None
        learner: _Learner | None = None
        threads_before = torch.get_num_threads()

        def run_updates() -> None:
            while self._update_debt >= 1.0:
                for key, value in self.update().items():
                    window.setdefault(key, []).append(value)
                self._update_debt -= 1.0

        def save() -> None:
            nonlocal saved_at
            with learner.paused() if learner is not None else contextlib.nullcontext():
                self._save(ckpt, checkpoint_buffer_bytes)
            saved_at = self.global_step

        try:
            if self._pool is not None:
                # Two threads (acting, learning) of one intra-op thread each: more would oversubscribe.
                torch.set_num_threads(1)
                learner = _Learner(self, window, max_debt=max(2.0, 2 * self.num_envs * cfg.utd_ratio))
            while self.global_step < total_timesteps:
                before = self.global_step
                if learner is None:
                    # The updates this step is owed run while its envs step, on what is stored so far.
                    if before + self.num_envs * self.world_size >= self._updates_from and len(self.buffer) > 0:
                        self._update_debt += self.num_envs * cfg.utd_ratio
                    self.collect_step(during=run_updates)
                else:
                    learner.check()
                    if not self._pool_round():
                        continue
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
        """Stop the env workers of an `EnvPool` or a vector env this trainer built."""
        if self._pool is not None:
            self._pool.close()
        if self._owns_env and self.env is not None:
            self.env.close()

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
    def _save(self, ckpt: TrainingCheckpoint, buffer_bytes: int) -> None:
        """Write the checkpoint (rank 0), with every rank's own part gathered into it."""
        size = self.buffer.online_nbytes
        include = size <= buffer_bytes
        if not include and not self._buffer_left_out_logged:
            log.warning("sac: the replay buffer (%.0f MiB) exceeds checkpoint_buffer_bytes (%.0f MiB): checkpoints "
                        "leave it out and a resumed run refills it", size / 2**20, buffer_bytes / 2**20)
            self._buffer_left_out_logged = True
        local = self._local_state(include)
        if not self.dist.enabled:
            ckpt.save({**self._shared_state(), **local})
            return
        parts: list[Any] | None = [None] * self.world_size if self.dist.is_main else None
        torch.distributed.gather_object(local, parts, dst=0)
        if self.dist.is_main:
            ckpt.save({**self._shared_state(), "ranks": parts})

    def _shared_state(self) -> dict[str, Any]:
        """What is the same on every rank: weights, optimisers, α, counters."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "log_alpha": self.log_alpha.detach().cpu(),
            "alpha_optimizer": self.alpha_optimizer.state_dict() if self.alpha_optimizer is not None else None,
            "global_step": self.global_step, "updates": self.updates, "update_debt": self._update_debt,
            "updates_from": self._updates_from, "world_size": self.world_size, "storage": self.storage,
        }

    def _local_state(self, include_buffer: bool) -> dict[str, Any]:
        """What each rank has of its own: RNG states, episode statistics, the replay buffer."""
        state: dict[str, Any] = {"rng": {**capture_rng(), "trainer": self.rng.bit_generator.state,
                                         "actions": self.action_rng.bit_generator.state},
                                 "episode_returns": list(self.episode_returns),
                                 "episode_completion": list(self.episode_completion)}
        if include_buffer:
            state["buffer"] = self.buffer.state_dict()
        return state

    def state_dict(self, include_buffer: bool = False) -> dict[str, Any]:
        """Model, critics, targets, optimisers, alpha, counters, RNG states and episode statistics;
        the replay buffer's online part when ``include_buffer`` (it can be large: ``buffer_size``
        observations). Under data parallelism this is this rank's view (`train` gathers all ranks')."""
        return {**self._shared_state(), **self._local_state(include_buffer)}

    def _misfit(self, state: dict[str, Any]) -> str | None:
        """Why ``state`` cannot be resumed here (another algorithm's checkpoint in the same
        directory, other settings), or None. Checked before loading, which would change weights
        part way through."""
        if not all(k in state for k in ("model", "critic", "critic_target", "global_step")):
            return "not a SAC checkpoint"
        if state.get("storage", self.storage) != self.storage:
            return f"its replay buffer holds {state['storage']}, this trainer's {self.storage}"
        for name, module in (("model", self.model), ("critic", self.critic)):
            mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            if {k: tuple(v.shape) for k, v in state[name].items()} != mine:
                return f"its {name} has other parameters or shapes"
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` or a checkpoint; the envs start fresh episodes."""
        if state.get("storage", self.storage) != self.storage:
            raise ValueError(f"the state was saved with a replay buffer of {state['storage']}, this trainer stores "
                             f"{self.storage}: train with the same freeze_encoders / train_trunk")
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

        parts = state["ranks"] if "ranks" in state else [state]
        local = parts[self.dist.rank] if self.dist.rank < len(parts) else None
        if local is not None:
            restore_rng(local["rng"])
            self.rng.bit_generator.state = local["rng"]["trainer"]
            self.action_rng.bit_generator.state = local["rng"]["actions"]
            self.episode_returns.extend(local.get("episode_returns", []))
            self.episode_completion.extend(local.get("episode_completion", []))
            if "buffer" in local:
                self.buffer.load_state_dict(local["buffer"])
        else:  # a rank the saved run did not have: streams of its own
            self.rng = np.random.default_rng([self.rank_seed, self.global_step])
            self.action_rng = np.random.default_rng([self.rank_seed, self.global_step, 1])
            torch.manual_seed(self.rank_seed + 7919 * self.global_step)
        self._updates_from = max(self.config.learning_starts, int(state.get("updates_from", 0)))
        # Decided alike on every rank (from the same file), so the ranks' updates stay in step.
        if len(parts) != self.world_size or not all("buffer" in p for p in parts):
            refill = math.ceil(self.config.batch_size / self.num_envs) * self.num_envs * self.world_size
            self._updates_from = max(self._updates_from, self.global_step + refill)
            log.info("sac: the state holds no replay buffer for this run: no updates until step %d refills it",
                     self._updates_from)
        self._obs = None
        self._encoded_obs = None
        self._pool_obs = None
