"""One environment in its own process, answering ``reset`` / ``step`` / ``close`` over a pipe.

Kept free of torch so that a worker process imports only what its env needs. Episodes reset in
the worker on the step that ends them (same-step autoreset): the reply then carries the final
observation and info next to the first observation of the new episode.
"""
from __future__ import annotations

import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable


def env_worker(conn: Connection, env_fn: Callable[[], Any]) -> None:
    """Replies ``("ok", payload)`` or ``("error", traceback)``; the first reply is the env's spaces.

    ``step`` answers ``(obs, reward, terminated, truncated, final)`` where ``final`` is
    ``(final_obs, final_info)`` when the step ended the episode and None otherwise.
    """
    if "torch" in sys.modules:  # an env that uses torch gets one thread: the cores are the learner's
        sys.modules["torch"].set_num_threads(1)
    try:
        env = env_fn()
        conn.send(("ok", (env.observation_space, env.action_space)))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                cmd, data = conn.recv()
            except (EOFError, OSError):
                break
            if cmd == "close":
                break
            try:
                if cmd == "reset":
                    obs, _ = env.reset(seed=data)
                    conn.send(("ok", obs))
                elif cmd == "step":
                    obs, reward, terminated, truncated, info = env.step(data)
                    final = None
                    if terminated or truncated:
                        final = (obs, info)
                        obs, _ = env.reset()
                    conn.send(("ok", (obs, float(reward), bool(terminated), bool(truncated), final)))
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except Exception:  # noqa: BLE001
                conn.send(("error", traceback.format_exc()))
                break
    finally:
        env.close()


def close_workers(conns: list[Connection], procs: list[Any]) -> None:
    """Ask every `env_worker` to close its env, then reap the processes (terminating a stuck one)."""
    for conn in conns:
        try:
            conn.send(("close", None))
        except (OSError, BrokenPipeError):
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=1)
    for conn in conns:
        conn.close()
