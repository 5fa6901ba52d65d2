"""Resumable training state: one keyed, atomic file per run, loadable without unpickling code.

Every trainer that resumes (pretrain and offline through ``stages.resume.ResumePoint``, PPO and SAC
through ``stages.rl.checkpoint.TrainingCheckpoint``, evaluation) keeps its state in a
:class:`Checkpoint`: a ``torch.save`` file holding ``{"format", "key", "state"}``.

- **Atomic**: written whole through ``infra.files.atomic_write_bytes``; a run killed while saving
  leaves the previous file, never half of one.
- **Keyed**: ``key`` (a :func:`fingerprint` of the settings) is stored with the state; a file made
  under other settings is not resumed from (the next save replaces it).
- **No code on load**: read with ``torch.load(weights_only=True)``, which builds only tensors and
  plain containers and refuses anything else. numpy arrays and scalars (RNG states, replay buffers)
  are stored as raw-byte tensors plus dtype and shape (:func:`encode` / :func:`decode`); saving
  anything else fails at once rather than writing a file that could not be read back.
- **Corrupt files**: a file that cannot be read (truncated, garbage, or holding pickled objects) is
  moved aside to ``<name>.corrupt`` with a warning naming both paths, and the run starts fresh; it
  never fails every later run the same way.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from infra.files import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
CORRUPT_SUFFIX = ".corrupt"
# A numpy array or scalar inside a saved state: {_NDARRAY: uint8 tensor, "dtype": str, "shape": list}.
_NDARRAY, _NPSCALAR = "__drivevla_ndarray__", "__drivevla_npscalar__"
_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)


class CorruptStateError(ValueError):
    """A state file that cannot be read back; the message names the file and what to do."""


# -- keys ---------------------------------------------------------------------------------------

def fingerprint(*sections: Any) -> str:
    """A short hash of config sections (pydantic models or plain values): the key of a run's state."""
    blob = json.dumps([s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in sections],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- RNG ----------------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """The global RNG states (Python, numpy, torch CPU, and CUDA when present) as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng`'s dict (other keys in it are ignored)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- a training loop's state ---------------------------------------------------------------------

def snapshot(parts: Mapping[str, Any], **values: Any) -> dict[str, Any]:
    """A training loop's resumable state: each part's ``state_dict()`` under its name (models,
    optimisers; None parts are left out), the global RNG states under ``"rng"``, and ``values``
    (counters, history)."""
    return {**{name: part.state_dict() for name, part in parts.items() if part is not None},
            "rng": capture_rng(), **values}


def restore(state: dict[str, Any], parts: Mapping[str, Any]) -> None:
    """Load :func:`snapshot`'s state back into ``parts`` and the global RNGs."""
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(state[name])
    restore_rng(state["rng"])


# -- plain-data encoding ------------------------------------------------------------------------

def encode(value: Any, where: str = "state") -> Any:
    """``value`` with every numpy array or scalar replaced by tensors + plain values, so that
    ``torch.load(weights_only=True)`` reads it back; anything not plain data raises ``TypeError``."""
    if isinstance(value, np.generic):  # before the plain types: np.float64 is a float
        return {_NPSCALAR: encode(np.asarray(value), where)}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: a numpy array of Python objects cannot be saved as plain data")
        flat = np.ascontiguousarray(value).reshape(-1)
        return {_NDARRAY: torch.from_numpy(flat.view(np.uint8)), "dtype": value.dtype.str,
                "shape": list(value.shape)}
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):  # subclasses (Counter, defaultdict) come back as plain dicts
        kind = OrderedDict if isinstance(value, OrderedDict) else dict
        return kind((k, encode(v, f"{where}[{k!r}]")) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        kind = torch.Size if isinstance(value, torch.Size) else list if isinstance(value, list) else tuple
        return kind(encode(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where}: a {type(value).__name__} cannot be saved as plain data "
                    f"(store tensors, numpy arrays, numbers, strings, lists, tuples and dicts)")


def decode(value: Any) -> Any:
    """Undo :func:`encode`."""
    if isinstance(value, dict):
        if _NDARRAY in value:
            raw = value[_NDARRAY].numpy()
            return raw.view(np.dtype(value["dtype"])).reshape(value["shape"])
        if _NPSCALAR in value:
            return decode(value[_NPSCALAR])[()]
        return type(value)((k, decode(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(decode(v) for v in value)
    return value


# -- files --------------------------------------------------------------------------------------

def write_state(path: str | Path, state: dict[str, Any], key: str | None = None) -> Path:
    """Write ``state`` under ``key`` to ``path`` atomically."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, "key": key, "state": encode(state)}, buf)
    atomic_write_bytes(path, buf.getbuffer())
    return path


def read_envelope(path: str | Path) -> dict[str, Any]:
    """``{"format", "key", "state"}`` of a state file, the state decoded; no code runs while reading.

    Raises ``FileNotFoundError`` when there is no file and :class:`CorruptStateError` when it cannot be
    read (truncated, garbage, pickled objects, another format)."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch reports a damaged zip or pickle in many ways (OSError too)
        raise CorruptStateError(_why_unreadable(path, exc)) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION or "state" not in blob:
        raise CorruptStateError(f"{path} is not a state file of format {FORMAT_VERSION} (an older version's or "
                                f"another program's)")
    try:
        state = decode(blob["state"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptStateError(f"{path} holds a damaged array ({exc})") from exc
    return {**blob, "state": state}


def _why_unreadable(path: Path, exc: Exception) -> str:
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        # torch's weights-only unpickler stopped at the reference to code: none of it ran.
        return f"{path} holds pickled objects ({unsafe.group(1)}), not plain data: refused, none of it was run"
    if "Unsupported operand" in text:
        detail = "not a torch file"
    else:
        detail = text.strip().splitlines()[0].split(". ")[0][:150] if text.strip() else ""
    return f"{path} is truncated or corrupt ({type(exc).__name__}: {detail})"


def read_state(path: str | Path) -> dict[str, Any]:
    """The state saved in ``path`` whatever its key (for inspection and tests)."""
    return read_envelope(path)["state"]


class Checkpoint:
    """One keyed state file: ``save(state)``, ``load() -> state | None``, ``clear()``.

    ``load`` returns None when there is no file, when it was saved under another ``key`` (None accepts
    any), or when it is unreadable; an unreadable file is first moved aside to ``<name>.corrupt``."""

    def __init__(self, path: str | Path, key: str | None = None) -> None:
        self.path = Path(path)
        self.key = key

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> Path:
        write_state(self.path, state, self.key)
        log.debug("state saved to %s", self.path)
        return self.path

    def load(self) -> dict[str, Any] | None:
        if not self.exists():
            return None
        try:
            blob = read_envelope(self.path)
        except FileNotFoundError:  # another rank moved it aside meanwhile
            return None
        except CorruptStateError as exc:
            self._move_aside(exc)
            return None
        if self.key is not None and blob.get("key") != self.key:
            log.info("%s was saved under other settings: starting afresh (the next save replaces it)", self.path)
            return None
        log.info("%s: resuming from the saved state", self.path)
        return blob["state"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _move_aside(self, exc: CorruptStateError) -> None:
        aside = self.path.with_name(self.path.name + CORRUPT_SUFFIX)
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            pass
        log.warning("%s; moved it to %s and starting afresh (delete that file once you no longer need it)",
                    exc, aside)
