"""The ego's sensors: an RGB camera whose frames are matched to the tick that rendered them, and collision
and lane-invasion sensors whose events are buffered until the step that reads them; the spectator view.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.envs.carla_bridge.errors import CarlaConnectionError
from stages.envs.carla_bridge.state import BridgeState, Lifecycle

log = logging.getLogger(__name__)

# Camera on the roof above the windscreen (CARLA's examples mount a forward camera at x=1.5, z=2.4).
CAMERA_MOUNT = (1.5, 0.0, 2.4)


def image_to_rgb(image: Any) -> np.ndarray:
    """A `carla.Image` (BGRA bytes, row-major) as an RGB uint8 array (H, W, 3)."""
    bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(int(image.height), int(image.width), 4)
    return np.ascontiguousarray(bgra[:, :, 2::-1])


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    import cv2  # comes with highway-env (not a dependency of its own); only needed to resize

    shrink = rgb.shape[0] > size or rgb.shape[1] > size
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclass
class SensorEvents:
    """Collision and lane-invasion events, appended from CARLA's sensor threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    collisions: list[tuple[int, str]] = field(default_factory=list)      # (frame, other actor type)
    invasions: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)  # (frame, marking types)
    # Events of frames up to here are dropped, also when they arrive late: the sensor threads may
    # deliver a frame's events after world.tick() has returned (see `clear`).
    floor: int = -1

    def on_collision(self, event: Any) -> None:
        other = getattr(event, "other_actor", None)
        with self.lock:
            if int(event.frame) > self.floor:
                self.collisions.append((int(event.frame), str(getattr(other, "type_id", "unknown"))))

    def on_lane_invasion(self, event: Any) -> None:
        kinds = tuple(str(getattr(m.type, "name", m.type)) for m in event.crossed_lane_markings)
        with self.lock:
            if int(event.frame) > self.floor:
                self.invasions.append((int(event.frame), kinds))

    def take(self, frame: int) -> tuple[list[tuple[int, str]], list[tuple[int, tuple[str, ...]]]]:
        """Events up to ``frame`` (later ones stay for the next step)."""
        with self.lock:
            col = [e for e in self.collisions if e[0] <= frame]
            inv = [e for e in self.invasions if e[0] <= frame]
            self.collisions = [e for e in self.collisions if e[0] > frame]
            self.invasions = [e for e in self.invasions if e[0] > frame]
        return col, inv

    def clear(self, through_frame: int | None = None) -> None:
        """Drop the events so far and, given ``through_frame``, any of frames up to it still to come."""
        with self.lock:
            self.collisions.clear()
            self.invasions.clear()
            if through_frame is not None:
                self.floor = max(self.floor, int(through_frame))


class SensorsMixin(BridgeState):
    """The sensors of `CARLABridge` (the state it uses is set in `CARLABridge.__init__`)."""

    def _spawn_sensors(self) -> None:
        cfg, carla, ego = self.config, self.carla, self._spawned.ego
        lib, world = self._blueprints, self._world
        if cfg.render:
            bp = lib.find("sensor.camera.rgb")
            bp.set_attribute("image_size_x", str(cfg.image_width))
            bp.set_attribute("image_size_y", str(cfg.image_height))
            bp.set_attribute("fov", str(cfg.camera_fov))
            bp.set_attribute("sensor_tick", "0.0")   # every tick: one frame per step, matched by frame id
            x, y, z = CAMERA_MOUNT
            camera = world.spawn_actor(bp, carla.Transform(carla.Location(x=x, y=y, z=z)), attach_to=ego)
            self._spawned.sensors.append(camera)
            camera.listen(self._images.put)
        collision = world.spawn_actor(lib.find("sensor.other.collision"), carla.Transform(), attach_to=ego)
        self._spawned.sensors.append(collision)
        collision.listen(self._events.on_collision)
        invasion = world.spawn_actor(lib.find("sensor.other.lane_invasion"), carla.Transform(), attach_to=ego)
        self._spawned.sensors.append(invasion)
        invasion.listen(self._events.on_lane_invasion)

    def _receive_image(self, frame: int) -> None:
        """The camera image of ``frame``: older frames in the queue are dropped."""
        size = self.config.obs_size
        if not self.config.render:
            self._frame = np.zeros((size, size, 3), dtype=np.uint8)
            return
        deadline = time.monotonic() + self.config.sensor_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise queue.Empty
                image = self._images.get(timeout=remaining)
            except queue.Empty:
                self._state = Lifecycle.BROKEN
                raise CarlaConnectionError(
                    f"no camera image for frame {frame} within {self.config.sensor_timeout_s} s "
                    f"(CARLA at {self.config.carla_host}:{self.config.carla_port})") from None
            if int(image.frame) < frame:
                self.dropped_frames += 1
                continue
            if int(image.frame) > frame:
                log.warning("camera frame %d is newer than the tick's frame %d", image.frame, frame)
            self._frame = resize_rgb(image_to_rgb(image), size)
            return

    def _follow_with_spectator(self) -> None:
        """Without ``headless``, the server's window shows the ego from behind."""
        if self.config.headless or not self.config.render or self._spawned.ego is None:
            return
        carla = self.carla
        t = self._spawned.ego.get_transform()
        yaw = math.radians(t.rotation.yaw)
        loc = carla.Location(x=t.location.x - 6.0 * math.cos(yaw), y=t.location.y - 6.0 * math.sin(yaw),
                             z=t.location.z + 3.0)
        self._world.get_spectator().set_transform(carla.Transform(loc, carla.Rotation(pitch=-15.0, yaw=t.rotation.yaw)))
