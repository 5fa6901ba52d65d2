"""Training scalars: TensorBoard event files when tensorboard is installed, and always a JSON-lines
file (``scalars.jsonl``) that any script can read or plot without tensorboard."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ScalarWriter:
    """``add_scalar(tag, value, step)`` into ``<save_dir>/tensorboard/`` and ``<save_dir>/scalars.jsonl``.

    A resumed run appends to the same JSON-lines file, so the curve continues where it stopped."""

    def __init__(self, save_dir: str | Path):
        self.dir = Path(save_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.dir / "scalars.jsonl").open("a")
        self._tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: the JSON lines still hold every scalar
            log.warning("tensorboard is not installed: scalars go to %s only", self.dir / "scalars.jsonl")
        else:
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"tag": tag, "value": float(value), "step": int(step)}) + "\n")

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_scalars(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from a ``scalars.jsonl`` (the last value wins for a repeated step)."""
    curves: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            curves.setdefault(rec["tag"], {})[rec["step"]] = rec["value"]
    return {tag: sorted(points.items()) for tag, points in curves.items()}
