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
import time
import traceback
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
from multiprocessing.connection import Connection, wait

from stages.rl.buffers import RolloutBuffer
from stages.rl.env_worker import close_workers, env_worker
from stages.rl.policies import ObsAdapter

log = logging.getLogger(__name__)

__all__ = ["AsyncCollector", "CollectorError"]

_POLL_S = 0.2


class CollectorError(RuntimeError):
    """An env worker or the collector process failed; the message carries its traceback."""


# ---------------------------------------------------------------------------------------------
# collector process: batched inference for whichever envs are ready, writes rollouts in place


def _collector_main(conns: list[Connection], shared_model: torch.nn.Module, adapter: ObsAdapter,
                    buffers: list[RolloutBuffer], free_q: Any, full_q: Any, version: Any, lock: Any,
                    stop: Any, steps: Any, first_step: Any, rollout_len: int, gamma: float, seed: int) -> None:
    torch.set_num_threads(1)
    try:
        _collect(conns, shared_model, adapter, buffers, free_q, full_q, version, lock, stop, steps, first_step,
                 rollout_len, gamma, seed)
    except _Stopped:
        pass
    except Exception:  # noqa: BLE001 - handed to the learner, which raises it
        full_q.put(("error", traceback.format_exc()))


class _Stopped(Exception):
    pass


def _recv(conn: Connection) -> Any:
    status, payload = conn.recv()
    if status != "ok":
        raise CollectorError(f"env worker failed:\n{payload}")
    return payload


def _collect(conns, shared_model, adapter, buffers, free_q, full_q, version, lock, stop, steps, first_step,
             rollout_len, gamma, seed) -> None:
    n = len(conns)
    model = copy.deepcopy(shared_model).eval()
    adapter.bind(model)
    policy = adapter.policy(model)
    local_version = -1
    index = {id(c): i for i, c in enumerate(conns)}

    slot_seq: list[int] = []                 # buffer slots in the order the learner gets them
    slot_info: list[dict[str, Any]] = []     # per slot: episodes that ended in it, versions used, columns done
    seq = [0] * n                            # which entry of slot_seq env i is writing
    pos = [0] * n                            # next row of env i in that slot
    starts = np.ones(n, dtype=bool)          # the observation env i holds starts an episode
    ep_return = np.zeros(n, dtype=np.float64)
    timing = [0.0, 0, 0]                     # inference seconds, batches, observations (for the stats)

    def slot(k: int) -> RolloutBuffer:
        while len(slot_seq) <= k:
            while True:  # wait for the learner to hand a buffer back (backpressure)
                if stop.is_set():
                    raise _Stopped
                try:
                    s = free_q.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    continue
            slot_seq.append(s)
            slot_info.append({"episode_returns": [], "episode_completion": [], "versions": [], "columns": 0})
        return buffers[slot_seq[k]]

    for i, c in enumerate(conns):
        c.send(("reset", seed + i))
    new_obs = {i: _recv(c) for i, c in enumerate(conns)}
    results: dict[int, tuple] = {}
    ready = list(range(n))

    while not stop.is_set():
        # Buffers first: waiting for the learner to free one must happen *before* inference, so the
        # actions come from the newest weights once it does (the lag stays at most one update).
        for i in ready:
            slot(seq[i] + int(i in results and pos[i] + 1 == rollout_len))
        if version.value != local_version:
            with lock:
                model.load_state_dict(shared_model.state_dict())
                local_version = version.value

        # One forward pass: actions for the ready envs, values of truncated episodes' final observations.
        boot = [i for i in ready if i in results and results[i][3] and not results[i][2] and results[i][4] is not None]
        batch = [new_obs[i] for i in ready] + [results[i][4][0] for i in boot]
        t_infer = time.perf_counter()
        with torch.inference_mode():
            fields = adapter.encode(adapter.stack(batch))
            inputs = adapter.model_inputs({k: torch.from_numpy(v) for k, v in fields.items()})
            action, log_prob, value = policy.act(*inputs)
        timing[0] += time.perf_counter() - t_infer
        timing[1] += 1
        timing[2] += len(ready)
        actions = action.float().numpy()
        log_probs, values = log_prob.float().numpy(), value.float().numpy()
        boot_value = dict(zip(boot, values[len(ready):]))
        # Count the steps closed below before any rollout they complete is handed to the learner,
        # so steps_taken never lags a rollout the learner already holds.
        closed = sum(1 for i in ready if i in results)
        if closed:
            with steps.get_lock():
                steps.value += closed

        for j, i in enumerate(ready):
            if i in results:  # close the step env i just took
                _, reward, terminated, truncated, final = results[i]
                k = seq[i]
                buf = slot(k)
                buf.rewards[pos[i], i] = reward + gamma * boot_value.get(i, 0.0)
                ep_return[i] += reward
                done = terminated or truncated
                if done:
                    slot_info[k]["episode_returns"].append(float(ep_return[i]))
                    info = final[1] if final is not None else {}
                    slot_info[k]["episode_completion"].append(float(info.get("route_completion", 0.0)))
                    ep_return[i] = 0.0
                starts[i] = done
                pos[i] += 1
                if pos[i] == rollout_len:  # env i's column is complete: bootstrap, move to the next slot
                    buf.last_values[i], buf.last_dones[i] = values[j], done
                    slot_info[k]["columns"] += 1
                    if slot_info[k]["columns"] == n:
                        info = slot_info[k]
                        full_q.put(("rollout", slot_seq[k], {
                            "episode_returns": info["episode_returns"],
                            "episode_completion": info["episode_completion"],
                            "oldest_version": min(info["versions"]), "newest_version": max(info["versions"]),
                            "inference_ms": 1000 * timing[0] / max(1, timing[1]),
                            "inference_batch": timing[2] / max(1, timing[1])}))
                        timing[:] = [0.0, 0, 0]
                    seq[i], pos[i] = k + 1, 0
            k = seq[i]
            buf = slot(k)  # may wait for a free buffer
            t = pos[i]
            for name, arr in fields.items():
                buf.obs[name][t, i] = arr[j]
            buf.actions[t, i], buf.log_probs[t, i], buf.values[t, i] = actions[j], log_probs[j], values[j]
            buf.dones[t, i] = starts[i]
            slot_info[k]["versions"].append(local_version)
            conns[i].send(("step", actions[j]))
        if first_step.value == 0.0:
            first_step.value = time.monotonic()

        ready, results = [], {}
        while not ready:
            if stop.is_set():
                raise _Stopped
            for c in wait(conns, timeout=_POLL_S):
                i = index[id(c)]
                obs, reward, terminated, truncated, final = _recv(c)
                new_obs[i] = obs
                results[i] = (obs, reward, terminated, truncated, final)
                ready.append(i)


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
        # fork is unsafe once torch has started its thread pools: forkserver (default; one fresh
        # process imports the modules once and forks the workers) or spawn.
        self._ctx = mp.get_context(context if context in ("spawn", "forkserver") else "forkserver")
        self.env_fns = list(env_fns)
        self.num_envs = len(self.env_fns)
        self._conns: list[Connection] = []
        self._workers: list[Any] = []
        self._proc: Any = None
        self._buffers: list[RolloutBuffer] = []
        self._spawn_workers()

    # -- workers --------------------------------------------------------------------------------
    def _spawn_workers(self) -> None:
        spaces = []
        for fn in self.env_fns:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=env_worker, args=(child, fn), daemon=True, name="env-worker")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._workers.append(proc)
        try:
            for conn in self._conns:
                spaces.append(_recv(conn))
        except BaseException:
            self._close_workers()
            raise
        self.observation_space, self.action_space = spaces[0]

    def _close_workers(self) -> None:
        close_workers(self._conns, self._workers)
        self._conns, self._workers = [], []

    # -- collecting -----------------------------------------------------------------------------
    def start(self, model: torch.nn.Module, adapter: ObsAdapter, rollout_len: int, action_dim: int,
              gamma: float, seed: int = 0, num_slots: int = 2) -> None:
        if self._proc is not None:
            raise RuntimeError("the collector is already running")
        if not self._workers:
            self._spawn_workers()
        ctx = self._ctx
        self._rollout_len = rollout_len
        self._shared = copy.deepcopy(model).cpu().eval()
        for p in self._shared.parameters():
            p.requires_grad_(False)
        self._shared.share_memory()
        if not self._buffers or self._buffers[0].num_steps != rollout_len or len(self._buffers) != num_slots:
            self._buffers = [RolloutBuffer(rollout_len, self.num_envs, adapter.fields(), action_dim, shared=True)
                             for _ in range(num_slots)]
        self._free, self._full = ctx.Queue(), ctx.Queue()
        for s in range(num_slots):
            self._free.put(s)
        self._version, self._lock, self._stop = ctx.Value("i", 0), ctx.Lock(), ctx.Event()
        self._steps = ctx.Value("q", 0)
        self._first_step = ctx.Value("d", 0.0)
        self._held: dict[int, int] = {}
        self._proc = ctx.Process(
            target=_collector_main, name="rollout-collector", daemon=True,
            args=(self._conns, self._shared, adapter, self._buffers, self._free, self._full, self._version,
                  self._lock, self._stop, self._steps, self._first_step, rollout_len, gamma, seed))
        self._proc.start()

    def get(self) -> tuple[RolloutBuffer, dict[str, Any]]:
        """The next full rollout (blocks) and its statistics; hand it back with :meth:`release`."""
        while True:
            try:
                msg = self._full.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    raise CollectorError(f"the collector process exited (code {self._proc.exitcode})") from None
        if msg[0] == "error":
            raise CollectorError(msg[1])
        _, slot, stats = msg
        buffer = self._buffers[slot]
        self._held[id(buffer)] = slot
        stats["policy_lag"] = float(self._version.value - stats.pop("oldest_version"))
        stats.pop("newest_version")
        return buffer, stats

    def publish(self, model: torch.nn.Module) -> None:
        """Make ``model``'s current weights the behaviour policy of the next inferences."""
        source = model.state_dict()
        with self._lock:
            with torch.no_grad():
                for name, tensor in self._shared.state_dict().items():
                    tensor.copy_(source[name])
            self._version.value += 1

    def release(self, buffer: RolloutBuffer) -> None:
        self._free.put(self._held.pop(id(buffer)))

    @property
    def steps_taken(self) -> int:
        """Env steps completed by the workers since :meth:`start` (used and in flight)."""
        return int(self._steps.value) if self._proc is not None else 0

    @property
    def first_step_time(self) -> float | None:
        """``time.monotonic()`` when the first actions went to the envs (None before)."""
        value = float(self._first_step.value) if self._proc is not None else 0.0
        return value or None

    def stop(self) -> None:
        """End the collector process and the env workers; in-flight steps are dropped."""
        if self._proc is not None:
            self._stop.set()
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=1)
            self._proc = None
            for q in (self._free, self._full):
                q.cancel_join_thread()
                q.close()
        self._close_workers()

    close = stop

    def __del__(self) -> None:  # a trainer dropped without close() must not leak processes
        try:
            self.stop()
        except Exception:  # noqa: BLE001
            pass
