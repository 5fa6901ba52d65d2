"""Latency of the exported policy: eager PyTorch, TorchScript, torch.export and onnxruntime, measured
in one run on one machine (the export issue's target: onnxruntime CPU batch-1 p50 <= half of eager's).

    python -m benchmarks.export_latency                         # a fresh `small` model
    python -m benchmarks.export_latency --checkpoint checkpoints/online --iters 500
    python -m benchmarks.export_latency --size tiny --threads 1,2,4   # thread sweep

Exports the model into a temporary folder (the same exporters as the export stage), checks parity
at batch 1 and 32, then times every runtime interleaved (see stages/export_latency.py). Prints a
Markdown table per thread setting and writes benchmarks/results/export_latency.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from models import DrivingVLA
from models.config import DrivingVLAConfig
from models.export_wrapper import DeterministicPolicy, random_inputs
from stages.export import ONNX_FILE, PT2_FILE, TORCHSCRIPT_FILE, export_onnx, export_program, export_torchscript
from stages.export_latency import format_table, measure
from stages.export_parity import artifact_runners, check_parity, enforce, parity_cases

RESULTS = Path(__file__).resolve().parent / "results" / "export_latency.json"


def build_model(args: argparse.Namespace) -> tuple[DrivingVLA, str]:
    if args.checkpoint:
        return DrivingVLA.from_pretrained(args.checkpoint).eval(), str(args.checkpoint)
    overrides = {"image_size": args.image_size} if args.image_size else {}
    if args.max_text_length:
        overrides["max_text_length"] = args.max_text_length
    torch.manual_seed(0)
    config = DrivingVLAConfig.from_size(args.size, **overrides)
    return DrivingVLA(config).eval(), f"fresh {args.size} model"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a save_pretrained folder (default: build a fresh model)")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--image-size", type=int, default=None, help="override the size preset's image size")
    parser.add_argument("--max-text-length", type=int, default=48, help="token budget of a fresh model")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--threads", default="0", help="comma list of intra-op thread counts (0 = torch's default)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no-pt2", action="store_true", help="skip the torch.export program")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("onnx_ir", "onnxscript", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)

    model, source = build_model(args)
    policy = DeterministicPolicy(model).eval()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"model: {source}, {model.count_parameters():,} parameters, image {model.config.image_size}px, "
          f"{model.config.max_text_length} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        inputs = random_inputs(model, 2)
        program = export_program(policy, inputs, None if args.no_pt2 else d / PT2_FILE)
        export_onnx(program, inputs, d / ONNX_FILE)
        export_torchscript(policy, inputs, d / TORCHSCRIPT_FILE)
        print(f"exported in {time.perf_counter() - t0:.1f} s")
        parity = check_parity(policy, artifact_runners(d), parity_cases(model, batches, None), atol=1e-4)
        enforce(parity)
        print("parity max abs: " + ", ".join(f"{k} {a['max_abs']:.1e}" for k, a in parity["artifacts"].items()))
        artifacts = {"onnx": d / ONNX_FILE, "torchscript": d / TORCHSCRIPT_FILE,
                     "torch_export": None if args.no_pt2 else d / PT2_FILE}
        runs = []
        for threads in (int(t) for t in args.threads.split(",")):
            report = measure(policy, model, artifacts, batch_sizes=batches, iters=args.iters, warmup=args.warmup,
                             threads=threads)
            print(f"\n### {report['threads']} intra-op thread(s)\n")
            print(format_table(report))
            runs.append(report)
    result = {"model": source, "parameters": model.count_parameters(), "config": model.config.model_dump(mode="json"),
              "parity_max_abs": {k: a["max_abs"] for k, a in parity["artifacts"].items()}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
