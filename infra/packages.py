"""Optional dependencies: one place that imports them and says which pip extra brings each."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingPackage", "require_package"]


class MissingPackage(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require_package(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingPackage` naming ``pip install -e .[extra]``.

    ``purpose`` says what needed it ("the CARLA bridge", "pushing to S3") so the user knows why.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f" for {purpose}" if purpose else ""
        raise MissingPackage(f"the Python package {module.split('.')[0]!r} is needed{why} but cannot be imported "
                             f"({exc}); install it with `pip install -e .[{extra}]` (or `bash scripts/setup.sh`, "
                             "which installs every extra)") from exc
