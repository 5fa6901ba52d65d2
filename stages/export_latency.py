"""Inference latency of the policy in each runtime: eager PyTorch, TorchScript, the torch.export
program and onnxruntime (CPU; CUDA where its provider and a GPU are present).

Runtimes are timed *interleaved*, in turns of consecutive calls (see :func:`time_interleaved`), so
that a noisy or shared machine slows all of them alike and the ratios stay meaningful. Every runtime gets the same
number of intra-op threads (``torch.set_num_threads`` and onnxruntime's ``intra_op_num_threads``);
onnxruntime runs with ``ORT_ENABLE_ALL`` graph optimisation. Latencies are per call, in ms, for the
whole batch, after ``warmup`` untimed rounds.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common import torch_threads

from models.driving_vla import DrivingVLA
from models.export_wrapper import INPUT_NAMES, OUTPUT_NAMES, random_inputs
from stages.export_parity import load_torchscript

log = logging.getLogger(__name__)

# The target of the export issue: onnxruntime CPU at batch 1 at most this fraction of eager PyTorch.
TARGET_RATIO = 0.5


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 / mean in milliseconds of a list of durations in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4), "p99_ms": round(float(p99), 4),
            "mean_ms": round(float(ms.mean()), 4), "iters": int(len(ms))}


def time_interleaved(calls: dict[str, Callable[[], Any]], iters: int, warmup: int,
                     blocks: int = 10) -> dict[str, dict[str, float]]:
    """Time each call ``iters`` times after ``warmup`` untimed rounds.

    The timed calls come in ``blocks`` turns per runtime (a, b, c, a, b, c, ...), each turn a run of
    consecutive calls whose first, untimed call wakes the runtime's thread pool. Turns spread every
    runtime over the whole measurement, so drifting load on a shared machine hits all alike; runs
    (rather than single alternating calls) keep one runtime's spinning worker threads — onnxruntime
    and OpenMP both spin after a call — from stealing the cores of the next runtime's timed call.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    blocks = max(1, min(blocks, iters))
    sizes = [iters // blocks + (1 if i < iters % blocks else 0) for i in range(blocks)]
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for size in sizes:
        for name, fn in calls.items():
            fn()
            for _ in range(size):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: percentiles(s) for name, s in samples.items()}


def ort_session(path: str | Path, threads: int, provider: str = "CPUExecutionProvider"):
    """An onnxruntime session set up for latency: all graph optimisations, ``threads`` intra-op threads,
    sequential execution (this graph has no parallel branches worth a second pool)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])


def _torch_call(module: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return module(*inputs)

    return call


def _ort_call(session: Any, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    feed = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)}  # converted once, outside the timing
    names = list(OUTPUT_NAMES)
    return lambda: session.run(names, feed)


def measure(policy: torch.nn.Module, model: DrivingVLA, artifacts: dict[str, Path | None],
            batch_sizes: Sequence[int] = (1, 32), iters: int = 200, warmup: int = 20,
            threads: int = 0) -> dict[str, Any]:
    """Latency of ``policy`` (eager) and of the artifacts that are given, per batch size.

    ``artifacts`` maps ``onnx`` / ``torchscript`` / ``torch_export`` to a file (or None to skip);
    ``threads`` 0 means torch's current setting, used for every runtime alike.
    """
    import onnxruntime as ort

    threads = threads or torch.get_num_threads()
    calls_by_runtime: dict[str, Callable[[tuple[torch.Tensor, ...]], Callable[[], Any]]] = {
        "eager": lambda x: _torch_call(policy, x)}
    if artifacts.get("torchscript"):
        ts = load_torchscript(artifacts["torchscript"])
        calls_by_runtime["torchscript"] = lambda x: _torch_call(ts, x)
    if artifacts.get("torch_export"):
        program = torch.export.load(str(artifacts["torch_export"])).module()
        calls_by_runtime["torch_export"] = lambda x: _torch_call(program, x)
    if artifacts.get("onnx"):
        sessions = {"onnxruntime_cpu": ort_session(artifacts["onnx"], threads)}
        if "CUDAExecutionProvider" in ort.get_available_providers():
            try:
                sessions["onnxruntime_cuda"] = ort_session(artifacts["onnx"], threads, "CUDAExecutionProvider")
            except Exception as exc:  # provider listed but no usable GPU / CUDA libraries
                log.warning("onnxruntime CUDA provider unusable: %s", exc)
        for name, sess in sessions.items():
            calls_by_runtime[name] = functools.partial(_ort_call, sess)

    report: dict[str, Any] = {"threads": threads, "iters": iters, "warmup": warmup, "batches": {},
                              "environment": environment()}
    with torch_threads(threads):
        for b in batch_sizes:
            inputs = random_inputs(model, b, seed=b)
            calls = {name: make(inputs) for name, make in calls_by_runtime.items()}
            report["batches"][str(b)] = time_interleaved(calls, iters, warmup)
            log.info("latency batch %d: %s", b, {k: v["p50_ms"] for k, v in report["batches"][str(b)].items()})
    report.update(target(report))
    return report


def target(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: onnxruntime CPU batch-1 p50 <= TARGET_RATIO x eager batch-1 p50."""
    b1 = report["batches"].get("1", {})
    if "eager" not in b1 or "onnxruntime_cpu" not in b1:
        return {"ort_vs_eager_b1": None, "target_met": None}
    ratio = b1["onnxruntime_cpu"]["p50_ms"] / b1["eager"]["p50_ms"]
    return {"ort_vs_eager_b1": round(ratio, 4), "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO}


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table: one row per (batch, runtime), p50/p95/p99 in ms and the ratio to eager."""
    lines = ["| batch | runtime | p50 ms | p95 ms | p99 ms | vs eager p50 |", "|---:|---|---:|---:|---:|---:|"]
    for b, runtimes in report["batches"].items():
        eager = runtimes.get("eager", {}).get("p50_ms")
        for name, s in runtimes.items():
            ratio = f"{s['p50_ms'] / eager:.2f}x" if eager else "-"
            lines.append(f"| {b} | {name} | {s['p50_ms']:.3f} | {s['p95_ms']:.3f} | {s['p99_ms']:.3f} | {ratio} |")
    if report.get("ort_vs_eager_b1") is not None:
        verdict = "met" if report["target_met"] else "NOT met"
        lines.append("")
        lines.append(f"onnxruntime CPU batch-1 p50 = {report['ort_vs_eager_b1']:.2f} x eager "
                     f"(target <= {report['target_ratio']}: {verdict}); {report['threads']} thread(s), "
                     f"{report['iters']} timed rounds after {report['warmup']} warm-up.")
    return "\n".join(lines)
