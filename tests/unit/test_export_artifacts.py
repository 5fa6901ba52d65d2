"""The exported packages of a tiny DrivingVLA: ONNX, TorchScript and torch.export, checked against
PyTorch (dynamic batch 1/7/32), the parity gate on a tampered file, loading in a fresh process,
the ONNX metadata, and `drivevla predict` (onnxruntime only) against PyTorch."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from models import DrivingVLA
from models.config import DrivingVLAConfig
from models.export_wrapper import DeterministicPolicy, random_inputs
from stages.export import export_onnx, export_program, export_torchscript, onnx_metadata
from stages.export_parity import (
    ParityError,
    artifact_runners,
    check_parity,
    enforce,
    onnx_runner,
    parity_cases,
)

ROOT = Path(__file__).resolve().parents[2]
BATCHES = [1, 7, 32]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=48)).eval()
    policy = DeterministicPolicy(model).eval()
    out = tmp_path_factory.mktemp("exports")
    inputs = random_inputs(model, 2)
    program = export_program(policy, inputs, out / "policy.pt2")
    export_onnx(program, inputs, out / "policy.onnx",
                onnx_metadata(model, version="9.9.9-test", data="abc123.dir"))
    warnings = export_torchscript(policy, inputs, out / "policy.torchscript.pt")
    model.save_pretrained(out / "pytorch")
    return model, policy, out, warnings


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("artifact", ["onnx", "torchscript", "torch_export"])
def test_parity_at_dynamic_batch_sizes(exported, artifact):
    model, policy, out, _ = exported
    runner = artifact_runners(out, [artifact])[artifact]
    report = check_parity(policy, {artifact: runner}, parity_cases(model, BATCHES, None), atol=1e-4)
    art = report["artifacts"][artifact]
    assert set(art["per_case"]) == {f"random/b{b}" for b in BATCHES}
    for case, diffs in art["per_case"].items():
        for output in ("controls", "trajectory"):
            assert diffs[output]["max_abs"] <= 1e-4, (case, output, diffs)
    assert report["passed"] and art["max_abs"] <= 1e-4


def test_onnx_batch_axis_is_dynamic_and_named(exported):
    _, _, out, _ = exported
    session = ort.InferenceSession(str(out / "policy.onnx"))
    assert [i.name for i in session.get_inputs()] == ["image", "state", "tokens"]
    assert [o.name for o in session.get_outputs()] == ["controls", "trajectory"]
    assert all(i.shape[0] == "batch" for i in session.get_inputs())
    assert session.get_inputs()[0].shape == ["batch", 32, 32, 3]
    assert session.get_outputs()[1].shape == ["batch", 10, 2]


def test_onnx_is_checker_clean_and_carries_metadata(exported):
    model, _, out, _ = exported
    proto = onnx.load(str(out / "policy.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model_version"] == "9.9.9-test"
    assert meta["training_data_version"] == "abc123.dir"
    assert len(meta["config_hash"]) == 16
    assert meta["input_names"] == "image,state,tokens" and meta["output_names"] == "controls,trajectory"
    inputs = json.loads(meta["inputs"])
    assert [(i["name"], i["dtype"], i["shape"]) for i in inputs] == [
        ("image", "uint8", ["batch", 32, 32, 3]), ("state", "float32", ["batch", 8]),
        ("tokens", "int64", ["batch", 48])]
    assert json.loads(meta["outputs"])[1]["shape"] == ["batch", 10, 2]
    assert json.loads(meta["tokenizer"])["max_length"] == 48
    assert json.loads(meta["model_config"]) == model.config.model_dump(mode="json")


def test_torchscript_trace_warnings_are_recorded_not_raised(exported):
    *_, warnings = exported
    assert any("deprecated" in w for w in warnings)


def test_parity_gate_fails_on_a_perturbed_onnx_file(exported, tmp_path):
    model, policy, out, _ = exported
    proto = onnx.load(str(out / "policy.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == "model.trajectory_head.fc2.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.01), init.name))
    onnx.save(proto, str(tmp_path / "policy.onnx"))

    cases = parity_cases(model, [1, 7], None)
    report = check_parity(policy, {"onnx": onnx_runner(tmp_path / "policy.onnx")}, cases, atol=1e-4)
    assert not report["passed"]
    assert report["artifacts"]["onnx"]["outputs"]["trajectory"]["max_abs"] > 1e-3
    # Only the trajectory head was touched: the controls still agree.
    assert report["artifacts"]["onnx"]["outputs"]["controls"]["max_abs"] <= 1e-4
    with pytest.raises(ParityError, match="onnx: trajectory differs"):
        enforce(report)

    untouched = check_parity(policy, {"onnx": onnx_runner(out / "policy.onnx")}, cases, atol=1e-4)
    enforce(untouched)  # the original file passes the same gate


FRESH_LOAD = """
import sys, numpy as np, torch
# A fresh interpreter that never imports the project: the files must stand alone.
image = torch.from_numpy(np.load(sys.argv[2]))
state = torch.from_numpy(np.load(sys.argv[3]))
tokens = torch.from_numpy(np.load(sys.argv[4]))
kind = sys.argv[5]
module = torch.jit.load(sys.argv[1]) if kind == "ts" else torch.export.load(sys.argv[1]).module()
with torch.inference_mode():
    controls, trajectory = module(image, state, tokens)
assert "models" not in sys.modules and "stages" not in sys.modules
np.save(sys.argv[6], controls.numpy()); np.save(sys.argv[7], trajectory.numpy())
"""


@pytest.mark.parametrize("kind, file", [("ts", "policy.torchscript.pt"), ("pt2", "policy.pt2")])
def test_artifact_loads_in_a_fresh_process_and_reproduces_outputs(exported, tmp_path, kind, file):
    model, policy, out, _ = exported
    inputs = random_inputs(model, 7, seed=7)
    paths = [tmp_path / f"{n}.npy" for n in ("image", "state", "tokens", "controls", "trajectory")]
    for p, t in zip(paths, inputs):
        np.save(p, t.numpy())
    run_python(FRESH_LOAD, str(out / file), *map(str, paths[:3]), kind, *map(str, paths[3:]))
    with torch.no_grad():
        controls, trajectory = policy(*inputs)
    np.testing.assert_allclose(np.load(paths[3]), controls.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(paths[4]), trajectory.numpy(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- predict


def write_image(path: Path, size: int, seed: int = 3) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_predict_without_torch_equals_pytorch(exported, tmp_path):
    model, policy, out, _ = exported
    pixels = write_image(tmp_path / "cam.png", 32)
    state = "3.5,0.1,-0.05,0.4,0.0,0.0,0.2,0.0"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.predict_cli", "--model", str(out),
                           "--image", str(tmp_path / "cam.png"), "--command", "turn left", "--state", state],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and "PIL" in imported
    # typer itself may pull in pydantic (it supports pydantic-typed options); torch, onnx and the
    # project's torch code must stay out.
    assert not {m for m in imported if m.split(".")[0] in {"torch", "onnx", "models", "stages"}}
    result = json.loads(proc.stdout)

    with torch.no_grad():
        controls, trajectory = policy(torch.from_numpy(pixels)[None],
                                      torch.tensor([[float(v) for v in state.split(",")]]),
                                      model.tokenize(["turn left"]))
    got = [result["controls"][k] for k in ("throttle", "steer", "brake")]
    np.testing.assert_allclose(got, controls[0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result["trajectory"], trajectory[0].numpy(), atol=1e-5, rtol=0)
    assert result["model_version"] == "9.9.9-test"


def test_predict_resizes_other_image_sizes(exported, tmp_path):
    from flows.predict_cli import load_image, predict_files

    _, _, out, _ = exported
    write_image(tmp_path / "big.png", 80)
    assert load_image(tmp_path / "big.png", 32).shape == (1, 32, 32, 3)
    result = predict_files(out, tmp_path / "big.png", "follow the lane")
    assert len(result["trajectory"]) == 10 and 0.0 <= result["controls"]["throttle"] <= 1.0


@pytest.mark.parametrize("bad, message", [
    ({"--model": "missing-dir"}, "not found: pass the export folder"),
    ({"--image": "missing.png"}, "image .* not found"),
    ({"--state": "1,2,3"}, "--state has 3 values, the model takes 8"),
    ({"--state": "a,b"}, "expected 8 comma-separated numbers"),
])
def test_predict_bad_input_exits_non_zero_with_a_clear_message(exported, tmp_path, bad, message):
    from typer.testing import CliRunner

    from flows.predict_cli import app

    _, _, out, _ = exported
    write_image(tmp_path / "cam.png", 32)
    args = {"--model": str(out), "--image": str(tmp_path / "cam.png"), "--command": "turn left"}
    args.update({k: (str(tmp_path / v) if k != "--state" else v) for k, v in bad.items()})
    result = CliRunner().invoke(app, [x for kv in args.items() for x in kv])
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output


def test_export_of_a_corrupt_checkpoint_names_the_file_and_exits_1(tmp_path):
    """A truncated model.safetensors in the online checkpoint: the export stage stops with exit 1 and a
    message naming the file (no traceback), and writes no exports."""
    src = tmp_path / "checkpoints" / "online"
    DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32)).save_pretrained(src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = subprocess.run([sys.executable, "-m", "stages.export", "--preset", "smoke", "--params", "none.yaml",
                           "--set", f"online.out={src}", "--set", f"export.out={tmp_path / 'exports'}"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "exports").exists()
