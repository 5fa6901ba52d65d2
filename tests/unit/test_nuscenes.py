"""nuScenes writer and reader on tiny synthetic drives, checked by the real nuscenes-devkit.

The drives are built from closed-form motions (a straight line, arcs), so every waypoint, speed and
command the reader returns is known in advance.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nuscenes")

from stages.data.nuscenes_reader import read_nuscenes, validate_nuscenes  # noqa: E402
from stages.data.nuscenes_schema import NuScenesFormatError, command_from_trajectory  # noqa: E402
from stages.data.nuscenes_writer import write_nuscenes  # noqa: E402
from stages.data.recorder import Episode  # noqa: E402

DT, SPEED, STEPS, SIZE = 0.1, 5.0, 61, 32      # 61 steps at 10 Hz -> 13 keyframes -> 7 with a 3 s future
VERSION = "v1.0-mini"


def motion(x0: float, y0: float, yaw0: float, rate: float, steps: int = STEPS) -> np.ndarray:
    """Poses [N, 3] of a car at SPEED with a constant yaw rate (closed form, so no integration error)."""
    t = np.arange(steps) * DT
    yaw = yaw0 + rate * t
    if rate == 0:
        x, y = x0 + SPEED * t * math.cos(yaw0), y0 + SPEED * t * math.sin(yaw0)
    else:
        r = SPEED / rate
        x, y = x0 + r * (np.sin(yaw) - math.sin(yaw0)), y0 - r * (np.cos(yaw) - math.cos(yaw0))
    return np.stack([x, y, yaw], axis=1).astype(np.float32)


def expected_waypoints(rate: float, horizon: int = 6) -> np.ndarray:
    """Future positions 0.5 s apart in the ego frame (x forward, y left) of a constant-rate motion."""
    tau = 0.5 * np.arange(1, horizon + 1)
    if rate == 0:
        return np.stack([SPEED * tau, np.zeros_like(tau)], axis=1)
    r = SPEED / rate
    return np.stack([r * np.sin(rate * tau), r * (1 - np.cos(rate * tau))], axis=1)


def episode(poses: np.ndarray, command: str, seed: int) -> Episode:
    n = len(poses)
    rng = np.random.default_rng(seed)
    states = np.zeros((n, 8), dtype=np.float32)
    states[:, 0] = SPEED
    actions = np.tile(np.array([0.4, 0.1, 0.0], dtype=np.float32), (n, 1))
    return Episode(images=rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), states=states,
                   actions=actions, rewards=np.zeros(n, np.float32), terminated=np.zeros(n, bool),
                   truncated=np.zeros(n, bool), poses=poses, commands=[command] * n,
                   captions=[f"a test drive: {command}"] * n, collisions=np.zeros(n, bool),
                   route_completion=1.0, perturbed=False)


def straight_agents() -> list[np.ndarray]:
    """Per step: a car 10 m ahead driving along (track 7) and a parked car at (30, 3.5) (track 8)."""
    out = []
    for t in range(STEPS):
        x = SPEED * t * DT
        out.append(np.array([[x + 10.0, 0.0, 0.0, 5.0, 2.0, 7], [30.0, 3.5, 0.0, 4.0, 1.8, 8]]))
    return out


# Right-handed poses (left_handed=False): ep 0 straight along +x, ep 1 a left arc from a yawed start, ep 2 a
# straight line heading 2 rad. Default splits: 2 train (scene-0061, scene-0553), 1 val (scene-0103).
DRIVES = [((0.0, 0.0, 0.0, 0.0), "follow the lane"), ((20.0, 10.0, 0.3, 0.2), "turn left at the next intersection"),
          ((10.0, -3.0, 2.0, 0.0), "follow the lane")]


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nusc") / "nuscenes"
    eps = [episode(motion(*d[0]), d[1], seed=i) for i, d in enumerate(DRIVES)]
    return write_nuscenes(eps, root, VERSION, keyframe_every=5, other_agents=[straight_agents(), None, None],
                          left_handed=False)


@pytest.fixture(scope="module")
def samples(dataroot: Path):
    return read_nuscenes(dataroot, VERSION, split=None, image_size=16)


def rows_of(samples, scene: str) -> list[int]:
    return [i for i, s in enumerate(samples.scene_names) if s == scene]


def test_devkit_loads_the_written_dataset(dataroot: Path) -> None:
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud

    nusc = NuScenes(version=VERSION, dataroot=str(dataroot), verbose=False)
    assert sorted(s["name"] for s in nusc.scene) == ["scene-0061", "scene-0103", "scene-0553"]
    assert len(nusc.sample) == 3 * 13 and all(s["nbr_samples"] == 13 for s in nusc.scene)
    assert all("map_token" in rec for rec in nusc.log)
    assert nusc.map[0]["mask"].mask().ndim == 2

    scene = next(s for s in nusc.scene if s["name"] == "scene-0061")
    sample = nusc.get("sample", scene["first_sample_token"])
    assert set(sample["data"]) == {"CAM_FRONT", "LIDAR_TOP"} and len(sample["anns"]) == 2
    path, boxes, intrinsic = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
    assert Path(path).is_file() and intrinsic.shape == (3, 3)
    assert len(LidarPointCloud.from_file(nusc.get_sample_data_path(sample["data"]["LIDAR_TOP"])).points.T) == 8 + 2
    ann = nusc.get("sample_annotation", sample["anns"][0])
    instance = nusc.get("instance", ann["instance_token"])
    assert instance["nbr_annotations"] == 13 and ann["category_name"] == "vehicle.car"
    attrs = {nusc.get("attribute", nusc.get("sample_annotation", t)["attribute_tokens"][0])["name"]
             for t in sample["anns"]}
    assert attrs == {"vehicle.moving", "vehicle.stopped"}
    assert "turn left" in next(s for s in nusc.scene if s["name"] == "scene-0553")["description"]


def test_ten_drives_fill_the_mini_split_for_the_devkit_helpers(tmp_path: Path) -> None:
    # create_splits_logs needs every scene of the split present: 8 train + 2 val drives make a whole mini.
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import create_splits_logs

    eps = [episode(motion(0, 0, 0, 0.0, steps=11), "follow the lane", i) for i in range(10)]
    root = write_nuscenes(eps, tmp_path / "mini", VERSION, splits=["train"] * 8 + ["val"] * 2)
    nusc = NuScenes(version=VERSION, dataroot=str(root), verbose=False)
    assert len(create_splits_logs("mini_train", nusc)) == 8 and len(create_splits_logs("mini_val", nusc)) == 2
    with pytest.raises(ValueError, match="official mini_train scene names"):
        write_nuscenes(eps[:9], tmp_path / "too-many", VERSION, splits=["train"] * 9)


def test_can_bus_api_reads_the_written_messages(dataroot: Path) -> None:
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus

    can = NuScenesCanBus(dataroot=str(dataroot))
    monitor = can.get_messages("scene-0061", "vehicle_monitor")
    assert len(monitor) == STEPS
    assert monitor[0]["vehicle_speed"] == pytest.approx(18.0) and monitor[0]["throttle"] == 400
    assert monitor[0]["steering"] == pytest.approx(36.0)  # steer 0.1 of a 360 deg wheel, positive right
    route, pose = can.get_pose_and_route("scene-0553", print_warnings=False)
    assert route.shape == pose.shape == (STEPS, 2)
    assert can.get_messages("scene-0553", "steeranglefeedback")[0]["value"] == pytest.approx(math.radians(36.0))


def test_straight_drive_gives_known_waypoints_speed_agents(samples) -> None:
    rows = rows_of(samples, "scene-0061")
    assert len(rows) == 7
    want = np.array([[2.5, 0], [5, 0], [7.5, 0], [10, 0], [12.5, 0], [15, 0]])
    for i in rows:
        np.testing.assert_allclose(samples.trajectories[i], want, atol=1e-4)
        assert samples.commands[i] == "go straight"
        assert samples.speed[i] == pytest.approx(SPEED) and samples.yaw_rate[i] == pytest.approx(0.0, abs=1e-6)
        assert samples.speed_from_can[i]
    assert samples.images.shape == (len(samples), 16, 16, 3) and samples.images.dtype == np.uint8
    agents = samples.agents[rows[2]]   # keyframe 2: ego at x = 5
    np.testing.assert_allclose(agents, [[10, 0, 0, 5, 2], [25, 3.5, 0, 4, 1.8]], atol=1e-4)
    assert samples.captions[rows[0]].startswith("a test drive")


def test_left_arc_from_a_yawed_start(samples) -> None:
    rows = rows_of(samples, "scene-0553")
    want = expected_waypoints(0.2)
    assert want[-1, 1] > 2.0   # 4.37 m to the left after 3 s
    for i in rows:
        np.testing.assert_allclose(samples.trajectories[i], want, atol=1e-3)
        assert samples.commands[i] == "turn left"
        assert samples.yaw_rate[i] == pytest.approx(0.2, abs=1e-4)


def test_yawed_straight_line_and_the_val_split(dataroot: Path) -> None:
    val = read_nuscenes(dataroot, VERSION, split="val")          # "val" means mini_val on a mini version
    assert set(val.scene_names) == {"scene-0103"} and val.images.shape[1:] == (SIZE, SIZE, 3)
    np.testing.assert_allclose(val.trajectories, np.broadcast_to(expected_waypoints(0.0), (7, 6, 2)), atol=1e-4)
    assert set(val.commands) == {"go straight"}
    train = read_nuscenes(dataroot, VERSION, split="mini_train")
    assert set(train.scene_names) == {"scene-0061", "scene-0553"}


def test_speed_from_ego_poses_without_can_bus(dataroot: Path, tmp_path: Path) -> None:
    copy = tmp_path / "nusc"
    shutil.copytree(dataroot, copy)
    shutil.rmtree(copy / "can_bus")
    s = read_nuscenes(copy, VERSION, split="mini_train")
    assert not s.speed_from_can.any()
    straight, left = rows_of(s, "scene-0061"), rows_of(s, "scene-0553")
    np.testing.assert_allclose(s.speed[straight], SPEED, atol=1e-4)
    # On the arc the central difference over +-0.5 s sees the chord: 2 R sin(0.1) = 4.9917 m in 1 s.
    np.testing.assert_allclose(s.speed[left], 2 * SPEED / 0.2 * math.sin(0.1), atol=1e-3)
    np.testing.assert_allclose(s.yaw_rate[left], 0.2, atol=1e-4)


def test_command_threshold() -> None:
    base = np.zeros((6, 2))
    assert command_from_trajectory(base + [0, 2.0]) == "turn left"
    assert command_from_trajectory(base + [0, -2.0]) == "turn right"
    assert command_from_trajectory(base + [0, 1.99]) == "go straight"


def test_simulator_frame_is_mirrored_into_nuscenes(tmp_path: Path) -> None:
    # highway-env / CARLA: y to the right, positive yaw turns right. A positive yaw rate there is a right turn.
    sim_poses = motion(0.0, 0.0, 0.0, 0.2)
    root = write_nuscenes([episode(sim_poses, "turn right at the next intersection", 0)], tmp_path / "n",
                          scene_names=["scene-0001"], version="v1.0-trainval", left_handed=True)
    s = read_nuscenes(root, "v1.0-trainval")
    want = expected_waypoints(0.2) * [1, -1]
    np.testing.assert_allclose(s.trajectories[0], want, atol=1e-3)
    assert set(s.commands) == {"turn right"} and s.yaw_rate[0] == pytest.approx(-0.2, abs=1e-4)


def test_trainval_names_and_fallback_split(tmp_path: Path) -> None:
    eps = [episode(motion(0, 0, 0, 0.0), "follow the lane", i) for i in range(3)]
    root = write_nuscenes(eps, tmp_path / "tv", version="v1.0-trainval", splits=["train", "val", "train"])
    from nuscenes.utils.splits import create_splits_scenes

    official = create_splits_scenes()
    s = read_nuscenes(root, "v1.0-trainval", split="val")
    assert set(s.scene_names) <= set(official["val"]) and len(set(s.scene_names)) == 1
    # Names outside the official lists: a deterministic split (sorted by name, the last fifth is val).
    # The saved form of an episode (Episode.to_arrays, as the data stage's npz files hold it) works too.
    custom = write_nuscenes([e.to_arrays() for e in eps], tmp_path / "custom", version="v1.0-trainval",
                            scene_names=["scene-1201", "scene-1202", "scene-1203"])
    assert set(read_nuscenes(custom, "v1.0-trainval", split="val").scene_names) == {"scene-1203"}
    assert set(read_nuscenes(custom, "v1.0-trainval", split="train").scene_names) == {"scene-1201", "scene-1202"}


def test_several_cameras(tmp_path: Path) -> None:
    ep = episode(motion(0, 0, 0, 0.0), "follow the lane", 0)
    ep.images = np.stack([ep.images, 255 - ep.images, ep.images // 2], axis=1)   # [N, 3, H, W, 3]
    root = write_nuscenes([ep], tmp_path / "cams", "v1.0-trainval")
    s = read_nuscenes(root, "v1.0-trainval", num_cameras=3, image_size=16)
    assert s.images.shape == (7, 3, 16, 16, 3) and s.channels == ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT")
    with pytest.raises(NuScenesFormatError, match="no channel 'CAM_BACK_LEFT'"):
        read_nuscenes(root, "v1.0-trainval", num_cameras=4)


def test_writer_is_atomic_and_does_not_overwrite(tmp_path: Path, dataroot: Path) -> None:
    with pytest.raises(FileExistsError):
        write_nuscenes([episode(motion(0, 0, 0, 0), "x", 0)], dataroot)
    bad = episode(motion(0, 0, 0, 0), "x", 0)
    bad.images = bad.images.astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        write_nuscenes([bad], tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


# -- corrupt folders ---------------------------------------------------------------------------------

def corrupt_copy(dataroot: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "nusc"
    shutil.copytree(dataroot, copy)
    return copy


def test_missing_table_is_named(dataroot: Path, tmp_path: Path) -> None:
    root = corrupt_copy(dataroot, tmp_path)
    (root / VERSION / "ego_pose.json").unlink()
    with pytest.raises(NuScenesFormatError, match=r"table 'ego_pose'.*ego_pose\.json is missing"):
        read_nuscenes(root, VERSION)


def test_bad_token_reference_is_named(dataroot: Path, tmp_path: Path) -> None:
    root = corrupt_copy(dataroot, tmp_path)
    path = root / VERSION / "sample_data.json"
    rows = json.loads(path.read_text())
    rows[3]["ego_pose_token"] = "0" * 32
    path.write_text(json.dumps(rows))
    with pytest.raises(NuScenesFormatError) as err:
        validate_nuscenes(root, VERSION)
    assert f"sample_data[{rows[3]['token']}].ego_pose_token" in str(err.value)
    assert "table 'ego_pose'" in str(err.value)


def test_missing_image_is_named(dataroot: Path, tmp_path: Path) -> None:
    root = corrupt_copy(dataroot, tmp_path)
    victim = sorted((root / "samples" / "CAM_FRONT").glob("*.jpg"))[4]
    victim.unlink()
    with pytest.raises(NuScenesFormatError, match=re.escape(victim.name)):
        read_nuscenes(root, VERSION)


def test_log_without_map_and_missing_version(dataroot: Path, tmp_path: Path) -> None:
    root = corrupt_copy(dataroot, tmp_path)
    path = root / VERSION / "map.json"
    maps = json.loads(path.read_text())
    maps[0]["log_tokens"] = maps[0]["log_tokens"][1:]
    path.write_text(json.dumps(maps))
    with pytest.raises(NuScenesFormatError, match=r"in no map record's log_tokens \(table 'map'\)"):
        validate_nuscenes(root, VERSION)
    with pytest.raises(NuScenesFormatError, match="v1.0-trainval"):
        validate_nuscenes(root, "v1.0-trainval")


def drop_camera_keyframe(root: Path, scene_index: int = 0, sample_index: int = 2, version: str = VERSION) -> str:
    """Demote the CAM_FRONT keyframe of one sample to a sweep (a camera dropout): the sample keeps its
    lidar and annotations but has no CAM_FRONT keyframe. Returns the sample's token."""
    tables = {n: json.loads((root / version / f"{n}.json").read_text())
              for n in ("scene", "sample", "sample_data", "calibrated_sensor", "sensor")}
    scene = sorted(tables["scene"], key=lambda s: s["name"])[scene_index]
    by_token = {s["token"]: s for s in tables["sample"]}
    token = scene["first_sample_token"]
    for _ in range(sample_index):
        token = by_token[token]["next"]
    front = {s["token"] for s in tables["sensor"] if s["channel"] == "CAM_FRONT"}
    front_cs = {c["token"] for c in tables["calibrated_sensor"] if c["sensor_token"] in front}
    rows = tables["sample_data"]
    hits = [r for r in rows
            if r["sample_token"] == token and r["is_key_frame"] and r["calibrated_sensor_token"] in front_cs]
    assert len(hits) == 1
    hits[0]["is_key_frame"] = False
    (root / version / "sample_data.json").write_text(json.dumps(rows))
    return token


def test_a_keyframe_without_cam_front_is_skipped_and_counted(dataroot: Path, samples, tmp_path: Path, caplog) -> None:
    root = corrupt_copy(dataroot, tmp_path)
    token = drop_camera_keyframe(root)
    with caplog.at_level("WARNING", logger="stages.data.nuscenes_reader"):
        got = read_nuscenes(root, VERSION, split=None, image_size=16)
    assert got.skipped_samples == 1 and samples.skipped_samples == 0
    assert len(got) == len(samples) - 1
    assert token in set(samples.sample_tokens) and token not in set(got.sample_tokens)
    assert "1 keyframe(s) skipped" in caplog.text and token in caplog.text
    # Every other keyframe reads exactly as from the intact folder.
    keep = [i for i, t in enumerate(samples.sample_tokens) if t != token]
    np.testing.assert_array_equal(got.images, samples.images[keep])
    np.testing.assert_allclose(got.trajectories, samples.trajectories[keep])


def test_strict_mode_rejects_the_folder_naming_the_sample(dataroot: Path, tmp_path: Path) -> None:
    root = corrupt_copy(dataroot, tmp_path)
    token = drop_camera_keyframe(root)
    with pytest.raises(NuScenesFormatError, match=rf"sample\[{token}\] has no keyframe CAM_FRONT record"):
        read_nuscenes(root, VERSION, strict=True)
    with pytest.raises(NuScenesFormatError, match=token):
        validate_nuscenes(root, VERSION, strict=True)


def test_the_build_counts_skipped_nuscenes_samples(dataroot: Path, tmp_path: Path) -> None:
    from stages.data.build import build_dataset

    root = corrupt_copy(dataroot, tmp_path)
    token = drop_camera_keyframe(root)
    kwargs = dict(sources=["nuscenes"], nuscenes_root=root, nuscenes_version=VERSION, horizon=6, stride=5,
                  sim_dt=0.1, image_size=16, shard_size=16)
    intact = build_dataset(tmp_path / "intact", **{**kwargs, "nuscenes_root": dataroot})
    built = build_dataset(tmp_path / "built", **kwargs)
    assert intact["sources"]["nuscenes"]["skipped_samples"] == 0
    assert built["sources"]["nuscenes"]["skipped_samples"] == 1
    total = lambda manifest: sum(c["samples"] for c in manifest["counts"].values())  # noqa: E731
    assert total(built) == total(intact) - 1
    with pytest.raises(NuScenesFormatError, match=token):
        build_dataset(tmp_path / "built", **kwargs, nuscenes_strict=True)
    assert json.loads((tmp_path / "built" / "manifest.json").read_text())["counts"] == built["counts"]  # kept


# -- other vehicles from highway-env ------------------------------------------------------------------

def test_other_vehicle_boxes_from_highway_env() -> None:
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("highway_env")
    from stages.data.agents import other_vehicle_boxes

    env = gym.make("highway-v0", config={"vehicles_count": 5})
    try:
        env.reset(seed=0)
        base = env.unwrapped
        others = [v for v in base.road.vehicles if v is not base.vehicle]
        boxes = other_vehicle_boxes(env)
        assert boxes.shape == (len(others), 5)
        v = others[0]
        # Same right-handed frame as the backend's info["ego_pose"]: highway-env's y and heading mirrored.
        np.testing.assert_allclose(boxes[0], [v.position[0], -v.position[1], -v.heading, v.LENGTH, v.WIDTH], atol=1e-6)
        first = other_vehicle_boxes(env, with_ids=True)[:, 5]
        env.step(env.action_space.sample())
        assert np.array_equal(other_vehicle_boxes(env, with_ids=True)[:, 5], first)
    finally:
        env.close()
