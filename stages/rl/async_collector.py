"""Asynchronous rollout collection: env workers keep stepping while the learner updates.

Why: with a simulator that takes a fixed time per step (CARLA at 25 FPS: 40 ms), a synchronous
PPO loop leaves every simulator idle for the whole update (seconds). Here the learner never stalls
them:

```
learner (main process)          collector process                    env workers (one process each)
  get() ◄── full rollout ────── batched policy inference ◄── obs ───── env.step (40 ms, sleeping)
  update (seconds)              behaviour = last published weights ── action ──►
  publish(weights) ──────────►  (shared memory, versioned)
  release(buffer) ───────────►  next free rollout buffer (shared memory)
```

- **Overlap.** While the learner updates on rollout *k*, the collector fills rollout *k + 1* with the
  weights of update *k − 1*: the behaviour policy is at most one update behind (``policy_lag``
  in the statistics). PPO's ratio is taken against the stored behaviour log-probabilities, so
  the lag is corrected exactly as PPO corrects the drift over its own epochs.
- **Pipelined inference.** Each env runs at its own pace: the collector waits for *any* worker,
  infers actions for the envs whose observations have arrived (one batch) and sends them back at
  once, while the other envs are still stepping. No env waits for the slowest one.
- **Backpressure.** Rollout buffers (``num_slots``, default 2) are shared-memory arrays; when the
  learner holds them all, the collector waits. So a learner slower than the simulators shows up
  as a lower step rate, not as an unbounded lag.

Same-step autoreset happens in the workers; a time-limit truncation is bootstrapped with
``gamma * V(final_obs)`` (behaviour critic) added to the step's reward, as in the synchronous path.
The learner computes GAE (`RolloutBuffer.compute_advantages`) with the stored behaviour values.

Processes start with ``forkserver`` (or ``spawn``): forking a process that already runs torch
threads is unsafe. Env constructors must therefore be picklable (`stages.envs.factory.env_fns`).
"""
from __future__ import annotations

import copy
import logging
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch

from stages.rl.buffers import RolloutBuffer
from stages.rl.policies import ObsAdapter
from stages.rl.workers import EnvPipes, EnvWorkerError, EnvWorkers, start_context

log = logging.getLogger(__name__)

__all__ = ["AsyncCollector", "CollectorError"]

_POLL_S = 0.2


class CollectorError(EnvWorkerError):
    """An env worker or the collector process failed; the message carries its traceback."""


# ---------------------------------------------------------------------------------------------
# collector process: batched inference for whichever envs are ready, writes rollouts in place


@dataclass
class _Shared:
    """What the learner and the collector process share (queues, counters, the published weights)."""
    model: torch.nn.Module         # the behaviour weights, in shared memory
    buffers: list[RolloutBuffer]   # the rollout slots, in shared memory
    free: Any                      # slots the learner handed back
    full: Any                      # ("rollout", slot, stats) or ("error", traceback)
    version: Any                   # bumped by every publish
    lock: Any                      # held while the weights are written or read
    stop: Any
    steps: Any                     # env steps closed so far
    first_step: Any                # time.monotonic() of the first actions sent


class _Value:
    """``multiprocessing.Value``'s interface for the thread mode."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


@dataclass
class _Slot:
    """A rollout buffer being filled, and what the learner gets with it."""
    index: int                     # which of the shared buffers
    episode_returns: list[float] = field(default_factory=list)   # episodes that ended in it
    episode_completion: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)            # weight versions its actions came from
    columns: int = 0               # envs whose rows in it are complete


@dataclass
class _Collection:
    """The collector process's state: where each env's next row goes, and the slots being filled."""
    num_envs: int
    slots: list[_Slot] = field(default_factory=list)  # in the order the learner gets them
    seq: list[int] = field(init=False)       # which entry of ``slots`` env i is writing
    pos: list[int] = field(init=False)       # next row of env i in that slot
    starts: np.ndarray = field(init=False)   # the observation env i holds starts an episode
    ep_return: np.ndarray = field(init=False)
    infer_seconds: float = 0.0               # inference time, batches and observations since the
    batches: int = 0                         # last rollout went out (for its statistics)
    observations: int = 0

    def __post_init__(self) -> None:
        n = self.num_envs
        self.seq, self.pos = [0] * n, [0] * n
        self.starts = np.ones(n, dtype=bool)
        self.ep_return = np.zeros(n, dtype=np.float64)

    def timing(self) -> dict[str, float]:
        """The inference statistics of the rollout that goes out now; counting starts again."""
        out = {"inference_ms": 1000 * self.infer_seconds / max(1, self.batches),
               "inference_batch": self.observations / max(1, self.batches)}
        self.infer_seconds, self.batches, self.observations = 0.0, 0, 0
        return out


def _collector_main(pipes: EnvPipes, shared: _Shared, adapter: ObsAdapter, rollout_len: int, gamma: float,
                    seed: int, actor: Any = None) -> None:
    """The collector's body, in a process of its own (``actor`` None: a CPU copy of the weights, one
    thread) or in a thread of the learner's process (``actor``: a `DeviceActor`)."""
    if actor is None:
        torch.set_num_threads(1)
    torch.manual_seed(seed)  # the behaviour's sampling noise: same seed, same rollouts
    try:
        _collect(pipes, shared, actor or _CpuActor(shared, adapter), rollout_len, gamma, seed)
    except _Stopped:
        pass
    except Exception:  # noqa: BLE001 - handed to the learner, which raises it
        shared.full.put(("error", traceback.format_exc()))


class _CpuActor:
    """The process mode's inference: a private CPU copy of the weights, refreshed on a new version."""

    def __init__(self, shared: _Shared, adapter: ObsAdapter) -> None:
        self.shared, self.adapter = shared, adapter
        self.model = copy.deepcopy(shared.model).eval()
        adapter.bind(self.model)
        self.policy = adapter.policy(self.model)
        self.version = -1

    @torch.no_grad()
    def infer(self, observations: list[Any]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, int]:
        if self.shared.version.value != self.version:
            with self.shared.lock:
                self.model.load_state_dict(self.shared.model.state_dict())
                self.version = self.shared.version.value
        fields = self.adapter.encode(self.adapter.stack(observations))
        inputs = self.adapter.model_inputs({k: torch.from_numpy(v) for k, v in fields.items()})
        action, log_prob, value = self.policy.act(*inputs)
        return fields, action.float().numpy(), log_prob.float().numpy(), value.float().numpy(), self.version


class _Stopped(Exception):
    pass


def _collect(pipes: EnvPipes, shared: _Shared, actor: Any, rollout_len: int, gamma: float, seed: int) -> None:
    n = pipes.num_envs
    state = _Collection(n)
    seq, pos, starts, ep_return = state.seq, state.pos, state.starts, state.ep_return

    def acquire(k: int, timeout: float) -> bool:
        """Own the slots up to ``k`` (buffers the learner handed back, in order); False if the
        learner still holds the next one after ``timeout`` seconds (0: don't wait)."""
        while len(state.slots) <= k:
            try:
                s = shared.free.get(timeout=timeout) if timeout else shared.free.get_nowait()
            except queue.Empty:
                return False
            state.slots.append(_Slot(s))
        return True

    def next_slot(i: int) -> int:
        """The slot env i's next row goes to (the next one when the step it took ends its column)."""
        return seq[i] + int(i in results and pos[i] + 1 == rollout_len)

    def arrive(timeout: float) -> None:
        for i in pipes.ready(timeout):
            obs, reward, terminated, truncated, final = pipes.recv(i)
            new_obs[i], results[i] = obs, (obs, reward, terminated, truncated, final)
            waiting.append(i)

    new_obs = dict(enumerate(pipes.reset(seed)))
    results: dict[int, tuple] = {}   # the step each waiting env took, until it is written
    waiting = list(range(n))         # envs whose observation is here and whose action is not sent

    while True:
        if shared.stop.is_set():
            raise _Stopped
        # Buffers first: waiting for the learner to free one must happen *before* inference, so the
        # actions come from the newest weights once it does (the lag stays at most one update).
        # An env whose next row is in a buffer the learner still holds waits alone; the others go
        # on. (Waiting for it with the others' steps unwritten deadlocked when one env ran a whole
        # rollout ahead: the buffers the others were filling could never fill.)
        ready = sorted(i for i in waiting if acquire(next_slot(i), 0))
        if not ready:
            if pipes.in_flight:
                arrive(0.01)  # the others' steps; a waiting env looks for its buffer every 10 ms
            else:  # every env waits for the learner: the oldest buffer is full, the learner has it
                acquire(min(next_slot(i) for i in waiting), _POLL_S)
            continue
        waiting = [i for i in waiting if i not in ready]

        # One forward pass: actions for the ready envs, values of truncated episodes' final observations.
        boot = [i for i in ready if i in results and results[i][3] and not results[i][2] and results[i][4] is not None]
        batch = [new_obs[i] for i in ready] + [results[i][4][0] for i in boot]
        t_infer = time.perf_counter()
        fields, actions, log_probs, values, local_version = actor.infer(batch)
        state.infer_seconds += time.perf_counter() - t_infer
        state.batches += 1
        state.observations += len(ready)
        boot_value = dict(zip(boot, values[len(ready):]))
        # Count the steps closed below before any rollout they complete is handed to the learner,
        # so steps_taken never lags a rollout the learner already holds.
        closed = sum(1 for i in ready if i in results)
        if closed:
            with shared.steps.get_lock():
                shared.steps.value += closed

        for j, i in enumerate(ready):
            if i in results:  # close the step env i just took
                _, reward, terminated, truncated, final = results.pop(i)
                k = seq[i]
                buf, info = shared.buffers[state.slots[k].index], state.slots[k]
                buf.rewards[pos[i], i] = reward + gamma * boot_value.get(i, 0.0)
                ep_return[i] += reward
                done = terminated or truncated
                if done:
                    info.episode_returns.append(float(ep_return[i]))
                    final_info = final[1] if final is not None else {}
                    info.episode_completion.append(float(final_info.get("route_completion", 0.0)))
                    ep_return[i] = 0.0
                starts[i] = done
                pos[i] += 1
                if pos[i] == rollout_len:  # env i's column is complete: bootstrap, move to the next slot
                    buf.last_values[i], buf.last_dones[i] = values[j], done
                    info.columns += 1
                    if info.columns == n:
                        shared.full.put(("rollout", info.index, {
                            "episode_returns": info.episode_returns,
                            "episode_completion": info.episode_completion,
                            "oldest_version": min(info.versions), "newest_version": max(info.versions),
                            **state.timing()}))
                    seq[i], pos[i] = k + 1, 0
            k = seq[i]
            buf = shared.buffers[state.slots[k].index]  # acquired above
            t = pos[i]
            for name, arr in fields.items():
                buf.obs[name][t, i] = arr[j]
            buf.actions[t, i], buf.log_probs[t, i], buf.values[t, i] = actions[j], log_probs[j], values[j]
            buf.dones[t, i] = starts[i]
            state.slots[k].versions.append(local_version)
            pipes.send(i, actions[j])
        if shared.first_step.value == 0.0:
            shared.first_step.value = time.monotonic()

        while not waiting:  # every env is stepping: wait for any of them
            if shared.stop.is_set():
                raise _Stopped
            arrive(_POLL_S)


# ---------------------------------------------------------------------------------------------
# the learner's handle


class AsyncCollector:
    """Env workers plus a collector process, driven by the learner through :meth:`get`,
    :meth:`publish` and :meth:`release`.

    Construction starts the env workers (so :attr:`observation_space` and :attr:`action_space`
    are known); :meth:`start` starts collecting with a copy of ``model``; :meth:`stop` ends the
    collector and the workers (a later :meth:`start` spawns new ones).
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], context: str | None = None) -> None:
        if not env_fns:
            raise ValueError("AsyncCollector needs at least one env constructor")
        self._ctx = start_context(context)
        self._context = context
        self.env_fns = list(env_fns)
        self.num_envs = len(self.env_fns)
        self._workers: EnvWorkers | None = None
        self._proc: Any = None
        self._shared: _Shared | None = None
        self._held: dict[int, int] = {}
        # get() gives up when no env step closes for this long (a simulator tick is milliseconds
        # to a second; CARLA's client times out sooner).
        self.stall_seconds = 600.0
        self._spawn_workers()

    def _spawn_workers(self) -> None:
        try:
            self._workers = EnvWorkers(self.env_fns, context=self._context)
        except EnvWorkerError as exc:
            raise CollectorError(str(exc)) from exc
        self.observation_space = self._workers.single_observation_space
        self.action_space = self._workers.single_action_space

    # -- collecting -----------------------------------------------------------------------------
    def start(self, model: torch.nn.Module, adapter: ObsAdapter, rollout_len: int, action_dim: int,
              gamma: float, seed: int = 0, num_slots: int = 2, device: str | torch.device | None = None,
              bf16: bool = False, graphs: bool = True) -> None:
        """Start collecting with a copy of ``model``'s weights.

        ``device`` None: the collector is a process of its own with a CPU copy (one thread; the CPU
        machines' path). Else it is a thread of this process, inferring on ``device`` (the learner's
        GPU) through a `DeviceActor` (``bf16``: the update's autocast; ``graphs``: CUDA graphs),
        and :meth:`publish` copies the weights device to device. Under torchrun each rank starts
        its own, on its own GPU.
        """
        if self._proc is not None:
            raise RuntimeError("the collector is already running")
        if self._workers is None:
            self._spawn_workers()
        threaded = device is not None
        behaviour = copy.deepcopy(model).to(device if threaded else "cpu").eval()
        for p in behaviour.parameters():
            p.requires_grad_(False)
        if not threaded:
            behaviour.share_memory()
        buffers = self._shared.buffers if self._shared is not None else []
        if (not buffers or buffers[0].num_steps != rollout_len or len(buffers) != num_slots
                or buffers[0].shared == threaded):
            buffers = [RolloutBuffer(rollout_len, self.num_envs, adapter.fields(), action_dim, shared=not threaded)
                       for _ in range(num_slots)]
        if threaded:
            self._shared = _Shared(behaviour, buffers, free=queue.Queue(), full=queue.Queue(), version=_Value(0),
                                   lock=threading.Lock(), stop=threading.Event(), steps=_Value(0),
                                   first_step=_Value(0.0))
        else:
            ctx = self._ctx
            self._shared = _Shared(behaviour, buffers, free=ctx.Queue(), full=ctx.Queue(), version=ctx.Value("i", 0),
                                   lock=ctx.Lock(), stop=ctx.Event(), steps=ctx.Value("q", 0),
                                   first_step=ctx.Value("d", 0.0))
        for s in range(num_slots):
            self._shared.free.put(s)
        self._held = {}
        args = (self._workers.pipes, self._shared, adapter, rollout_len, gamma, seed)
        if threaded:
            from stages.rl.device_actor import DeviceActor

            actor = DeviceActor(behaviour, adapter, torch.device(device), bf16, graphs, self._shared.lock,
                                self._shared.version)
            # The learner's Python and the collector's share the GIL: a short switch interval lets
            # an env's action out within a fraction of a millisecond of its observation.
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch_interval, 0.0005))
            self._proc = threading.Thread(target=_collector_main, name="rollout-collector", daemon=True,
                                          args=(*args, actor))
        else:
            self._proc = self._ctx.Process(target=_collector_main, name="rollout-collector", daemon=True, args=args)
        self._proc.start()

    def get(self) -> tuple[RolloutBuffer, dict[str, Any]]:
        """The next full rollout (blocks) and its statistics; hand it back with :meth:`release`."""
        steps, since = self.steps_taken, time.monotonic()
        while True:
            try:
                msg = self._shared.full.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    code = getattr(self._proc, "exitcode", None)
                    raise CollectorError(f"the collector exited (code {code})") from None
                if self.steps_taken != steps:
                    steps, since = self.steps_taken, time.monotonic()
                elif time.monotonic() - since > self.stall_seconds:  # a wait must never be forever
                    raise CollectorError(f"no env step came back for {self.stall_seconds:.0f} s "
                                         "(an env worker or the collector is stuck)") from None
        if msg[0] == "error":
            raise CollectorError(msg[1])
        _, slot, stats = msg
        buffer = self._shared.buffers[slot]
        self._held[id(buffer)] = slot
        stats["policy_lag"] = float(self._shared.version.value - stats.pop("oldest_version"))
        stats.pop("newest_version")
        return buffer, stats

    def publish(self, model: torch.nn.Module) -> None:
        """Make ``model``'s current weights the behaviour policy of the next inferences."""
        source = model.state_dict()
        with self._shared.lock:
            with torch.no_grad():
                for name, tensor in self._shared.model.state_dict().items():
                    tensor.copy_(source[name])  # device to device in thread mode
                if source and next(iter(source.values())).is_cuda:
                    # The copies ran on the learner's stream; the actor's stream must see them done.
                    torch.cuda.current_stream().synchronize()
            self._shared.version.value += 1

    def release(self, buffer: RolloutBuffer) -> None:
        self._shared.free.put(self._held.pop(id(buffer)))

    @property
    def steps_taken(self) -> int:
        """Env steps completed by the workers since :meth:`start` (used and in flight)."""
        return int(self._shared.steps.value) if self._proc is not None else 0

    @property
    def first_step_time(self) -> float | None:
        """``time.monotonic()`` when the first actions went to the envs (None before)."""
        value = float(self._shared.first_step.value) if self._proc is not None else 0.0
        return value or None

    def stop(self) -> None:
        """End the collector process and the env workers; in-flight steps are dropped."""
        if self._proc is not None:
            self._shared.stop.set()
            self._proc.join(timeout=10)
            if isinstance(self._proc, threading.Thread):
                sys.setswitchinterval(self._switch_interval)
                if self._proc.is_alive():  # it waits on a pipe at most _POLL_S; dropping the workers ends it
                    log.warning("the collector thread did not stop within 10 s")
            else:
                if self._proc.is_alive():
                    self._proc.terminate()
                    self._proc.join(timeout=1)
                for q in (self._shared.free, self._shared.full):
                    q.cancel_join_thread()
                    q.close()
            self._proc = None
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    close = stop

    def __del__(self) -> None:  # a trainer dropped without close() must not leak processes
        try:
            self.stop()
        except Exception:  # noqa: BLE001
            pass
