"""Stage 4 — export: the deterministic policy to ONNX (dynamo exporter, dynamic batch), checked
against PyTorch with onnxruntime. A parity failure stops the stage; nothing is written as exported.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common import seed_everything, stage_main, staged_dir, write_json
from stages.config import PipelineConfig

log = logging.getLogger(__name__)
# The ONNX optimiser logs every folded initializer at INFO.
logging.getLogger("onnx_ir").setLevel(logging.WARNING)

INPUT_NAMES = ["image", "state", "tokens"]
OUTPUT_NAMES = ["controls", "trajectory"]


class ParityError(RuntimeError):
    """An exported artifact does not reproduce the PyTorch model within tolerance."""


def example_inputs(model, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (batch, c.image_size, c.image_size, 3) if c.num_cameras == 1 else \
        (batch, c.num_cameras, c.image_size, c.image_size, 3)
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    state = torch.randn(batch, c.state_dim, generator=g)
    commands = ["follow the lane", "turn left at the next intersection", "change to the right lane"]
    tokens = model.tokenize([commands[i % len(commands)] for i in range(batch)])
    return image, state, tokens


def export_onnx(policy: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: batch} for name in INPUT_NAMES}
    program = torch.onnx.export(policy, inputs, dynamo=True, input_names=INPUT_NAMES,
                                output_names=OUTPUT_NAMES, dynamic_shapes=dynamic, optimize=True,
                                verbose=False)
    program.save(str(path))


def onnx_parity(path: Path, policy: torch.nn.Module, model, batch_sizes: list[int], atol: float) -> dict[str, Any]:
    """Run the ONNX file and PyTorch on the same fresh inputs; return max abs/rel errors per output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {"atol": atol, "batches": {}}
    worst = 0.0
    for b in batch_sizes:
        inputs = example_inputs(model, b, seed=1000 + b)
        with torch.no_grad():
            expected = [t.numpy() for t in policy(*inputs)]
        got = session.run(OUTPUT_NAMES, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
        entry = {}
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            if e.shape != g.shape:
                raise ParityError(f"ONNX output {name} has shape {g.shape}, PyTorch {e.shape} (batch {b})")
            abs_err = float(np.abs(e - g).max())
            rel_err = float((np.abs(e - g) / (np.abs(e) + 1e-6)).max())
            entry[name] = {"max_abs": abs_err, "max_rel": rel_err}
            worst = max(worst, abs_err)
        report["batches"][str(b)] = entry
    report["max_abs"] = worst
    report["passed"] = worst <= atol
    return report


def run(cfg: PipelineConfig) -> dict[str, Any]:
    from models import DrivingVLA
    from models.export_wrapper import DeterministicPolicy

    seed_everything(cfg.seed)
    src = Path(cfg.online.out)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"checkpoint {src} not found: run the online stage first")
    model = DrivingVLA.from_pretrained(src).eval()
    policy = DeterministicPolicy(model).eval()
    t0 = time.perf_counter()
    with staged_dir(cfg.export.out) as tmp:
        onnx_path = tmp / "policy.onnx"
        export_onnx(policy, example_inputs(model, 2), onnx_path)
        report = onnx_parity(onnx_path, policy, model, cfg.export.parity_batch_sizes, cfg.export.atol)
        if not report["passed"]:
            raise ParityError(f"ONNX parity failed: max abs error {report['max_abs']:.2e} > {cfg.export.atol:.0e}; "
                              "nothing was exported")
        write_json(tmp / "parity.json", report)
        model.save_pretrained(tmp / "pytorch")
    metrics = {"onnx_max_abs_error": report["max_abs"], "onnx_parity_passed": report["passed"],
               "onnx_bytes": (Path(cfg.export.out) / "policy.onnx").stat().st_size,
               "seconds": round(time.perf_counter() - t0, 2)}
    write_json(Path(cfg.metrics_dir) / "export.json", metrics)
    log.info("export: ONNX parity max abs error %.2e", report["max_abs"])
    return {"paths": {"onnx": str(Path(cfg.export.out) / "policy.onnx")}, "metrics": metrics}


def main() -> None:
    stage_main("export", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
