"""Periodic training checkpoints of the RL trainers, and resuming from them.

A checkpoint is one ``torch.save`` file (``<save_dir>/checkpoint.pt``) holding what the trainer's
``state_dict()`` returns: model weights, optimiser state, step and update counters, the RNG states
(Python, numpy, torch, the trainer's own generator) and small buffers (episode statistics; a replay
buffer where it is small enough). It is written through a temporary file and a rename, so a run
killed while saving leaves the previous checkpoint intact, never half of one.

Environments cannot be checkpointed (a simulator's state lives in the simulator): a resumed run
starts new episodes, from seeds of its own, at the saved step count.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """The global RNG states (Python, numpy, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingCheckpoint:
    """``<directory>/checkpoint.pt``; ``key`` (e.g. a config fingerprint) guards against resuming
    a run with a state made under different settings: a mismatch is ignored with a log line."""

    def __init__(self, directory: str | Path, key: str | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT_FILE
        self.key = key

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            torch.save({"format": FORMAT_VERSION, "key": self.key, "state": state}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.debug("checkpoint: step %s saved to %s", state.get("global_step"), self.path)
        return self.path

    def load(self) -> dict[str, Any] | None:
        """The saved trainer state, or None when there is none (or it belongs to other settings)."""
        if not self.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a corrupt file must not stop a fresh start
            log.warning("checkpoint: %s is unreadable (%s); starting afresh", self.path, exc)
            return None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
            log.warning("checkpoint: %s has an unknown format; starting afresh", self.path)
            return None
        if self.key is not None and blob.get("key") != self.key:
            log.info("checkpoint: %s was made with other settings; starting afresh", self.path)
            return None
        return blob["state"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
