"""Stage 4 — export: the deterministic policy of the online checkpoint as deployable packages.

Writes into ``exports/`` (atomically: a failed run leaves the previous folder as it was):

- ``policy.pt2`` — ``torch.export`` program (dynamic batch), the base of the ONNX file;
- ``policy.onnx`` — the same program through the dynamo ONNX exporter, ``onnx.checker`` clean,
  with metadata (model version, config hash, inputs/outputs, training data version, tokenizer);
- ``policy.torchscript.pt`` — ``torch.jit.trace`` (deprecated upstream; kept because deployments
  still ask for it);
- ``parity.json`` — every artifact, loaded back from its file, against PyTorch on random and
  held-out inputs; a failure raises :class:`ParityError` and nothing is exported;
- ``latency.json`` — eager / TorchScript / torch.export / onnxruntime at batch 1 and 32;
- ``model_card.json`` + ``model_card.md``, and ``pytorch/`` (``save_pretrained``).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from infra.files import sha256_file
from models.driving_vla import CheckpointFileError, DrivingVLA
from models.export_wrapper import INPUT_NAMES, OUTPUT_NAMES, DeterministicPolicy, io_spec, random_inputs
from stages import export_latency
from stages.common import StageInputError, seed_everything, stage_main, staged_dir, write_json
from stages.export_parity import (
    ParityError,
    artifact_runners,
    check_parity,
    enforce,
    heldout_inputs,
    parity_cases,
)
from stages.model_card import build_card, config_hash, data_version, model_version, render_markdown, training_stages

if TYPE_CHECKING:  # only for annotations: the benchmark imports the exporters without the config stack
    from stages.config import PipelineConfig

__all__ = ["ParityError", "ExportSettings", "export_program", "export_onnx", "export_torchscript",
           "onnx_metadata", "run", "main"]

log = logging.getLogger(__name__)
# The ONNX exporter and optimiser log every folded initializer and rewrite rule at INFO, and warn
# once per torchvision op that torchvision (which has no CPU build here) is missing.
for _name in ("onnx_ir", "onnxscript", "torch.onnx._internal.exporter._registration"):
    logging.getLogger(_name).setLevel(logging.ERROR)

ONNX_FILE = "policy.onnx"
TORCHSCRIPT_FILE = "policy.torchscript.pt"
PT2_FILE = "policy.pt2"
MAX_BATCH = 4096
# The example batch the exporters trace with: not 0 or 1, which torch.export would specialise on.
TRACE_BATCH = 2


@dataclass(frozen=True)
class ExportSettings:
    """What the stage reads from ``cfg.export``. Fields not (yet) in ExportParams take the defaults
    below; on the smoke preset the latency loop is cut to a few rounds so the stage stays fast."""

    out: str
    atol: float
    parity_batch_sizes: tuple[int, ...]
    heldout_samples: int = 32
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_iters: int = 200
    latency_warmup: int = 20
    latency_threads: int = 0
    model_version: str | None = None
    dvc_lock: str = "dvc.lock"

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> ExportSettings:
        e = cfg.export
        smoke = cfg.preset == "smoke"
        return cls(
            out=e.out, atol=e.atol, parity_batch_sizes=tuple(e.parity_batch_sizes),
            heldout_samples=getattr(e, "heldout_samples", 32),
            latency_batch_sizes=tuple(getattr(e, "latency_batch_sizes", (1, 32))),
            latency_iters=getattr(e, "latency_iters", 5 if smoke else 200),
            latency_warmup=getattr(e, "latency_warmup", 1 if smoke else 20),
            latency_threads=getattr(e, "latency_threads", 0),
            model_version=getattr(e, "model_version", None) or None,
        )


# ----------------------------------------------------------------------------- exporters


@contextmanager
def _quiet_torch_internals() -> Iterator[None]:
    """torch 2.13 deep-copies pytree specs through a deprecated isinstance check: a FutureWarning
    about torch's own code that a user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        yield


def dynamic_batch() -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {name: {0: batch} for name in INPUT_NAMES}


def export_program(policy: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path | None = None):
    """``torch.export`` with a dynamic batch; saved to ``path`` (``.pt2``) when given."""
    with _quiet_torch_internals():
        program = torch.export.export(policy, inputs, dynamic_shapes=dynamic_batch(), strict=False)
        if path is not None:
            torch.export.save(program, str(path))
    return program


def onnx_metadata(model: DrivingVLA, *, version: str, data: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """String key/values stored in the ONNX file's ``metadata_props`` (read back without torch
    through ``InferenceSession.get_modelmeta().custom_metadata_map``)."""
    spec = io_spec(model)
    meta = {
        "model_version": version,
        "config_hash": config_hash(model.config),
        "training_data_version": data,
        "input_names": ",".join(INPUT_NAMES),
        "output_names": ",".join(OUTPUT_NAMES),
        "inputs": json.dumps(spec["inputs"]),
        "outputs": json.dumps(spec["outputs"]),
        "model_config": model.config.model_dump_json(),
        "tokenizer": json.dumps(model.tokenizer.to_dict()),
    }
    meta.update(extra or {})
    return meta


def _name_batch_axis(graph: Any, name: str = "batch") -> None:
    """The exporter calls the dynamic axis ``s0``-like names; rename it (everywhere) to ``batch``."""
    first = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not first:
        return
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == first:
                dim.dim_param = name


def export_onnx(program_or_policy: Any, inputs: tuple[torch.Tensor, ...], path: Path,
                metadata: dict[str, str] | None = None) -> None:
    """Dynamo ONNX export (dynamic batch), metadata attached, checked by ``onnx.checker``."""
    import onnx

    dynamic = None if isinstance(program_or_policy, torch.export.ExportedProgram) else dynamic_batch()
    with _quiet_torch_internals():
        onnx_program = torch.onnx.export(program_or_policy, inputs, dynamo=True, input_names=list(INPUT_NAMES),
                                         output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic,
                                         optimize=True, verbose=False)
    proto = onnx_program.model_proto
    _name_batch_axis(proto.graph)
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "DrivingVLA deterministic policy: (image, state, tokens) -> (controls, trajectory)"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_torchscript(policy: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> list[str]:
    """``torch.jit.trace`` + save. Returns the warnings tracing raised (deprecation, shape checks
    recorded as constants), which are expected and go into the parity report instead of the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(policy, inputs, check_trace=False)
        torch.jit.save(traced, str(path))
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught})


# ----------------------------------------------------------------------------- the stage


def _artifact_facts(directory: Path) -> dict[str, dict[str, Any]]:
    formats = {ONNX_FILE: "ONNX (dynamo exporter)", TORCHSCRIPT_FILE: "TorchScript (torch.jit.trace)",
               PT2_FILE: "torch.export ExportedProgram"}
    return {name: {"format": fmt, "bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
            for name, fmt in formats.items() if (directory / name).is_file()}


def _make_readable(directory: Path) -> None:
    """Temporary folders and files are created owner-only; deployable artifacts are for everyone to read."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    s = ExportSettings.from_config(cfg)
    seed_everything(cfg.seed)
    src = Path(cfg.online.out)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"checkpoint {src} not found: run the online stage first")
    try:
        model = DrivingVLA.from_pretrained(src).eval()
    except CheckpointFileError as exc:
        raise StageInputError(str(exc)) from None
    policy = DeterministicPolicy(model).eval()
    heldout, heldout_note = heldout_inputs(model, cfg.data.out, s.heldout_samples)
    if heldout is None:
        log.warning("export parity without held-out inputs: %s", heldout_note)
    version = model_version(src / "model.safetensors", s.model_version)
    data = data_version(cfg.data.out, s.dvc_lock)
    inputs = random_inputs(model, TRACE_BATCH)

    t0 = time.perf_counter()
    with staged_dir(s.out) as tmp:
        program = export_program(policy, inputs, tmp / PT2_FILE)
        export_onnx(program, inputs, tmp / ONNX_FILE,
                    onnx_metadata(model, version=version, data=data, extra={"source_checkpoint": str(src)}))
        trace_warnings = export_torchscript(policy, inputs, tmp / TORCHSCRIPT_FILE)
        t_export = time.perf_counter() - t0

        report = check_parity(policy, artifact_runners(tmp), parity_cases(model, s.parity_batch_sizes, heldout),
                              s.atol)
        report.update(heldout=heldout_note, torchscript_trace_warnings=trace_warnings)
        if not report["passed"]:
            # Kept outside exports/ for diagnosis; exports/ itself stays as it was.
            write_json(Path("runs") / "export" / "parity_failed.json", report)
        enforce(report)
        write_json(tmp / "parity.json", report)

        latency = export_latency.measure(
            policy, model, {"onnx": tmp / ONNX_FILE, "torchscript": tmp / TORCHSCRIPT_FILE, "torch_export": tmp / PT2_FILE},
            batch_sizes=s.latency_batch_sizes, iters=s.latency_iters, warmup=s.latency_warmup, threads=s.latency_threads)
        write_json(tmp / "latency.json", latency)

        model.save_pretrained(tmp / "pytorch")
        if (src / "training.json").is_file():
            shutil.copy2(src / "training.json", tmp / "pytorch" / "training.json")
        card = build_card(
            config=model.config, parameters=model.count_parameters(), version=version, io=io_spec(model),
            artifacts=_artifact_facts(tmp),
            stages=training_stages({"pretrain": cfg.pretrain.out, "offline": cfg.offline.out, "online": cfg.online.out},
                                   cfg.metrics_dir, s.dvc_lock),
            data={cfg.data.out: data}, parity=report, latency=latency, source=str(src))
        write_json(tmp / "model_card.json", card)
        (tmp / "model_card.md").write_text(render_markdown(card))
        _make_readable(tmp)

    out = Path(s.out)
    b1 = latency["batches"].get("1", {})
    metrics: dict[str, Any] = {
        "onnx_parity_passed": report["artifacts"]["onnx"]["passed"],
        "onnx_max_abs_error": report["artifacts"]["onnx"]["max_abs"],
        "parity_passed": report["passed"],
        **{f"{name}_max_abs_error": a["max_abs"] for name, a in report["artifacts"].items() if name != "onnx"},
        "parity_cases": len(report["cases"]),
        "heldout_inputs": heldout is not None,
        **{f"latency_b{b}_{rt}_p50_ms": st["p50_ms"] for b, rts in latency["batches"].items() for rt, st in rts.items()},
        "ort_vs_eager_b1": latency["ort_vs_eager_b1"],
        "latency_target_met": latency["target_met"],
        "onnx_bytes": (out / ONNX_FILE).stat().st_size,
        "export_seconds": round(t_export, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "model_version": version,
    }
    write_json(Path(cfg.metrics_dir) / "export.json", metrics)
    log.info("export: parity max abs %.2e over %d cases; onnxruntime b1 p50 %.3f ms vs eager %.3f ms",
             report["max_abs"], len(report["cases"]), b1.get("onnxruntime_cpu", {}).get("p50_ms", float("nan")),
             b1.get("eager", {}).get("p50_ms", float("nan")))
    return {"paths": {"dir": str(out), "onnx": str(out / ONNX_FILE), "torchscript": str(out / TORCHSCRIPT_FILE),
                      "pt2": str(out / PT2_FILE), "model_card": str(out / "model_card.md")},
            "metrics": metrics}


def main() -> None:
    try:
        stage_main("export", run, __doc__.splitlines()[0])
    except ParityError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
