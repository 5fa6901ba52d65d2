"""Resumable training loops: a killed stage restarts from its last saved epoch or update.

The state lives in ``runs/<stage>/`` (not a DVC output, so ``dvc repro`` does not wipe it) and
carries a fingerprint of the config it was made with; a changed config starts afresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from stages.training import load_trainer_state, save_trainer_state

log = logging.getLogger(__name__)


def fingerprint(*sections: Any) -> str:
    blob = json.dumps([s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in sections],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ResumePoint:
    def __init__(self, stage: str, key: str, root: str | Path = "runs"):
        self.path = Path(root) / stage / "resume.pt"
        self.key = key

    def load(self) -> dict[str, Any] | None:
        state = load_trainer_state(self.path)
        if state is None:
            return None
        if state.get("fingerprint") != self.key:
            log.info("%s: config changed since the saved state, starting afresh", self.path)
            return None
        log.info("%s: resuming from saved state", self.path)
        return state

    def save(self, state: dict[str, Any]) -> None:
        save_trainer_state(self.path, {**state, "fingerprint": self.key})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
