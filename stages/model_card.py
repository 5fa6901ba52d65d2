"""The model card written next to the exported artifacts (``model_card.json`` + ``model_card.md``),
and the version facts it shares with the ONNX metadata: model version, config hash, data versions.

Data and checkpoint versions are the md5 hashes DVC recorded in ``dvc.lock`` for each stage's
output; without a ``dvc.lock`` (a stage run by hand) they read ``"unversioned"``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from infra.dvc_files import lock_outs
from infra.files import sha256_file
from models.config import DrivingVLAConfig

log = logging.getLogger(__name__)

UNVERSIONED = "unversioned"

INTENDED_USE = (
    "Research and simulation: closed-loop driving in the embedded highway simulator or CARLA, "
    "benchmarking export runtimes, and as a starting point for further training. "
    "One forward pass maps one RGB camera frame, the ego state and a short English command to "
    "throttle / steer / brake and a waypoint trajectory in the ego frame."
)
LIMITATIONS = [
    "Not a safety-certified component: never drive a real vehicle with it.",
    "Trained only in simulation (see data versions); no claim about real camera images, weather, "
    "sensors or traffic it has not seen.",
    "Commands are free text but training used a small set of templates; other phrasings are "
    "tokenised fine yet mean little to the model.",
    "Deterministic (the mode of the policy): no uncertainty estimate is exported; the value head "
    "and exploration noise are left out.",
    "Inputs must already be preprocessed as the 'inputs' table says (square RGB uint8 at the "
    "model's image size, state in the environment's field order, byte-token ids).",
    "No temporal smoothing, rate limiting or fallback: the vehicle stack must add them.",
]


def config_hash(config: DrivingVLAConfig | dict[str, Any]) -> str:
    """sha256 (16 hex) of the model config as canonical JSON: equal configs hash equally."""
    data = config.model_dump(mode="json") if isinstance(config, DrivingVLAConfig) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def package_version() -> str:
    try:
        return metadata.version("drivevla")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def model_version(weights: str | Path, override: str | None = None) -> str:
    """``<package version>+w<first 12 hex of the weights' sha256>`` unless ``override`` is given:
    two exports of the same weights get the same version, any retraining a new one."""
    if override:
        return override
    return f"{package_version()}+w{sha256_file(weights, 12)}"


def dvc_versions(lock: str | Path = "dvc.lock") -> dict[str, str]:
    """``{out path: md5}`` of every stage output recorded in ``lock`` (empty if there is none)."""
    lock = Path(lock)
    if not lock.is_file():
        return {}
    try:
        versions = lock_outs(lock.parent, lock.name)
    except yaml.YAMLError as exc:
        log.warning("%s is not valid YAML (%s); treating outputs as unversioned", lock, exc)
        return {}
    return {path: md5 or UNVERSIONED for path, md5 in versions.items()}


def data_version(data_path: str | Path, lock: str | Path = "dvc.lock") -> str:
    """The md5 DVC recorded for ``data_path`` (e.g. ``data/sim``), else ``"unversioned"``."""
    return dvc_versions(lock).get(str(Path(data_path)).rstrip("/"), UNVERSIONED)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; left out of the model card", path)
        return None


def training_stages(checkpoints: dict[str, str | Path], metrics_dir: str | Path,
                    lock: str | Path = "dvc.lock") -> list[dict[str, Any]]:
    """One entry per training stage: its checkpoint's DVC version and the metrics it reported."""
    versions = dvc_versions(lock)
    stages = []
    for name, path in checkpoints.items():
        facts = _read_json(Path(path) / "training.json") or {}
        metrics = _read_json(Path(metrics_dir) / f"{name}.json") or facts.get("metrics") or {}
        entry = {"stage": name, "checkpoint": str(path),
                 "version": versions.get(str(Path(path)).rstrip("/"), UNVERSIONED), "metrics": metrics}
        if "algo" in facts:
            entry["algo"] = facts["algo"]
        stages.append(entry)
    return stages


def build_card(*, config: DrivingVLAConfig, parameters: int, version: str, io: dict[str, Any],
               artifacts: dict[str, dict[str, Any]], stages: list[dict[str, Any]], data: dict[str, str],
               parity: dict[str, Any], latency: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """The card as a JSON-serialisable dict (``render_markdown`` turns it into the .md)."""
    evaluation = next((s["metrics"] for s in stages if s["stage"] == "online" and s["metrics"]), {})
    return {
        "name": "DrivingVLA deterministic policy",
        "model_version": version,
        "config_hash": config_hash(config),
        "source_checkpoint": source,
        "architecture": {
            "summary": "ViT image encoder + byte-level text transformer + ego-state MLP, fused by a "
                       "transformer; heads: policy (mode of a "
                       f"{config.policy.replace('_', ' ')}) and waypoint trajectory",
            "parameters": parameters,
            "config": config.model_dump(mode="json"),
        },
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "artifacts": artifacts,
        "training": stages,
        "data_versions": data,
        "evaluation": evaluation,
        "parity": {"atol": parity["atol"], "passed": parity["passed"], "cases": parity["cases"],
                   "max_abs": {k: a["max_abs"] for k, a in parity["artifacts"].items()},
                   "outputs": {k: a["outputs"] for k, a in parity["artifacts"].items()}},
        "latency": latency,
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }


def _shape(spec: dict[str, Any]) -> str:
    return "[" + ", ".join(str(d) for d in spec["shape"]) + "]"


def render_markdown(card: dict[str, Any]) -> str:
    """Markdown version of :func:`build_card`'s dict."""
    from stages.export_latency import format_table

    arch = card["architecture"]
    c = arch["config"]
    out = [f"# {card['name']} — {card['model_version']}", "",
           f"Config hash `{card['config_hash']}`, exported from `{card['source_checkpoint']}`.", "",
           "## Architecture", "", arch["summary"] + ".", "",
           f"{arch['parameters']:,} parameters; hidden size {c['hidden_dim']}, {c['vision_layers']} vision / "
           f"{c['text_layers']} text / {c['fusion_layers']} fusion layers, {c['num_heads']} heads, "
           f"{c['image_size']}×{c['image_size']} images in {c['patch_size']}-pixel patches, "
           f"{c['num_cameras']} camera(s), commands up to {c['max_text_length']} byte tokens.", "",
           "## Inputs and outputs", "", "| | name | dtype | shape | notes |", "|---|---|---|---|---|"]
    notes = {"image": "RGB, 0..255; normalised inside the model", "state": "ego state, environment field order",
             "tokens": "byte tokens: 0 pad, 1 bos, 2 eos, byte b -> b+3; right-padded",
             "controls": "throttle [0,1], steer [-1,1], brake [0,1]",
             "trajectory": "waypoints in metres, ego frame (x forward, y left)"}
    for kind, key in (("in", "inputs"), ("out", "outputs")):
        for spec in card[key]:
            out.append(f"| {kind} | `{spec['name']}` | {spec['dtype']} | {_shape(spec)} | {notes.get(spec['name'], '')} |")
    out += ["", "`batch` is dynamic in every artifact.", "", "## Artifacts", "",
            "| file | format | bytes | sha256 |", "|---|---|---:|---|"]
    for file, a in card["artifacts"].items():
        out.append(f"| `{file}` | {a['format']} | {a['bytes']:,} | `{a['sha256'][:16]}…` |")
    out += ["", "## Training", "", "| stage | checkpoint version (DVC md5) | key metrics |", "|---|---|---|"]
    for s in card["training"]:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in list(s["metrics"].items())[:6])
        out.append(f"| {s['stage']}{' (' + s['algo'] + ')' if 'algo' in s else ''} | `{s['version']}` | {shown or '-'} |")
    out += ["", "Data versions: " + (", ".join(f"`{k}` = `{v}`" for k, v in card["data_versions"].items()) or "none"),
            "", "## Evaluation (online stage, held-out seeds)", ""]
    if card["evaluation"]:
        out += ["| metric | value |", "|---|---:|"]
        out += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in card["evaluation"].items()]
    else:
        out.append("No evaluation metrics were found (metrics/online.json).")
    p = card["parity"]
    out += ["", "## Parity with PyTorch", "",
            f"Gate: max absolute difference ≤ {p['atol']:.0e} on every output, on {len(p['cases'])} cases "
            f"({', '.join(p['cases'])}). Result: **{'passed' if p['passed'] else 'FAILED'}**.", "",
            "| artifact | controls max abs | controls max rel | trajectory max abs | trajectory max rel |",
            "|---|---:|---:|---:|---:|"]
    for name, outs in p["outputs"].items():
        out.append(f"| {name} | {outs['controls']['max_abs']:.2e} | {outs['controls']['max_rel']:.2e} | "
                   f"{outs['trajectory']['max_abs']:.2e} | {outs['trajectory']['max_rel']:.2e} |")
    out += ["", "## Latency", ""]
    if card["latency"]:
        env = card["latency"]["environment"]
        out += [f"Measured on {env['cpu_count']} CPU(s) ({env['processor']}), torch {env['torch']}, "
                f"onnxruntime {env['onnxruntime']}.", "", format_table(card["latency"])]
    else:
        out.append("Not measured.")
    out += ["", "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    out += [f"- {line}" for line in card["limitations"]]
    return "\n".join(out) + "\n"
