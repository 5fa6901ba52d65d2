"""Resumable training loops: a killed stage restarts from its last saved epoch or update.

The state lives in ``runs/<stage>/resume.pt`` (not a DVC output, so ``dvc repro`` does not wipe it) and
carries a fingerprint of the config it was made with; a changed config starts afresh. It is a
:class:`stages.checkpoint.Checkpoint` (atomic, keyed, read without unpickling code; a corrupt file is
moved aside to ``resume.pt.corrupt`` and the stage starts from scratch).
"""
from __future__ import annotations

from pathlib import Path

from stages.checkpoint import Checkpoint, fingerprint

__all__ = ["ResumePoint", "fingerprint"]

RESUME_FILE = "resume.pt"


class ResumePoint(Checkpoint):
    """``runs/<stage>/resume.pt`` under the config fingerprint ``key``."""

    def __init__(self, stage: str, key: str, root: str | Path = "runs"):
        super().__init__(Path(root) / stage / RESUME_FILE, key)
