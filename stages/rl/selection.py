"""Keep the best policy seen during online RL, judged on validation episodes (SB3's EvalCallback idea).

PPO's deterministic policy does not improve monotonically: an update can trade a little of the
sampled policy's return for a worse mode, and the last update is not the best one. The keeper drives
the deterministic policy on *validation* seeds (disjoint from the held-out seeds that the stage
reports) before training and after every ``every``-th trainer callback, and keeps the weights with the
best mean score. The run ends with those weights, so the stage never returns a policy that is worse
on validation than the one it started from.

The best weights and their score are written to ``run_dir`` so that a resumed run keeps them.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from infra.files import atomic_write_bytes
from stages.common import write_json

log = logging.getLogger(__name__)


class BestPolicyKeeper:
    """``keeper = BestPolicyKeeper(model, score_fn, run_dir)``; ``keeper.start()`` before training,
    ``keeper(stats)`` as the trainer's callback, ``keeper.restore()`` after training.

    ``score_fn()`` drives the current weights and returns a higher-is-better score (the mean route
    completion on validation seeds in the online stage). ``key`` identifies the run: saved best weights
    with another key are ignored.
    """

    def __init__(self, model: torch.nn.Module, score_fn: Callable[[], float], run_dir: str | Path,
                 every: int = 1, key: str | None = None, next_callback: Callable[[dict[str, float]], Any] | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.score_fn, self.every, self.key = model, score_fn, every, key
        self.next_callback = next_callback
        self.dir = Path(run_dir)
        self.weights_path, self.info_path = self.dir / "best.safetensors", self.dir / "best.json"
        self.best_score, self.best_step = float("-inf"), -1
        self.history: list[dict[str, float]] = []
        self._calls = 0

    def start(self) -> None:
        """Before training (the model holds its starting weights): take over the best of an interrupted
        run with the same key, or score the starting weights as step 0."""
        if not self.resume():
            self._score(0)

    def resume(self) -> bool:
        """Take over the best of an interrupted run with the same key; False when there is none."""
        info = self._saved_best()
        if info is None:
            return False
        self.best_score, self.best_step = float(info["score"]), int(info["step"])
        self.history = list(info.get("history", []))
        log.info("best policy so far: score %.3f at step %d (from %s)", self.best_score, self.best_step,
                 self.info_path)
        return True

    def _saved_best(self) -> dict[str, Any] | None:
        """What an interrupted run with this key kept, or None; unreadable files are ignored with a warning
        (the run scores its starting weights afresh and overwrites them)."""
        if not (self.info_path.is_file() and self.weights_path.is_file()):
            return None
        try:
            info = json.loads(self.info_path.read_text())
            if info.get("key") != self.key:
                return None
            float(info["score"]), int(info["step"])
            load_file(str(self.weights_path))
        except Exception as exc:  # noqa: BLE001 - json, safetensors and a missing key fail in their own ways
            log.warning("%s / %s of an earlier run are unreadable (%s: %s): scoring the starting weights afresh",
                        self.info_path, self.weights_path, type(exc).__name__, str(exc)[:200])
            return None
        return info

    def __call__(self, stats: dict[str, float]) -> Any:
        self._calls += 1
        if self._calls % self.every == 0:
            self._score(int(stats.get("global_step", 0)))
        return self.next_callback(stats) if self.next_callback is not None else None

    def _score(self, step: int) -> None:
        score = float(self.score_fn())
        self.history.append({"step": step, "score": score})
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            atomic_write_bytes(self.weights_path, save({k: v.detach().cpu().contiguous()
                                                        for k, v in self.model.state_dict().items()}))
            log.info("validation score %.3f at step %d: the best so far", score, step)
        else:
            log.info("validation score %.3f at step %d (best %.3f at step %d)", score, step,
                     self.best_score, self.best_step)
        write_json(self.info_path, {"key": self.key, "score": self.best_score, "step": self.best_step,
                                    "history": self.history})

    def restore(self) -> dict[str, Any]:
        """Load the best weights into the model; returns the score, its step and the validation history."""
        # Only weights this run scored (or took over): a file of an earlier run it never scored stays out.
        if self.best_step >= 0 and self.weights_path.is_file():
            state = load_file(str(self.weights_path))
            device = next(self.model.parameters()).device
            self.model.load_state_dict({k: v.to(device) for k, v in state.items()})
        return {"best_score": self.best_score, "best_step": self.best_step, "history": list(self.history)}
