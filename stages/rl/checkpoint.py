"""Periodic training checkpoints of the RL trainers, and resuming from them.

A checkpoint is ``<save_dir>/checkpoint.pt``: a :class:`stages.checkpoint.Checkpoint` holding what
the trainer's ``state_dict()`` returns: model weights, optimiser state, step and update counters, the
RNG states (Python, numpy, torch, the trainer's own generator) and small buffers (episode statistics;
a replay buffer where it is small enough). It is written atomically, read back without unpickling
code, and a corrupt one is moved aside (``checkpoint.pt.corrupt``) so that the run starts afresh.

Environments cannot be checkpointed (a simulator's state lives in the simulator): a resumed run
starts new episodes, from seeds of its own, at the saved step count.
"""
from __future__ import annotations

from pathlib import Path

from stages.checkpoint import FORMAT_VERSION, Checkpoint, capture_rng, restore_rng

__all__ = ["CHECKPOINT_FILE", "FORMAT_VERSION", "TrainingCheckpoint", "capture_rng", "restore_rng"]

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingCheckpoint(Checkpoint):
    """``<directory>/checkpoint.pt``; ``key`` (e.g. a config fingerprint) guards against resuming
    a run with a state made under different settings: a mismatch is ignored with a log line."""

    def __init__(self, directory: str | Path, key: str | None = None) -> None:
        self.directory = Path(directory)
        super().__init__(self.directory / CHECKPOINT_FILE, key)
