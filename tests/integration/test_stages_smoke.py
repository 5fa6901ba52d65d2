"""Every stage on the `smoke` preset, in order, in a scratch directory: the stages' own `run`."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from stages.config import build_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="module")
def cfg():
    return build_config(preset="smoke")


@pytest.fixture(autouse=True)
def _in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


def test_data(cfg, workdir):
    from stages.data.stage import run

    result = run(cfg)
    manifest = json.loads((workdir / "data/sim/manifest.json").read_text())
    assert len(manifest["episodes"]) == cfg.data.episodes
    assert {e["split"] for e in manifest["episodes"]} == {"train", "val"}
    assert result["metrics"]["steps"] > 0
    with np.load(workdir / "data/sim" / manifest["episodes"][0]["file"]) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape[1:] == (cfg.env.image_size, cfg.env.image_size, 3)
        assert len(z["captions"]) == len(z["actions"]) == len(z["rewards"])


def test_data_resumes_recorded_episodes(cfg, workdir):
    from stages.data.stage import run

    first = workdir / "data/sim/episodes/ep-00000.npz"
    before = first.stat().st_mtime_ns
    run(cfg)
    assert first.stat().st_mtime_ns == before, "an already recorded episode was recorded again"


def test_pretrain(cfg, workdir):
    from stages.pretrain import run

    m = run(cfg)["metrics"]
    assert (workdir / "checkpoints/pretrain/model.safetensors").exists()
    assert 0.0 <= m["i2t_recall@1"] <= 1.0 and m["chance@1"] > 0
    assert json.loads((workdir / "metrics/pretrain.json").read_text())["pairs"] == m["pairs"]


def test_offline(cfg, workdir):
    from stages.offline import run

    m = run(cfg)["metrics"]
    assert (workdir / "checkpoints/offline/config.json").exists()
    assert np.isfinite(m["val_l2_mean"]) and np.isfinite(m["const_velocity_l2_mean"])


def test_online(cfg, workdir):
    from stages.online import run

    # Two held-out episodes per side, so the paired error of the gain exists.
    m = run(cfg.model_copy(update={"online": cfg.online.model_copy(update={"eval_episodes": 2})}))["metrics"]
    assert m["timesteps"] >= cfg.online.total_timesteps
    assert 0.0 <= m["after_route_completion"] <= 1.0
    assert (workdir / "checkpoints/online/model.safetensors").exists()
    # Before and after drive the same seeds: the gain comes with its paired error and episode counts.
    assert m["route_completion_gain"] == pytest.approx(m["after_route_completion"] - m["before_route_completion"])
    assert m["route_completion_gain_stderr"] >= 0.0
    assert m["episodes_improved"] + m["episodes_worsened"] <= cfg.online.eval_episodes
    assert "before_route_completion_per_episode" not in m
    # How the episodes ended: each ends one way at most.
    for side in ("before", "after"):
        rates = [m[f"{side}_{k}"] for k in ("collision_rate", "off_road_rate", "route_completed_rate")]
        assert all(0.0 <= r <= 1.0 for r in rates) and sum(rates) <= 1.0 + 1e-9


def test_export(cfg, workdir):
    from stages.export import run

    m = run(cfg)["metrics"]
    assert m["onnx_parity_passed"] and m["onnx_max_abs_error"] <= 1e-4
    session = ort.InferenceSession(str(workdir / "exports/policy.onnx"))
    assert [i.name for i in session.get_inputs()] == ["image", "state", "tokens"]


def test_online_sac_from_a_given_checkpoint(cfg, workdir, caplog):
    """`online.algo=sac` runs the same stage, and `online.init_from` (what scheduled retraining sets to
    the production checkpoint) replaces the offline checkpoint as the starting point."""
    import logging

    from stages.config import build_config
    from stages.online import run

    sac = build_config(preset="smoke", overrides=["online.algo=sac", "online.init_from=checkpoints/pretrain",
                                                  "online.out=checkpoints/online-sac"])
    with caplog.at_level(logging.INFO, logger="models.driving_vla"):
        m = run(sac)["metrics"]
    assert any("loaded DrivingVLA from checkpoints/pretrain" in r.getMessage() for r in caplog.records)
    assert m["timesteps"] >= sac.online.total_timesteps
    assert (workdir / "checkpoints/online-sac/model.safetensors").exists()


def test_online_sac_seeds_its_replay_buffer_with_the_built_dataset(cfg, workdir, monkeypatch):
    """`online.sac.offline_ratio` > 0: the stage hands the built dataset's train split to SAC, whose
    replay buffer then holds its transitions (offline-to-online); a missing dataset is a clear error."""
    from stages.common import StageInputError
    from stages.config import build_config
    from stages.data.shards import load_split_arrays
    from stages.online import offline_transitions, run
    from stages.rl import sac as sac_module

    sac = build_config(preset="smoke", overrides=["online.algo=sac", "online.sac.offline_ratio=0.5",
                                                  "online.out=checkpoints/online-sac-offline"])
    seen = {}
    original = sac_module.SACTrainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["offline_rows"] = self.buffer.offline_size
        seen["given"] = kwargs.get("offline_data")

    monkeypatch.setattr(sac_module.SACTrainer, "__init__", spy)
    run(sac)
    train = load_split_arrays(sac.data.built, "train")
    assert seen["given"] is not None and len(seen["given"].states) == len(train.states)
    assert 0 < seen["offline_rows"] <= len(train.states)
    with pytest.raises(StageInputError, match="run the data stage first"):
        offline_transitions(sac.model_copy(update={"data": sac.data.model_copy(update={"built": "data/none"})}))
