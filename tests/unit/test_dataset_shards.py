"""The built training dataset: shards, manifest counts, the DataLoader over shards, and the build from
both sources (recorded drives and the same drives written and read back as nuScenes)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stages.data.build import build_dataset, resample_trajectory, write_sim_as_nuscenes
from stages.data.dataset import DatasetError
from stages.data.recorder import Episode, future_agent_boxes
from stages.data import shards as shards_module
from stages.data.shards import (ShardedDataset, ShardWriter, collate, load_split_arrays, make_loader, read_manifest,
                                write_manifest)
from stages.common import write_json

SPEED, DT, SIZE = 5.0, 0.1, 32


def _episode_arrays(n: int, base: int) -> dict[str, np.ndarray]:
    """Shard arrays of a fake episode whose samples carry their global id in states[:, 1]."""
    states = np.zeros((n, 8), np.float32)
    states[:, 1] = base + np.arange(n)
    nxt = np.arange(1, n + 1, dtype=np.int32)
    nxt[-1] = -1
    return {"images": np.full((n, 4, 4, 3), base % 255, np.uint8), "states": states,
            "actions": np.zeros((n, 3), np.float32), "expert_actions": np.zeros((n, 3), np.float32),
            "action_valid": np.ones(n, bool), "rewards": np.ones(n, np.float32), "terminated": np.zeros(n, bool),
            "next_index": nxt, "trajectories": np.zeros((n, 2, 2), np.float32), "traj_valid": np.ones(n, bool),
            "commands": np.array(["go"] * n), "captions": np.array([f"c{base + i}" for i in range(n)]),
            "perturbed": np.zeros(n, bool), "episode": np.full(n, base, np.int32),
            "agent_boxes": np.tile(np.arange(6, dtype=np.float32), (2 * n, 1)) + np.repeat(base + np.arange(n), 2)[:, None],
            "agent_offsets": np.arange(0, 2 * n + 1, 2, dtype=np.int64)}


@pytest.fixture()
def shard_root(tmp_path):
    shards = []
    for split, eps in (("train", [(7, 0), (5, 100), (9, 200), (4, 300)]), ("val", [(6, 1000)])):
        w = ShardWriter(tmp_path, split, "sim", shard_size=10)
        for n, base in eps:
            w.add(_episode_arrays(n, base))
        w.flush()
        shards += w.shards
    write_manifest(tmp_path, shards, {"trajectory": {"length": 2, "step_seconds": 0.3}})
    return tmp_path


def test_shards_hold_whole_episodes_and_the_manifest_counts_them(shard_root):
    m = read_manifest(shard_root)
    train = [s for s in m["shards"] if s["split"] == "train"]
    assert [s["samples"] for s in train] == [12, 13]          # 7+5 reaches 10, then 9+4 at the end
    assert m["counts"]["train"] == {"samples": 25, "episodes": 4, "shards": 2,
                                    "by_source": {"sim": {"samples": 25, "episodes": 4}}}
    assert m["counts"]["val"]["samples"] == 6


def test_next_index_points_to_the_next_step_of_the_same_episode(shard_root):
    s = load_split_arrays(shard_root, "train")
    ids = s.states[:, 1]
    has = s.next_index >= 0
    assert has.sum() == 25 - 4                                  # every step but each episode's last
    np.testing.assert_array_equal(ids[s.next_index[has]], ids[has] + 1)
    for i in (0, 8, 24):                                        # agent rows follow their sample across shards
        np.testing.assert_array_equal(s.agents(i)[:, 0], [ids[i], ids[i]])


def test_loader_with_workers_yields_every_sample_once_in_a_seeded_order(shard_root):
    ds = ShardedDataset(shard_root, "train", shuffle=True, seed=3, with_next=True)
    orders = []
    for epoch in (0, 0, 1):
        ds.set_epoch(epoch)
        ids = torch.cat([b.share["state"][:, 1] for b in make_loader(ds, batch_size=4, num_workers=2)]).tolist()
        assert sorted(ids) == sorted(load_split_arrays(shard_root, "train").states[:, 1].tolist())
        orders.append(ids)
    assert orders[0] == orders[1] and orders[0] != orders[2]
    batch = next(iter(make_loader(ds, batch_size=25, num_workers=0))).share
    nxt = batch["next_state"][batch["has_next"]][:, 1]
    np.testing.assert_array_equal(nxt.numpy(), batch["state"][batch["has_next"]][:, 1].numpy() + 1)
    assert len(ShardedDataset(shard_root, "train", only_transitions=True)) == 21


def _loader_before_rank_shares(ds: ShardedDataset, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """The loader every rank used to read whole global batches from (then cut by `Distributed.split`)."""
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                       multiprocessing_context="forkserver" if num_workers else None)


def _assert_same_batch(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _shares_make_the_global_batches(ds: ShardedDataset, batch_size: int, num_workers: int) -> None:
    """For world sizes 1, 2, 3: each global batch's shares, in rank order, are the one-process batch."""
    want = list(_loader_before_rank_shares(ds, batch_size, num_workers))
    for world in (1, 2, 3):
        loaders = [make_loader(ds, batch_size, num_workers, rank=r, world_size=world, captions=True)
                   for r in range(world)]
        per_rank = [list(loader) for loader in loaders]
        for loader, items in zip(loaders, per_rank):
            assert len(loader) == len(items) == len(want)       # a progress bar's total
        for b, batch in enumerate(want):
            parts = [items[b] for items in per_rank]
            n = len(batch["caption"])
            assert [p.size for p in parts] == [n] * world
            assert all(p.captions == batch["caption"] for p in parts)
            sizes = [len(p.share["caption"]) for p in parts]
            assert sizes == [n // world] * (world - 1) + [n - (world - 1) * (n // world)]
            for p in parts:       # an empty share still has every key, dtype and trailing shape
                assert list(p.share) == list(batch)
                for key, value in batch.items():
                    if isinstance(value, torch.Tensor):
                        assert p.share[key].dtype == value.dtype and p.share[key].shape[1:] == value.shape[1:]
            union = {k: torch.cat([p.share[k] for p in parts]) if isinstance(v, torch.Tensor)
                     else sum((p.share[k] for p in parts), []) for k, v in batch.items()}
            _assert_same_batch(union, batch)
            if world == 1:
                _assert_same_batch(parts[0].share, batch)


@pytest.mark.parametrize("batch_size", [4, 7])
def test_rank_shares_concatenate_to_the_one_process_batches(shard_root, batch_size):
    # 25 samples: 6 x 4 + 1 (a last batch smaller than the world) or 3 x 7 + 4 (shares 1, 1, 2 of 3).
    ds = ShardedDataset(shard_root, "train", shuffle=True, seed=5, with_next=True)
    ds.set_epoch(1)
    _shares_make_the_global_batches(ds, batch_size, num_workers=0)


def test_rank_shares_concatenate_to_the_one_process_batches_with_workers(shard_root):
    # Two workers, one shard each (12 and 13 samples): each cuts its own batches, 5 5 2 and 5 5 3,
    # interleaved by the DataLoader: 6 global batches where ceil(25 / 5) would say 5.
    ds = ShardedDataset(shard_root, "train", shuffle=True, seed=5, with_next=True)
    assert len(make_loader(ds, 5, num_workers=2)) == 6
    _shares_make_the_global_batches(ds, batch_size=5, num_workers=2)


def test_a_rank_builds_only_the_samples_of_its_share(shard_root, monkeypatch):
    built: list[float] = []
    sample = shards_module._sample

    def counted(z, i, with_next):
        built.append(float(z["states"][i, 1]))
        return sample(z, i, with_next)

    monkeypatch.setattr(shards_module, "_sample", counted)
    ds = ShardedDataset(shard_root, "train", shuffle=True, seed=2, with_next=True)
    everyone = []
    # 25 samples in batches of 7, 7, 7, 4 over 3 ranks: shares 2 2 3, three times, then 1 1 2.
    for rank, expected in zip(range(3), (7, 7, 11)):
        built.clear()
        ids = sum((p.share["state"][:, 1].tolist() for p in make_loader(ds, 7, rank=rank, world_size=3)), [])
        assert built == ids and len(built) == expected     # its own samples only, each built once
        everyone += built
    assert sorted(everyone) == sorted(load_split_arrays(shard_root, "train").states[:, 1].tolist())


def test_a_corrupt_shard_is_named(shard_root):
    m = read_manifest(shard_root)
    (shard_root / m["shards"][0]["file"]).write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=m["shards"][0]["file"].split("/")[-1]):
        load_split_arrays(shard_root, "train")
    with pytest.raises(DatasetError, match="no 'test' shards"):
        ShardedDataset(shard_root, "test")


def test_resample_trajectory_is_exact_on_a_straight_line():
    times = 0.5 * np.arange(1, 7)
    traj = np.stack([SPEED * times, np.zeros(6)], axis=1)
    grid = 0.3 * np.arange(1, 11)
    np.testing.assert_allclose(resample_trajectory(traj, times, grid)[:, 0], SPEED * grid, atol=1e-5)


# -- the build from both sources --------------------------------------------------------------------

def _drive(n: int, y0: float, perturbed: bool, seed: int) -> Episode:
    """Straight along +x at SPEED, with one other car 20 m ahead in the same lane at the same speed."""
    t = np.arange(n) * DT
    poses = np.stack([SPEED * t, np.full(n, y0), np.zeros(n)], axis=1).astype(np.float32)
    other = np.stack([poses[:, 0] + 20.0, poses[:, 1], np.zeros(n), np.full(n, 5.0), np.full(n, 2.0),
                      np.full(n, 7.0)], axis=1).astype(np.float32)
    states = np.zeros((n, 8), np.float32)
    states[:, 0] = SPEED
    rng = np.random.default_rng(seed)
    return Episode(images=rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), states=states,
                   actions=np.tile(np.float32([0.5, 0.0, 0.0]), (n, 1)), rewards=np.ones(n, np.float32),
                   terminated=np.zeros(n, bool), truncated=np.eye(1, n, n - 1, dtype=bool)[0], poses=poses,
                   commands=["follow the lane"] * n, captions=[f"frame {i} of drive {seed}" for i in range(n)],
                   collisions=np.zeros(n, bool), route_completion=1.0, perturbed=perturbed,
                   expert_actions=np.tile(np.float32([0.6, 0.0, 0.0]), (n, 1)), agent_boxes=other,
                   agent_offsets=np.arange(n + 1, dtype=np.int64), dt=DT)


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory):
    pytest.importorskip("nuscenes")
    root = tmp_path_factory.mktemp("sim")
    (root / "episodes").mkdir()
    entries = []
    for i, (split, pert) in enumerate([("train", False), ("train", True), ("val", False)]):
        np.savez_compressed(root / f"episodes/ep-{i:05d}.npz", **_drive(51, 10.0 * i, pert, i).to_arrays())
        entries.append({"index": i, "file": f"episodes/ep-{i:05d}.npz", "split": split, "perturbed": pert})
    write_json(root / "manifest.json", {"source": "sim:test", "image_size": SIZE, "episodes": entries})
    return root


def test_future_agent_boxes_are_in_the_ego_frame_at_nuscenes_times():
    ep = _drive(51, 3.0, False, 0)
    rows = future_agent_boxes(ep, 0, seconds=3.0)
    np.testing.assert_allclose(rows[:, 0], 0.5 * np.arange(1, 7), atol=1e-6)
    np.testing.assert_allclose(rows[:, 1], 20.0 + SPEED * rows[:, 0], atol=1e-4)   # 20 m ahead, both moving
    np.testing.assert_allclose(rows[:, 2], 0.0, atol=1e-5)


def test_build_mixes_sim_and_nuscenes_with_the_same_trajectories(sim_root, tmp_path):
    nus = write_sim_as_nuscenes(sim_root, tmp_path / "nuscenes", keyframe_every=5)
    assert json.loads((nus / "v1.0-trainval" / "scene.json").read_text())[0]["name"].startswith("scene-")
    m = build_dataset(tmp_path / "built", sources=["sim", "nuscenes"], sim_root=sim_root, nuscenes_root=nus,
                      horizon=10, stride=3, sim_dt=DT, image_size=SIZE, shard_size=64)
    by = m["counts"]["train"]["by_source"]
    assert by["sim"] == {"samples": 102, "episodes": 2}
    assert by["nuscenes"]["samples"] == 2 * (11 - 6)            # 11 keyframes, 6 of future needed
    assert m["counts"]["val"]["by_source"]["nuscenes"]["samples"] == 5
    grid = 0.3 * np.arange(1, 11)
    for source in ("sim", "nuscenes"):
        s = load_split_arrays(tmp_path / "built", "train", sources=[source])
        ok = s.traj_valid
        assert ok.sum() > 0
        np.testing.assert_allclose(s.trajectories[ok][:, :, 0], np.broadcast_to(SPEED * grid, (ok.sum(), 10)), atol=1e-3)
        np.testing.assert_allclose(s.trajectories[ok][:, :, 1], 0.0, atol=1e-3)
        np.testing.assert_allclose(s.states[:, 0], SPEED, atol=1e-3)
        a = s.agents(0)
        np.testing.assert_allclose(a[:, 0], 0.5 * np.arange(1, 7), atol=1e-3)   # the car ahead, every 0.5 s
        np.testing.assert_allclose(a[:, 1], 20.0 + SPEED * a[:, 0], atol=1e-3)
    sim = load_split_arrays(tmp_path / "built", "train", sources=["sim"])
    assert sim.action_valid.all() and np.allclose(sim.expert_actions[:, 0], 0.6) and sim.perturbed.sum() == 51
    nu = load_split_arrays(tmp_path / "built", "train", sources=["nuscenes"])
    assert not nu.action_valid.any() and (nu.next_index == -1).all()
    assert len(set(nu.captions.tolist())) == 2 and all(math.isfinite(v) for v in m["stats"]["trajectory_std"][0])
