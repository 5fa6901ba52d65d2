"""What a nuScenes dataset records beside its tables, for drives written by ``nuscenes_writer``:
camera calibration, a LIDAR_TOP point cloud per keyframe, the CAN bus and the drivable-area map mask.
The conventions (units, frames, ranges) are the ones the module docstring of ``nuscenes_writer`` gives."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pyquaternion import Quaternion

from stages.data.nuscenes_schema import yaw_to_quaternion

MAP_RESOLUTION = 0.1                    # m / px: MapMask's native resolution
MAX_MAP_PX = 8192
MAP_MARGIN = 60.0                       # m of map around the paths: the devkit crops 40 m * sqrt(2) around the ego
ROAD_HALF_WIDTH = 4.0                   # m drawn as drivable on either side of a driven path
MAX_STEERING_WHEEL_DEG = 360.0          # steer = +-1 -> +-360 deg wheel, +-6.28 rad (inside nuScenes' range)
WHEEL_RADIUS = 0.3                      # m, for the rear wheel rpm of vehicle_monitor
LIDAR_HEIGHT = 1.84                     # m above the ego origin, as nuScenes' LIDAR_TOP
CAMERA_OFFSETS_DEG = {"CAM_FRONT": 0.0, "CAM_FRONT_LEFT": 55.0, "CAM_FRONT_RIGHT": -55.0,
                      "CAM_BACK_LEFT": 110.0, "CAM_BACK_RIGHT": -110.0, "CAM_BACK": 180.0}
BOX_HEIGHT = 1.5                        # m; the simulator's boxes are 2-D


def yaw_rates(poses: np.ndarray, dt: float) -> np.ndarray:
    if len(poses) < 2:
        return np.zeros(len(poses))
    return np.gradient(np.unwrap(poses[:, 2]), dt)


def camera_calibration(channel: str, width: int, height: int, fov_deg: float) -> dict[str, Any]:
    # Camera axes (x right, y down, z forward) in the ego frame (x forward, y left, z up), turned by the
    # channel's yaw: the same quaternion shape as nuScenes' cameras, e.g. [0.5, -0.5, 0.5, -0.5] for CAM_FRONT.
    cam_to_ego = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    q = Quaternion(axis=[0, 0, 1], degrees=CAMERA_OFFSETS_DEG[channel]) * Quaternion(matrix=cam_to_ego)
    yaw = math.radians(CAMERA_OFFSETS_DEG[channel])
    focal = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return {"translation": [1.5 * math.cos(yaw), 1.5 * math.sin(yaw), 1.5],
            "rotation": [float(v) for v in q.elements],
            "camera_intrinsic": [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]]}


def world_to_ego(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    c, s = math.cos(pose[2]), math.sin(pose[2])
    d = points[:, :2] - pose[:2]
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)


def write_lidar(path: Path, box_centres_ego: np.ndarray) -> None:
    """A tiny valid ``.pcd.bin`` (float32 x, y, z, intensity, ring): a ring of ground points and one point at
    the centre of every annotated box, so ``num_lidar_pts = 1`` is true of each box."""
    angles = np.linspace(0.0, 2.0 * np.pi, 8, endpoint=False)
    ground = np.stack([3.0 * np.cos(angles), 3.0 * np.sin(angles), np.full(8, -LIDAR_HEIGHT),
                       np.full(8, 10.0), np.zeros(8)], axis=1)
    boxes = np.zeros((len(box_centres_ego), 5))
    if len(box_centres_ego):
        boxes[:, :2] = box_centres_ego
        boxes[:, 2] = BOX_HEIGHT / 2.0 - LIDAR_HEIGHT
        boxes[:, 3] = 50.0
    np.concatenate([ground, boxes]).astype(np.float32).tofile(path)


def can_bus_messages(drive: Any, stamps: np.ndarray, dt: float) -> dict[str, Any]:
    """The CAN-bus messages of one drive, at every simulator step."""
    yaw_rate = yaw_rates(drive.poses, dt)
    accel = np.gradient(drive.speeds, dt) if len(drive.speeds) > 1 else np.zeros(len(drive.speeds))
    steer_deg = drive.actions[:, 1].astype(np.float64) * MAX_STEERING_WHEEL_DEG
    steer_speed = np.gradient(steer_deg, dt) if len(steer_deg) > 1 else np.zeros(len(steer_deg))
    pose, monitor, feedback = [], [], []
    for t in range(len(stamps)):
        x, y, yaw = (float(v) for v in drive.poses[t])
        v = float(drive.speeds[t])
        throttle, steer, brake = (float(a) for a in drive.actions[t])
        utime = int(stamps[t])
        pose.append({"utime": utime, "pos": [x, y, 0.0], "orientation": yaw_to_quaternion(yaw),
                     "vel": [v, 0.0, 0.0], "accel": [float(accel[t]), 0.0, 0.0],
                     "rotation_rate": [0.0, 0.0, float(yaw_rate[t])]})
        command = drive.commands[t].lower()
        rpm = v / (2.0 * math.pi * WHEEL_RADIUS) * 60.0
        monitor.append({
            "utime": utime, "available_distance": 200, "battery_level": 100,
            "brake": int(round(np.clip(brake, 0, 1) * 126)), "brake_switch": 2 if brake > 0.05 else 1,
            "gear_position": 7, "left_signal": int("left" in command), "right_signal": int("right" in command),
            "rear_left_rpm": round(rpm, 2), "rear_right_rpm": round(rpm, 2),
            "steering": round(float(steer_deg[t]), 1), "steering_speed": round(float(steer_speed[t]), 1),
            "throttle": int(round(np.clip(throttle, 0, 1) * 1000)), "vehicle_speed": round(v * 3.6, 2),
            "yaw_rate": round(math.degrees(float(yaw_rate[t])), 1)})
        feedback.append({"utime": utime, "value": math.radians(float(steer_deg[t]))})
    messages = {"pose": pose, "vehicle_monitor": monitor, "steeranglefeedback": feedback}
    meta = {}
    for name, msgs in messages.items():
        span = (msgs[-1]["utime"] - msgs[0]["utime"]) / 1e6 if len(msgs) > 1 else 0.0
        stats = {}
        for key in msgs[0]:
            if key != "utime" and isinstance(msgs[0][key], (int, float)):
                vals = np.array([m[key] for m in msgs], dtype=np.float64)
                stats[key] = {"max": float(vals.max()), "mean": float(vals.mean()), "min": float(vals.min()),
                              "std": float(vals.std())}
        meta[name] = {"message_count": len(msgs), "message_freq": len(msgs) / span if span else 0.0,
                      "timespan": span, "var_stats": stats}
    messages["meta"] = meta
    messages["route"] = [[float(x), float(y)] for x, y in drive.poses[:, :2]]
    return messages


def draw_map(path: Path, paths: list[np.ndarray]) -> None:
    reach = np.max([p[:, :2].max(axis=0) for p in paths if len(p)] or [np.zeros(2)], axis=0) + MAP_MARGIN
    width_px, height_px = (int(min(MAX_MAP_PX, max(100, math.ceil(r / MAP_RESOLUTION)))) for r in reach)
    mask = Image.new("L", (width_px, height_px), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, int(2 * ROAD_HALF_WIDTH / MAP_RESOLUTION))
    for p in paths:
        # MapMask's pixel of (x, y) is (x / res, height - y / res): image rows grow southwards.
        pts = [(float(x) / MAP_RESOLUTION, height_px - float(y) / MAP_RESOLUTION) for x, y in p[:, :2]]
        if len(pts) > 1:
            draw.line(pts, fill=255, width=width, joint="curve")
        # Discs at every pose fill the slivers PIL leaves between the segments of a wide polyline.
        for px, py in pts:
            draw.ellipse((px - width / 2, py - width / 2, px + width / 2, py + width / 2), fill=255)
    mask.save(path, optimize=True)
