"""The parity gate: every exported artifact must reproduce the PyTorch policy on the same inputs.

Each artifact is loaded back from its file (what ships, not the object that was exported) and run
on two kinds of inputs at several batch sizes: fresh random inputs (every pixel value and a wide
range of states) and real held-out samples from the dataset's ``val`` split. For every output we
record the largest absolute and relative difference; the gate passes when every absolute
difference is within ``atol`` (1e-4 by default: float32 round-off between kernels is ~1e-6).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.driving_vla import DrivingVLA
from models.export_wrapper import INPUT_NAMES, OUTPUT_NAMES, image_shape, random_inputs

log = logging.getLogger(__name__)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# An artifact as a function of (image, state, tokens) numpy arrays -> [controls, trajectory].
Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]

# Relative error = |diff| / (|expected| + REL_EPS): the floor keeps outputs that are ~0 from
# turning round-off into huge ratios; the gate itself is on the absolute error.
REL_EPS = 1e-6


class ParityError(RuntimeError):
    """An exported artifact does not reproduce the PyTorch model within tolerance."""


# ----------------------------------------------------------------------------- runners


def onnx_runner(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, arrays)))

    return run


def _torch_runner(module: Callable[..., Any]) -> Runner:
    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
        return [t.numpy() for t in out]

    return run


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without its deprecation warning (we know; the file is what was asked for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def torchscript_runner(path: str | Path) -> Runner:
    return _torch_runner(load_torchscript(path))


def torch_export_runner(path: str | Path) -> Runner:
    return _torch_runner(torch.export.load(str(path)).module())


ARTIFACTS: dict[str, tuple[str, Callable[[Path], Runner]]] = {
    "onnx": ("policy.onnx", onnx_runner),
    "torchscript": ("policy.torchscript.pt", torchscript_runner),
    "torch_export": ("policy.pt2", torch_export_runner),
}


def artifact_runners(directory: str | Path, names: Sequence[str] = tuple(ARTIFACTS)) -> dict[str, Runner]:
    """Runners for the artifacts (of ``names``) present in an export folder, by name."""
    d = Path(directory)
    return {name: make(d / file) for name, (file, make) in ARTIFACTS.items()
            if name in names and (d / file).is_file()}


# ----------------------------------------------------------------------------- inputs


def heldout_inputs(model: DrivingVLA, data_root: str | Path, count: int = 32) -> tuple[Inputs | None, str]:
    """Up to ``count`` samples spread evenly over the ``val`` split, or ``(None, why not)``."""
    from stages.data.dataset import DatasetError, load_split

    try:
        samples = load_split(data_root, "val", horizon=1, stride=1)
    except DatasetError as exc:
        return None, f"no held-out data: {exc}"
    expected = tuple(image_shape(model, len(samples.images)))
    if samples.images.shape != expected:
        return None, (f"held-out images have shape {samples.images.shape[1:]}, the model takes "
                      f"{expected[1:]}: the dataset was recorded for another model")
    idx = np.linspace(0, len(samples.images) - 1, num=min(count, len(samples.images))).round().astype(int)
    tokens = model.tokenizer.encode([str(c) for c in samples.commands[idx]])
    return (torch.from_numpy(samples.images[idx]), torch.from_numpy(samples.states[idx].astype(np.float32)),
            tokens), f"{len(idx)} samples of {Path(data_root)} (val split)"


def _take(inputs: Inputs, batch: int) -> Inputs:
    """The first ``batch`` rows, cycling when there are fewer (a batch size, not new content)."""
    idx = torch.arange(batch) % inputs[0].shape[0]
    return tuple(t[idx] for t in inputs)  # type: ignore[return-value]


def parity_cases(model: DrivingVLA, batch_sizes: Sequence[int], heldout: Inputs | None,
                 seed: int = 1000) -> dict[str, Inputs]:
    """Named input batches: ``random/b<N>`` for each batch size, plus ``heldout/b<N>`` if available."""
    cases = {f"random/b{b}": random_inputs(model, b, seed=seed + b) for b in batch_sizes}
    if heldout is not None:
        cases.update({f"heldout/b{b}": _take(heldout, b) for b in batch_sizes})
    return cases


# ----------------------------------------------------------------------------- comparison


def compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """Max absolute and relative difference per output; a shape mismatch raises ParityError."""
    out = {}
    for name, e, g in zip(OUTPUT_NAMES, expected, got):
        if e.shape != g.shape:
            raise ParityError(f"output {name} has shape {g.shape}, PyTorch gives {e.shape}")
        if not np.isfinite(g).all():
            out[name] = {"max_abs": float("inf"), "max_rel": float("inf")}
            continue
        diff = np.abs(e.astype(np.float64) - g.astype(np.float64))
        out[name] = {"max_abs": float(diff.max()), "max_rel": float((diff / (np.abs(e) + REL_EPS)).max())}
    return out


def check_parity(reference: torch.nn.Module, runners: dict[str, Runner], cases: dict[str, Inputs],
                 atol: float) -> dict[str, Any]:
    """Run every artifact on every case against ``reference``; return the report (does not raise)."""
    expected = {}
    with torch.inference_mode():
        for case, inputs in cases.items():
            expected[case] = [t.numpy() for t in reference(*inputs)]
    report: dict[str, Any] = {"atol": atol, "cases": list(cases), "artifacts": {}}
    for name, run in runners.items():
        per_case, worst = {}, {o: {"max_abs": 0.0, "max_rel": 0.0} for o in OUTPUT_NAMES}
        for case, inputs in cases.items():
            try:
                diffs = compare(expected[case], run([t.numpy() for t in inputs]))
            except ParityError as exc:
                raise ParityError(f"{name}, case {case}: {exc}") from None
            per_case[case] = diffs
            for o, d in diffs.items():
                worst[o] = {k: max(worst[o][k], d[k]) for k in d}
        max_abs = max(w["max_abs"] for w in worst.values())
        report["artifacts"][name] = {"max_abs": max_abs, "outputs": worst, "passed": max_abs <= atol,
                                     "per_case": per_case}
    report["max_abs"] = max((a["max_abs"] for a in report["artifacts"].values()), default=0.0)
    report["passed"] = bool(runners) and all(a["passed"] for a in report["artifacts"].values())
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """One line per (artifact, output, case) over tolerance."""
    lines = []
    for name, art in report["artifacts"].items():
        for case, diffs in art["per_case"].items():
            for output, d in diffs.items():
                if not d["max_abs"] <= report["atol"]:
                    lines.append(f"{name}: {output} differs by {d['max_abs']:.3g} on {case}")
    return lines


def enforce(report: dict[str, Any]) -> None:
    """The gate: raise :class:`ParityError` naming what failed, unless every artifact passed."""
    if report["passed"]:
        return
    bad = failures(report) or ["no artifact was checked"]
    shown = "\n  ".join(bad[:12]) + (f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else "")
    raise ParityError(f"export parity failed (atol {report['atol']:.0e}); nothing was exported:\n  {shown}")
