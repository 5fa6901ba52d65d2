"""Whether a process, or a process group, still exists (signal 0: nothing is sent)."""
from __future__ import annotations

import os

__all__ = ["alive"]


def alive(pid: int, group: bool = False) -> bool:
    """``pid`` (a process group's id with ``group``) exists; one we may not signal counts as alive."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
