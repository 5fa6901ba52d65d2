"""`drivevla predict` on bad input: a truncated or corrupt ONNX file, decompression bombs and non-images,
non-finite state values and non-finite outputs. Each fails with a clear message naming the file or the
value and what to do, exit code 2, no traceback, and stdout never holds NaN / Infinity (not JSON).

The policy here is a hand-built ONNX graph with drivevla's metadata (no torch export: milliseconds):
controls = sqrt(state[:, :3]) (so a negative state gives NaN controls), trajectory = state[:, :2]."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from typer.testing import CliRunner

from flows.predict_cli import MAX_IMAGE_PIXELS, app

IMAGE_SIZE, STATE_DIM, MAX_LENGTH = 8, 4, 16


def tiny_policy(path: Path) -> Path:
    const = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    nodes = [helper.make_node("Slice", ["state", "zero", "three", "one"], ["first3"]),
             helper.make_node("Sqrt", ["first3"], ["controls"]),
             helper.make_node("Slice", ["state", "zero", "two", "one"], ["first2"]),
             helper.make_node("Reshape", ["first2", "traj_shape"], ["trajectory"])]
    graph = helper.make_graph(
        nodes, "tiny_policy",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", IMAGE_SIZE, IMAGE_SIZE, 3]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", STATE_DIM]),
         helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", MAX_LENGTH])],
        [helper.make_tensor_value_info("controls", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("trajectory", TensorProto.FLOAT, ["batch", 1, 2])],
        initializer=[const("zero", [0]), const("one", [1]), const("two", [2]), const("three", [3]),
                     const("traj_shape", [-1, 1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {
        "model_config": json.dumps({"image_size": IMAGE_SIZE, "state_dim": STATE_DIM, "num_cameras": 1}),
        "tokenizer": json.dumps({"max_length": MAX_LENGTH}), "model_version": "0.0.1-test"})
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "policy.onnx")
    return path


@pytest.fixture()
def export_dir(tmp_path):
    return tiny_policy(tmp_path / "exports")


@pytest.fixture()
def camera(tmp_path):
    path = tmp_path / "cam.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(path)
    return path


def predict(model: Path, image: Path, state: str | None = "4,1,0,0"):
    args = ["--model", str(model), "--image", str(image), "--command", "turn left"]
    return CliRunner().invoke(app, args + (["--state", state] if state is not None else []))


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"output is not strict JSON: it holds {constant}")
    return json.loads(text, parse_constant=refuse)


def assert_refused(result, *fragments: str) -> str:
    """Exit code 2, a one-line `error:` naming what is wrong, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def test_good_input_prints_strict_json(export_dir, camera):
    result = predict(export_dir, camera)
    assert result.exit_code == 0, result.output
    out = strict_json(result.stdout)
    assert out["controls"] == {"throttle": 2.0, "steer": 1.0, "brake": 0.0}
    assert out["trajectory"] == [[4.0, 1.0]] and out["model_version"] == "0.0.1-test"


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_onnx_names_the_file_and_how_to_get_it_back(export_dir, camera, keep):
    onnx_file = export_dir / "policy.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: int(len(data) * keep)])
    message = assert_refused(predict(export_dir, camera), str(onnx_file), "truncated or corrupt",
                             "drivevla stage export", "dvc pull")
    assert onnx_file.stat().st_size == int(len(data) * keep)   # predict never writes to it
    assert "\n" not in message.strip()


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` pixels and holds none (a few dozen bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [50_000, 12_000, 8_500])   # past PIL's error, past its warning, ours only
def test_decompression_bomb_is_refused_before_decoding(export_dir, tmp_path, side):
    assert side * side > MAX_IMAGE_PIXELS
    bomb = png_header_only(tmp_path / f"bomb{side}.png", side, side)
    assert_refused(predict(export_dir, bomb), str(bomb), "decompression bomb", "pass a camera image")


@pytest.mark.parametrize("content", [b"not an image at all\n", b"truncated-png"])
def test_non_image_and_truncated_image_are_refused(export_dir, camera, tmp_path, content):
    path = tmp_path / "photo.png"
    path.write_bytes(camera.read_bytes()[:40] if content == b"truncated-png" else content)
    assert_refused(predict(export_dir, path), str(path), "is not an image PIL can read", "PNG or JPEG")


@pytest.mark.parametrize("state, position, given", [
    ("nan,0,0,0", 1, "nan"), ("0,inf,0,0", 2, "inf"), ("0,0,-inf,0", 3, "-inf"),
    ("0,0,0,1e39", 4, "1e39"),     # finite in Python, infinite as the model's float32
])
def test_non_finite_state_is_refused_naming_the_value(export_dir, camera, state, position, given):
    assert_refused(predict(export_dir, camera, state), f"--state value {position} of {STATE_DIM}",
                   repr(given), "not a finite number")


def test_a_non_finite_output_is_an_error_never_nan_in_json(export_dir, camera):
    # sqrt(-1): the graph itself produces NaN, as broken weights would.
    assert_refused(predict(export_dir, camera, "-1,0,0,0"), str(export_dir / "policy.onnx"),
                   "non-finite controls", "drivevla stage export")
