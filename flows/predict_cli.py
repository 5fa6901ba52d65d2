"""``drivevla predict``: run an exported policy on one image and a command, with onnxruntime only.

This module imports numpy, PIL, onnxruntime and typer — nothing from torch or the rest of the
project — so it runs on a machine that has only those installed (``pip install numpy pillow
onnxruntime typer``), standalone as ``python -m flows.predict_cli``. Everything it needs to know
about the model (image size, state size, tokenizer) it reads from the ONNX file's metadata.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import onnxruntime as ort
import typer
from PIL import Image, UnidentifiedImageError

ONNX_FILE = "policy.onnx"
CONTROL_NAMES = ("throttle", "steer", "brake")

# A camera frame is at most a few megapixels; a file declaring more is refused before it is decoded
# (a small PNG can declare 50000 x 50000 pixels and take gigabytes to decode: a decompression bomb).
MAX_IMAGE_PIXELS = 64_000_000
REEXPORT_HINT = ("re-export it (`drivevla stage export`) or fetch the tracked copy again "
                 "(`dvc pull exports`)")

# The byte tokenizer of models/tokenizer.py, restated in numpy: 0 pad, 1 bos, 2 eos, byte b -> b + 3.
PAD_ID, BOS_ID, EOS_ID, BYTE_OFFSET = 0, 1, 2, 3


class PredictError(ValueError):
    """Bad input to ``predict``: the message says what is wrong and what to pass instead."""


def encode_command(text: str, max_length: int) -> np.ndarray:
    """``int64 [1, max_length]`` token ids, exactly as ``ByteTokenizer.encode([text])``: the UTF-8
    bytes (cut so that eos still fits) between bos and eos, right-padded with 0."""
    body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[: max_length - 2].astype(np.int64) + BYTE_OFFSET
    ids = np.full((1, max_length), PAD_ID, dtype=np.int64)
    ids[0, 0] = BOS_ID
    ids[0, 1:1 + len(body)] = body
    ids[0, 1 + len(body)] = EOS_ID
    return ids


def load_image(path: str | Path, size: int) -> np.ndarray:
    """``uint8 [1, size, size, 3]`` RGB; other sizes are resized (bilinear), other modes converted.

    The declared size is checked from the header before any pixel is decoded (PIL's own bomb check,
    which raises at twice its ``MAX_IMAGE_PIXELS`` and only warns below, is turned into the same error).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise PredictError(_too_large(path, f"{width}x{height} pixels, more than the "
                                                          f"{MAX_IMAGE_PIXELS:,} predict decodes", size))
                rgb = img.convert("RGB")
    except PredictError:
        raise
    except FileNotFoundError:
        raise PredictError(f"image {path} not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PredictError(_too_large(path, f"too many pixels ({exc})", size)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # PIL reports broken files with any of these (SyntaxError for malformed PNG chunks).
        raise PredictError(f"{path} is not an image PIL can read ({exc}); pass a PNG or JPEG file") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)[None]


def _too_large(path: str | Path, declared: str, size: int) -> str:
    return (f"image {path} declares {declared}: refused as a possible decompression bomb (not a camera "
            f"frame); pass a camera image (the model takes {size}x{size}, larger ones are resized)")


def parse_state(text: str | None, dim: int) -> np.ndarray:
    """``float32 [1, dim]`` from ``"v1,v2,..."`` (zeros when not given)."""
    if text is None or not text.strip():
        return np.zeros((1, dim), dtype=np.float32)
    texts = [v for v in text.replace(" ", "").split(",") if v != ""]
    try:
        values = [float(v) for v in texts]
    except ValueError:
        raise PredictError(f"--state {text!r}: expected {dim} comma-separated numbers") from None
    if len(values) != dim:
        raise PredictError(f"--state has {len(values)} values, the model takes {dim} "
                           "(speed, lateral offset, heading error, last controls, ...)")
    with np.errstate(over="ignore"):   # a value past float32's range becomes inf, refused below
        state = np.asarray(values, dtype=np.float32)
    for i, (given, value) in enumerate(zip(texts, state.tolist())):
        if not math.isfinite(value):  # nan, inf, or past float32's range (1e39)
            raise PredictError(f"--state value {i + 1} of {dim} ({given!r}) is not a finite number "
                               f"(float32); pass finite numbers")
    return state[None]


class OnnxPolicy:
    """An exported policy folder (or ``policy.onnx`` file) opened with onnxruntime."""

    def __init__(self, model: str | Path, threads: int = 0) -> None:
        path = Path(model)
        path = path / ONNX_FILE if path.is_dir() else path
        if not path.is_file():
            raise PredictError(f"{path} not found: pass the export folder (exports/) or a policy.onnx file")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's InvalidProtobuf / Fail / InvalidGraph: no common base
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise PredictError(f"{path} is not a loadable ONNX model, truncated or corrupt ({detail}); "
                               f"{REEXPORT_HINT}") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.config = json.loads(self.metadata["model_config"])
            self.max_length = int(json.loads(self.metadata["tokenizer"])["max_length"])
        except (KeyError, ValueError) as exc:
            raise PredictError(f"{path} has no drivevla metadata ({exc}); export it with `python -m stages.export`") from None
        if self.config.get("num_cameras", 1) != 1:
            raise PredictError(f"{path} takes {self.config['num_cameras']} cameras; predict handles one image")

    def predict(self, image: np.ndarray, state: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
        try:
            controls, trajectory = self.session.run(["controls", "trajectory"],
                                                    {"image": image, "state": state, "tokens": tokens})
        except Exception as exc:  # onnxruntime's RuntimeException / InvalidArgument
            raise PredictError(f"onnxruntime failed running {self.path} ({str(exc).strip()[:300]}); "
                               f"{REEXPORT_HINT}") from None
        for name, values in (("controls", controls), ("trajectory", trajectory)):
            if not np.isfinite(values).all():
                raise PredictError(f"{self.path} gave a non-finite {name} ({values[0].tolist()}) for this input; "
                                   f"the exported weights may be broken: {REEXPORT_HINT}")
        return {"controls": dict(zip(CONTROL_NAMES, (float(v) for v in controls[0]))),
                "trajectory": trajectory[0].astype(float).tolist(),
                "model_version": self.metadata.get("model_version", "unknown")}


def predict_files(model: str | Path, image: str | Path, command: str, state: str | None = None) -> dict[str, Any]:
    """Load, preprocess, run: the whole of ``drivevla predict`` as a function."""
    policy = OnnxPolicy(model)
    return policy.predict(load_image(image, int(policy.config["image_size"])),
                          parse_state(state, int(policy.config["state_dim"])),
                          encode_command(command, policy.max_length))


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def predict(
    model: Annotated[Path, typer.Option("--model", help="export folder (holding policy.onnx) or an .onnx file")],
    image: Annotated[Path, typer.Option("--image", help="camera image (PNG/JPEG); resized to the model's size")],
    command: Annotated[str, typer.Option("--command", help='driving instruction, e.g. "turn left"')],
    state: Annotated[Optional[str], typer.Option(
        "--state", help="ego state as comma-separated numbers (default: zeros)")] = None,
) -> None:
    """Run the exported policy (onnxruntime, CPU) on one image and print controls and waypoints as JSON."""
    try:
        result = predict_files(model, image, command, state)
    except PredictError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=2, allow_nan=False))  # strict JSON: never NaN / Infinity


def main() -> None:
    app(prog_name="drivevla predict")


if __name__ == "__main__":
    sys.exit(main())
