"""The export stage's small parts, without exporting: the numpy tokenizer of `drivevla predict`,
DVC versions for the metadata and model card, the card, latency statistics, held-out inputs."""
import json

import numpy as np
import pytest
import torch
import yaml

from flows.predict_cli import encode_command, parse_state, PredictError
from models import DrivingVLA
from models.config import DrivingVLAConfig
from models.export_wrapper import DeterministicPolicy, io_spec
from models.tokenizer import ByteTokenizer
from stages.export_latency import format_table, percentiles, target, time_interleaved
from stages.export_parity import compare, heldout_inputs, parity_cases, ParityError
from stages.model_card import build_card, config_hash, data_version, dvc_versions, render_markdown


@pytest.mark.parametrize("text", ["turn left", "", "change to the right lane at the next exit",
                                  "gauche à l'intersection — virage", "x" * 300])
@pytest.mark.parametrize("max_length", [8, 48])
def test_numpy_tokenizer_equals_byte_tokenizer(text, max_length):
    expected = ByteTokenizer(max_length).encode([text]).numpy()
    got = encode_command(text, max_length)
    assert got.dtype == np.int64 and got.shape == (1, max_length)
    np.testing.assert_array_equal(got, expected)


def test_parse_state_defaults_to_zeros_and_checks_length():
    np.testing.assert_array_equal(parse_state(None, 8), np.zeros((1, 8), np.float32))
    assert parse_state("1, 2,3", 3).tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(PredictError, match="has 2 values"):
        parse_state("1,2", 3)


LOCK = {"schema": "2.0", "stages": {
    "data": {"cmd": "python -m stages.data", "outs": [{"path": "data/sim", "hash": "md5", "md5": "d41d8cd9.dir"}]},
    "online": {"cmd": "python -m stages.online", "outs": [{"path": "checkpoints/online", "md5": "0nl1ne.dir"}]},
}}


def test_data_version_comes_from_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    assert data_version("data/sim", lock) == "unversioned"  # no dvc.lock yet
    lock.write_text(yaml.safe_dump(LOCK))
    assert data_version("data/sim", lock) == "d41d8cd9.dir"
    assert data_version("data/sim/", lock) == "d41d8cd9.dir"
    assert data_version("data/other", lock) == "unversioned"
    assert dvc_versions(lock) == {"data/sim": "d41d8cd9.dir", "checkpoints/online": "0nl1ne.dir"}
    lock.write_text("stages: [unclosed")
    assert data_version("data/sim", lock) == "unversioned"


def test_config_hash_is_stable_and_sensitive():
    a = DrivingVLAConfig.from_size("tiny", image_size=32)
    assert config_hash(a) == config_hash(DrivingVLAConfig.from_size("tiny", image_size=32))
    assert config_hash(a) != config_hash(DrivingVLAConfig.from_size("tiny", image_size=64))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=48)).eval()
    return model, DeterministicPolicy(model).eval()


def test_model_card_has_every_section(tiny, tmp_path):
    model, _ = tiny
    parity = {"atol": 1e-4, "passed": True, "cases": ["random/b1", "heldout/b1"],
              "artifacts": {"onnx": {"max_abs": 3e-8, "passed": True, "outputs": {
                  "controls": {"max_abs": 1e-8, "max_rel": 1e-7}, "trajectory": {"max_abs": 3e-8, "max_rel": 2e-6}}}}}
    latency = {"threads": 2, "iters": 5, "warmup": 1, "ort_vs_eager_b1": 0.2, "target_ratio": 0.5, "target_met": True,
               "environment": {"cpu_count": 2, "processor": "x86_64", "torch": "2.13", "onnxruntime": "1.23"},
               "batches": {"1": {"eager": percentiles([0.005] * 5), "onnxruntime_cpu": percentiles([0.001] * 5)}}}
    stages = [{"stage": "online", "checkpoint": "checkpoints/online", "version": "0nl1ne.dir", "algo": "ppo",
               "metrics": {"after_route_completion": 0.8, "after_return": 12.5}}]
    card = build_card(config=model.config, parameters=model.count_parameters(), version="0.1.0+wabc", io=io_spec(model),
                      artifacts={"policy.onnx": {"format": "ONNX", "bytes": 10, "sha256": "ab" * 32}},
                      stages=stages, data={"data/sim": "d41d8cd9.dir"}, parity=parity, latency=latency,
                      source="checkpoints/online")
    json.dumps(card)  # serialisable as is
    assert card["evaluation"] == {"after_route_completion": 0.8, "after_return": 12.5}
    md = render_markdown(card)
    for heading in ("## Architecture", "## Inputs and outputs", "## Artifacts", "## Training", "## Evaluation",
                    "## Parity with PyTorch", "## Latency", "## Intended use", "## Limitations"):
        assert heading in md
    assert "`data/sim` = `d41d8cd9.dir`" in md and "0nl1ne.dir" in md and "**passed**" in md
    assert "| 1 | onnxruntime_cpu | 1.000 |" in md and f"{model.count_parameters():,} parameters" in md


def test_percentiles_in_milliseconds():
    stats = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(50.5) and stats["p95_ms"] == pytest.approx(95.05)
    assert stats["p99_ms"] == pytest.approx(99.01) and stats["iters"] == 100


def test_time_interleaved_takes_turns_of_consecutive_calls():
    order = []
    stats = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                             iters=5, warmup=1, blocks=2)
    # warm-up round, then turns of (1 untimed + 3 timed) and (1 untimed + 2 timed) calls each
    assert "".join(order) == "ab" + "aaaa" + "bbbb" + "aaa" + "bbb"
    assert stats["a"]["iters"] == stats["b"]["iters"] == 5


def test_latency_target_and_table():
    report = {"threads": 1, "iters": 3, "warmup": 1, "batches": {"1": {
        "eager": percentiles([0.004] * 3), "onnxruntime_cpu": percentiles([0.001] * 3)}}}
    report.update(target(report))
    assert report["ort_vs_eager_b1"] == 0.25 and report["target_met"] is True
    table = format_table(report)
    assert "| 1 | eager | 4.000 |" in table and "0.25x" in table and "target <= 0.5: met" in table


def test_compare_reports_abs_and_rel_and_rejects_shape_change():
    e = [np.array([[1.0, 0.0]], np.float32), np.zeros((1, 2, 2), np.float32)]
    g = [np.array([[1.001, 0.0]], np.float32), np.zeros((1, 2, 2), np.float32)]
    diffs = compare(e, g)
    assert diffs["controls"]["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert diffs["controls"]["max_rel"] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ParityError, match="shape"):
        compare(e, [g[0], np.zeros((1, 3, 2), np.float32)])
    nan = compare(e, [np.full((1, 2), np.nan, np.float32), g[1]])
    assert nan["controls"]["max_abs"] == float("inf")


def test_heldout_inputs_tolerate_a_missing_dataset(tiny, tmp_path):
    model, _ = tiny
    inputs, why = heldout_inputs(model, tmp_path / "no-data")
    assert inputs is None and "manifest.json not found" in why
    cases = parity_cases(model, [1, 7], None)
    assert list(cases) == ["random/b1", "random/b7"] and cases["random/b7"][0].shape == (7, 32, 32, 3)


def test_heldout_inputs_reject_images_of_another_size(tiny, tmp_path):
    model, _ = tiny
    n = 5
    ep = tmp_path / "episodes" / "ep-00000.npz"
    ep.parent.mkdir(parents=True)
    np.savez(ep, images=np.zeros((n, 16, 16, 3), np.uint8), states=np.zeros((n, 8), np.float32),
             actions=np.zeros((n, 3), np.float32), rewards=np.zeros(n, np.float32),
             terminated=np.zeros(n, bool), truncated=np.zeros(n, bool), poses=np.zeros((n, 3), np.float32),
             commands=np.array(["turn left"] * n), captions=np.array(["a road"] * n), perturbed=np.array(False))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"episodes": [{"file": "episodes/ep-00000.npz", "split": "val", "index": 0}]}))
    inputs, why = heldout_inputs(model, tmp_path)
    assert inputs is None and "recorded for another model" in why
