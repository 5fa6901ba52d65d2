"""The one checkpoint module (`stages.checkpoint`): keyed, atomic, loadable without unpickling code,
and a corrupt state file moved aside so that the run starts afresh instead of failing every time."""
from __future__ import annotations

import logging
import pathlib
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.checkpoint import (CORRUPT_SUFFIX, Checkpoint, CorruptStateError, capture_rng, read_state, restore,
                               restore_rng, snapshot, write_state)
from stages.resume import ResumePoint
from stages.rl.checkpoint import TrainingCheckpoint


class RunsCode:
    """A pickled object that writes a file when unpickled (what a hostile resume file could hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


def _state() -> dict:
    return {
        "model": OrderedDict(w=torch.randn(3, 2), b=torch.zeros(2)),
        "arrays": {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "u8": np.arange(4, dtype=np.uint8),
                   "bool": np.array([True, False]), "text": np.array(["turn left", "go"]),
                   "empty": np.zeros((0, 3)), "zero_d": np.array(2.5), "strided": np.arange(10)[::3]},
        "scalars": [np.float64(0.25), np.int64(7), np.bool_(True)],
        "counters": {"epoch": 3, "big": 2 ** 100, "none": None, "pair": (1, "a"), "size": torch.Size([2, 3])},
        "rng": {**capture_rng(), "trainer": np.random.default_rng(5).bit_generator.state},
    }


def _assert_equal(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    else:
        assert a == b


def test_state_round_trips_through_a_plain_data_file(tmp_path):
    state = _state()
    ckpt = Checkpoint(tmp_path / "resume.pt", key="k1")
    ckpt.save(state)
    _assert_equal(ckpt.load(), state)
    # Plain data: torch's weights-only loader reads the file as it is, no allow-list needed.
    blob = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert blob["key"] == "k1" and blob["state"]["counters"]["epoch"] == 3


def test_restored_rng_streams_continue_where_the_saved_run_stood(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    write_state(tmp_path / "s.pt", {"rng": capture_rng()})
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(read_state(tmp_path / "s.pt")["rng"])
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_snapshot_and_restore_bring_back_weights_optimiser_counters(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optim.step()
    Checkpoint(tmp_path / "r.pt", key="k").save(snapshot({"model": model, "optim": optim, "critic": None},
                                                        epoch=1, history=[{"epoch": 1, "loss": 0.5}]))
    after = torch.rand(3)
    other = torch.nn.Linear(3, 2)
    other_optim = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = Checkpoint(tmp_path / "r.pt", key="k").load()
    restore(state, {"model": other, "optim": other_optim, "critic": None})
    assert "critic" not in state and state["epoch"] == 1 and state["history"] == [{"epoch": 1, "loss": 0.5}]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_optim.state_dict()["state"][0]["step"] == optim.state_dict()["state"][0]["step"]
    assert torch.equal(torch.rand(3), after)  # the RNG went back to where the snapshot was taken


def test_dict_and_tuple_subclasses_are_saved_as_plain_containers(tmp_path):
    from collections import Counter, defaultdict, namedtuple

    pair = namedtuple("pair", "a b")
    write_state(tmp_path / "s.pt", {"events": Counter(collision=2), "d": defaultdict(list, x=[1]), "p": pair(1, 2)})
    assert read_state(tmp_path / "s.pt") == {"events": {"collision": 2}, "d": {"x": [1]}, "p": (1, 2)}


def test_a_state_of_other_settings_is_not_resumed_and_is_kept(tmp_path):
    Checkpoint(tmp_path / "r.pt", key="a").save({"epoch": 2})
    assert Checkpoint(tmp_path / "r.pt", key="b").load() is None
    assert Checkpoint(tmp_path / "r.pt", key="a").load() == {"epoch": 2}
    assert Checkpoint(tmp_path / "r.pt").load() == {"epoch": 2}  # no key: any state


def test_a_resume_file_holding_code_is_refused_moved_aside_and_nothing_runs(tmp_path, caplog):
    marker = tmp_path / "marker"
    path = tmp_path / "runs" / "offline" / "resume.pt"
    path.parent.mkdir(parents=True)
    torch.save({"format": 2, "key": "k", "state": {"epoch": 1, "payload": RunsCode(marker)}}, path)
    resume = ResumePoint("offline", "k", root=tmp_path / "runs")
    with caplog.at_level(logging.WARNING, logger="stages.checkpoint"):
        assert resume.load() is None
    assert not marker.exists()
    aside = path.with_name("resume.pt" + CORRUPT_SUFFIX)
    assert aside.is_file() and not path.exists()
    assert str(path) in caplog.text and str(aside) in caplog.text and "pickled objects" in caplog.text
    with pytest.raises(CorruptStateError, match="pickled objects"):
        read_state(aside)
    assert not marker.exists()
    # The payload was live: the old loader (weights_only=False) would have run it.
    torch.load(aside, weights_only=False)
    assert marker.read_text() == "code ran"


def _truncated(path: Path) -> None:
    write_state(path, _state(), key="k")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x17garbage, not a state file" * 40)


@pytest.mark.parametrize("damage", [_truncated, _garbage], ids=["truncated", "garbage"])
def test_a_corrupt_resume_state_is_moved_aside_and_the_run_starts_fresh(tmp_path, caplog, damage):
    resume = ResumePoint("pretrain", "k", root=tmp_path)
    damage(resume.path)
    with pytest.raises(CorruptStateError, match=str(resume.path)):
        read_state(resume.path)
    with caplog.at_level(logging.WARNING, logger="stages.checkpoint"):
        assert resume.load() is None
    assert "truncated or corrupt" in caplog.text and "starting afresh" in caplog.text
    assert (tmp_path / "pretrain" / "resume.pt.corrupt").is_file() and not resume.path.exists()
    # The next run saves and resumes as usual (no longer failing the same way every time).
    resume.save({"epoch": 1})
    assert ResumePoint("pretrain", "k", root=tmp_path).load() == {"epoch": 1}


@pytest.mark.parametrize("damage", [_truncated, _garbage], ids=["truncated", "garbage"])
def test_a_corrupt_rl_checkpoint_is_moved_aside(tmp_path, damage):
    ckpt = TrainingCheckpoint(tmp_path, key="k")
    damage(ckpt.path)
    assert ckpt.load() is None
    assert (tmp_path / "checkpoint.pt.corrupt").is_file() and not ckpt.exists()


def test_a_file_of_the_old_pickled_format_is_moved_aside(tmp_path):
    # What stages.training.save_trainer_state wrote before: numpy's RNG state pickled as objects.
    path = tmp_path / "runs" / "pretrain" / "resume.pt"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "rng": {"numpy": np.random.get_state()}, "fingerprint": "k"}, path)
    assert ResumePoint("pretrain", "k", root=tmp_path / "runs").load() is None
    assert path.with_name("resume.pt.corrupt").is_file()


def test_saving_what_is_not_plain_data_fails_and_keeps_the_previous_file(tmp_path):
    ckpt = Checkpoint(tmp_path / "r.pt", key="k")
    ckpt.save({"epoch": 1})
    with pytest.raises(TypeError, match=r"state\['extra'\]\['fn'\]: a function"):
        ckpt.save({"epoch": 2, "extra": {"fn": _state}})
    with pytest.raises(TypeError, match="numpy array of Python objects"):
        ckpt.save({"epoch": 2, "objects": np.array([object()])})
    assert ckpt.load() == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.pt"]  # no temporary left behind


def test_resume_and_rl_checkpoints_share_one_file_format(tmp_path):
    ResumePoint("offline", "k", root=tmp_path).save({"epoch": 4})
    TrainingCheckpoint(tmp_path / "online", key="k").save({"global_step": 64})
    assert Checkpoint(tmp_path / "offline" / "resume.pt", key="k").load() == {"epoch": 4}
    assert read_state(tmp_path / "online" / "checkpoint.pt") == {"global_step": 64}
