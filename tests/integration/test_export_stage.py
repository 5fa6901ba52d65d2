"""The export stage on the smoke preset, in a scratch directory: real recorded data (held-out val
split), a DVC lock naming the data version, every artifact written, and the parity gate stopping a
run whose ONNX file was tampered with — leaving the previous exports/ exactly as it was."""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import numpy_helper

from stages.config import build_config

DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
FILES = {"policy.onnx", "policy.pt2", "policy.torchscript.pt", "parity.json", "latency.json", "model_card.json",
         "model_card.md", "pytorch"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export-stage")


@pytest.fixture(scope="module")
def cfg():
    return build_config(preset="smoke", overrides=["export.parity_batch_sizes=[1,7,32]"])


@pytest.fixture(autouse=True)
def _in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


def folder_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(cfg, workdir):
    """data (smoke) -> an online checkpoint -> export; returns the stage's result."""
    import os

    from models import DrivingVLA
    from stages.common import write_json
    from stages.data.stage import run as run_data
    from stages.export import run as run_export
    from stages.training import model_config, save_checkpoint

    old = os.getcwd()
    os.chdir(workdir)
    try:
        run_data(cfg)
        torch.manual_seed(0)
        online = {"after_return": 3.25, "after_route_completion": 0.5}
        save_checkpoint(DrivingVLA(model_config(cfg)), cfg.online.out,
                        extra={"stage": "online", "algo": "ppo", "metrics": online})
        write_json(Path(cfg.metrics_dir) / "online.json", online)
        (workdir / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            "data": {"cmd": "python -m stages.data", "outs": [{"path": "data/sim", "hash": "md5", "md5": DATA_MD5}]},
            "online": {"cmd": "python -m stages.online", "outs": [{"path": "checkpoints/online", "md5": "c0ffee.dir"}]},
        }}))
        return run_export(cfg)
    finally:
        os.chdir(old)


def test_export_writes_every_artifact(exported, workdir):
    out = workdir / "exports"
    assert {p.name for p in out.iterdir()} == FILES
    assert (out / "pytorch" / "model.safetensors").is_file() and (out / "pytorch" / "training.json").is_file()
    assert not list(workdir.glob(".exports*")), "a staging folder was left behind"
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.rglob("*")), "artifacts must be readable by all"
    assert exported["paths"]["onnx"] == "exports/policy.onnx"


def test_parity_covers_random_and_heldout_inputs(exported, workdir):
    parity = json.loads((workdir / "exports/parity.json").read_text())
    assert parity["passed"] and "val split" in parity["heldout"]
    expected = {f"{kind}/b{b}" for kind in ("random", "heldout") for b in (1, 7, 32)}
    assert set(parity["cases"]) == expected
    for name in ("onnx", "torchscript", "torch_export"):
        art = parity["artifacts"][name]
        assert set(art["per_case"]) == expected
        assert art["outputs"]["controls"]["max_abs"] <= 1e-4 and art["outputs"]["trajectory"]["max_abs"] <= 1e-4
    assert any("deprecated" in w for w in parity["torchscript_trace_warnings"])
    m = exported["metrics"]
    assert m["parity_passed"] and m["onnx_parity_passed"] and m["heldout_inputs"] and m["parity_cases"] == 6
    assert json.loads((workdir / "metrics/export.json").read_text())["model_version"] == m["model_version"]


def test_onnx_metadata_names_versions_and_data(exported, workdir):
    session = ort.InferenceSession(str(workdir / "exports/policy.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["training_data_version"] == DATA_MD5
    assert meta["model_version"] == exported["metrics"]["model_version"]
    assert meta["model_version"].startswith("0.1.0+w") or "+w" in meta["model_version"]
    assert json.loads(meta["inputs"])[0]["shape"] == ["batch", 32, 32, 3]
    assert [i.name for i in session.get_inputs()] == ["image", "state", "tokens"]


def test_latency_and_model_card(exported, workdir):
    latency = json.loads((workdir / "exports/latency.json").read_text())
    assert set(latency["batches"]) == {"1", "32"}
    for runtimes in latency["batches"].values():
        assert {"eager", "torchscript", "torch_export", "onnxruntime_cpu"} <= set(runtimes)
        assert all(0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] for s in runtimes.values())
    assert latency["ort_vs_eager_b1"] > 0
    card = json.loads((workdir / "exports/model_card.json").read_text())
    assert card["data_versions"] == {"data/sim": DATA_MD5}
    assert card["evaluation"] == {"after_return": 3.25, "after_route_completion": 0.5}
    assert [s["version"] for s in card["training"]] == ["unversioned", "unversioned", "c0ffee.dir"]
    assert set(card["artifacts"]) == {"policy.onnx", "policy.pt2", "policy.torchscript.pt"}
    md = (workdir / "exports/model_card.md").read_text()
    assert DATA_MD5 in md and "## Limitations" in md and "onnxruntime_cpu" in md


def test_parity_gate_stops_a_tampered_export_and_keeps_the_previous_one(exported, workdir, monkeypatch):
    import stages.export as export_stage

    before = folder_digest(workdir / "exports")
    metrics_before = (workdir / "metrics/export.json").read_bytes()
    real_export_onnx = export_stage.export_onnx

    def tampered_export_onnx(program, inputs, path, metadata=None):
        real_export_onnx(program, inputs, path, metadata)
        proto = onnx.load(str(path))
        init = next(i for i in proto.graph.initializer if i.name == "model.policy_head.fc2.bias")
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.1), init.name))
        onnx.save(proto, str(path))

    monkeypatch.setattr(export_stage, "export_onnx", tampered_export_onnx)
    monkeypatch.setattr(sys, "argv", ["python -m stages.export", "--preset", "smoke",
                                      "--set", "export.parity_batch_sizes=[1,7]"])
    with pytest.raises(SystemExit) as exc:
        export_stage.main()
    assert "parity failed" in str(exc.value.code) and "onnx: controls differs" in str(exc.value.code)
    assert folder_digest(workdir / "exports") == before, "the previous exports/ was modified"
    assert (workdir / "metrics/export.json").read_bytes() == metrics_before
    assert not list(workdir.glob(".exports*")), "a staging folder was left behind"
    failed = json.loads((workdir / "runs/export/parity_failed.json").read_text())
    assert not failed["artifacts"]["onnx"]["passed"] and failed["artifacts"]["torchscript"]["passed"]
