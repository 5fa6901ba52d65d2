"""`Camera`: the observation image of the embedded backend, drawn from a highway-env sim.

highway-env's road drawing (cached in tiles, the road is static) with the vehicles drawn on top in
highway-env's colours, rotated so that the car drives up the image (``view="heading_up"``, like a
forward camera; ``"world"`` keeps highway-env's axes), area-resized to ``image_size``, then the
``night`` / ``rain`` appearance transforms (highway-env has no weather or lighting).

Frame: highway-env's world, x right and y down in the rendered image. Drawing uses off-screen pygame
surfaces only (``SDL_VIDEODRIVER=dummy``, set by `stages.envs.highway`); highway-env's own
`EnvViewer` draws nothing under that driver, which is one reason not to use it.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import pygame
from highway_env.road.graphics import RoadGraphics, RoadObjectGraphics, WorldSurface
from highway_env.vehicle.graphics import VehicleGraphics
from highway_env.vehicle.kinematics import Vehicle

from stages.envs.config import EnvConfig
from stages.envs.scenarios import ScenarioSpec

# Ego position in a heading-up image (fraction of width, height): more road ahead than behind.
EGO_IN_IMAGE = (0.5, 0.75)
_TILE = 256                  # px, side of a cached road tile
_MAX_TILES = 48              # LRU bound of the tile cache (~9 MB)


class Camera:
    """Renders ``image_size`` RGB frames of a highway-env sim, once per env step.

    The road is static, so highway-env's own road drawing (`RoadGraphics.display`, which redraws
    every lane stripe of the network and cost ~10 ms a frame on the roundabout) runs once per
    256-px tile and is cached; each frame composes the tiles around the ego, rotates them
    (heading-up) and draws the vehicles on top with cv2 in highway-env's colours.
    """

    def __init__(self, cfg: EnvConfig, spec: ScenarioSpec) -> None:
        self.size = cfg.image_size
        self.heading_up = cfg.view == "heading_up"
        self.appearance = spec.appearance
        # Small images are drawn at twice the size and area-averaged: thin lane marks survive.
        self.supersample = 2 if self.size < 128 else 1
        self.px = self.size * self.supersample
        self.span = float(cfg.view_distance or spec.view_distance)
        self.scaling = self.px / self.span
        # Heading-up needs the whole rotated output square inside the canvas: the farthest output
        # corner lies sqrt(0.75² + 0.5²) ≈ 0.9 spans from the ego.
        self.canvas = int(math.ceil(self.px * 1.81 / 2) * 2) if self.heading_up else self.px
        self.centering = (0.5, 0.5) if self.heading_up else spec.world_centering
        self._tiles: dict[tuple[int, int], np.ndarray] = {}
        self._tiles_key: Any = None
        self._surface: Any = None
        self._night_mask: np.ndarray | None = None

    def visible(self, forward: float, right: float, heading: float) -> bool:
        """Is a point at (forward, right) metres from the ego inside the image?"""
        if self.heading_up:
            fx, fy = EGO_IN_IMAGE
            return (-(1 - fy) * self.span <= forward <= fy * self.span
                    and -fx * self.span <= right <= (1 - fx) * self.span)
        # World view: back to world offsets (x right, y down).
        dx = forward * math.cos(heading) - right * math.sin(heading)
        dy = forward * math.sin(heading) + right * math.cos(heading)
        cx, cy = self.centering
        return -cx * self.span <= dx <= (1 - cx) * self.span and -cy * self.span <= dy <= (1 - cy) * self.span

    # -- road layer ----------------------------------------------------------------------------
    @staticmethod
    def _network_key(network: Any) -> tuple:
        """Identifies a road geometry, so that tiles survive resets that rebuild the same roads."""
        key = []
        for _from, tos in sorted(network.graph.items()):
            for _to, lanes in sorted(tos.items()):
                for lane in lanes:
                    key.append((_from, _to, tuple(np.round(lane.position(0.0, 0.0), 2)),
                                tuple(np.round(lane.position(lane.length, 0.0), 2))))
        return tuple(key)

    def _tile(self, road: Any, tx: int, ty: int) -> np.ndarray:
        tile = self._tiles.pop((tx, ty), None)
        if tile is None:
            if self._surface is None:
                pygame.display.init()       # no window: highway-env draws on off-screen surfaces
                self._surface = WorldSurface((_TILE, _TILE), 0, pygame.Surface((_TILE, _TILE)))
            surface = self._surface
            surface.scaling = self.scaling
            surface.origin = np.array([tx * _TILE, ty * _TILE], dtype=float) / self.scaling
            RoadGraphics.display(road, surface)
            tile = np.frombuffer(pygame.image.tobytes(surface, "RGB"), np.uint8).reshape(_TILE, _TILE, 3)
            if len(self._tiles) >= _MAX_TILES:
                self._tiles.pop(next(iter(self._tiles)))
        self._tiles[(tx, ty)] = tile       # most recently used last
        return tile

    def _road_canvas(self, road: Any, left: int, top: int) -> np.ndarray:
        """The cached road drawing of the canvas whose top-left global pixel is (left, top)."""
        if self._tiles_key is None or self._tiles_key[0] is not road.network:
            key = self._network_key(road.network)      # once per reset
            if self._tiles_key is None or key != self._tiles_key[1]:
                self._tiles.clear()
            self._tiles_key = (road.network, key)
        n = self.canvas
        out = np.empty((n, n, 3), dtype=np.uint8)
        for ty in range(top // _TILE, (top + n - 1) // _TILE + 1):
            for tx in range(left // _TILE, (left + n - 1) // _TILE + 1):
                tile = self._tile(road, tx, ty)
                x0, y0 = max(left, tx * _TILE), max(top, ty * _TILE)
                x1, y1 = min(left + n, (tx + 1) * _TILE), min(top + n, (ty + 1) * _TILE)
                out[y0 - top:y1 - top, x0 - left:x1 - left] = \
                    tile[y0 - ty * _TILE:y1 - ty * _TILE, x0 - tx * _TILE:x1 - tx * _TILE]
        return out

    # -- frame ---------------------------------------------------------------------------------
    def render(self, sim: Any, rng: np.random.Generator) -> np.ndarray:
        ego = sim.vehicle
        gx, gy = ego.position * self.scaling            # ego in global pixels
        cx, cy = self.centering
        left, top = int(math.floor(gx - cx * self.canvas)), int(math.floor(gy - cy * self.canvas))
        frame = self._road_canvas(sim.road, left, top)
        # Affine map: global pixels -> output pixels.
        if self.heading_up:
            m = cv2.getRotationMatrix2D((gx - left, gy - top), math.degrees(ego.heading + math.pi / 2), 1.0)
            m[0, 2] += self.px * EGO_IN_IMAGE[0] - (gx - left)
            m[1, 2] += self.px * EGO_IN_IMAGE[1] - (gy - top)
            frame = cv2.warpAffine(frame, m, (self.px, self.px), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
        else:
            m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        m = m.copy()
        m[:, 2] -= m[:, :2] @ np.array([left, top], dtype=float)
        self._draw_vehicles(frame, sim, m)
        if self.supersample > 1:
            frame = cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_AREA)
        if self.appearance == "night":
            frame = self._night(frame, ego.heading, rng)
        elif self.appearance == "rain":
            frame = self._rain(frame, rng)
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def _draw_vehicles(self, frame: np.ndarray, sim: Any, m: np.ndarray) -> None:
        ego, reach = sim.vehicle, 1.2 * self.span
        shift = 4                                         # sub-pixel vertex precision (1/16 px)
        for obj in [*sim.road.objects, *sim.road.vehicles]:
            if np.abs(obj.position - ego.position).max() > reach:
                continue
            if obj is ego:
                color = VehicleGraphics.RED if ego.crashed else VehicleGraphics.EGO_COLOR
            elif isinstance(obj, Vehicle):
                color = VehicleGraphics.get_color(obj)
            else:
                color = RoadObjectGraphics.get_color(obj)
            pts = obj.polygon()[:4] * self.scaling @ m[:, :2].T + m[:, 2]
            pts = np.round(pts * (1 << shift)).astype(np.int32)
            cv2.fillConvexPoly(frame, pts, color[:3], lineType=cv2.LINE_AA, shift=shift)
            cv2.polylines(frame, [pts], True, VehicleGraphics.BLACK, 1, lineType=cv2.LINE_AA, shift=shift)

    def close(self) -> None:
        self._tiles.clear()
        self._surface = None

    # -- appearance variants (highway-env has no weather: these are image transforms) ------
    def _headlight_mask(self, heading: float) -> np.ndarray:
        n = self.size
        if self.heading_up:
            ex, ey, ang = EGO_IN_IMAGE[0] * n, EGO_IN_IMAGE[1] * n, -math.pi / 2
        else:
            ex, ey, ang = self.centering[0] * n, self.centering[1] * n, heading
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        dx, dy = xx - ex, yy - ey
        dist = np.hypot(dx, dy) / n
        off = np.abs(np.arctan2(dy, dx) - ang)
        off = np.minimum(off, 2 * np.pi - off)
        cone = np.clip(1.0 - off / 0.55, 0.0, 1.0) * np.clip(1.0 - dist / 0.85, 0.0, 1.0)
        glow = np.clip(1.0 - dist / 0.12, 0.0, 1.0)
        return (0.22 + 0.78 * np.maximum(cone, 0.6 * glow))[..., None].astype(np.float32)

    def _night(self, frame: np.ndarray, heading: float, rng: np.random.Generator) -> np.ndarray:
        if self.heading_up:
            if self._night_mask is None:
                self._night_mask = self._headlight_mask(0.0)
            mask = self._night_mask
        else:
            mask = self._headlight_mask(heading)
        dark = frame.astype(np.float32) * mask * np.array([0.8, 0.85, 1.0], dtype=np.float32)
        dark += rng.normal(0.0, 5.0, size=dark.shape[:2])[..., None]   # sensor noise in the dark
        return np.clip(dark, 0, 255).astype(np.uint8)

    def _rain(self, frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = self.size
        img = cv2.blur(frame, (3, 3) if n < 128 else (5, 5))
        streaks = np.zeros_like(img)
        count = n // 3
        length = max(3.0, n / 12)
        xs = rng.uniform(0, n, count)
        ys = rng.uniform(0, n, count)
        slant = rng.normal(0.25, 0.05, count)
        for x, y, k in zip(xs, ys, slant):
            cv2.line(streaks, (int(x), int(y)), (int(x + k * length), int(y + length)), (210, 210, 220), 1)
        wet = img.astype(np.float32) * 0.75 + 20.0          # dimmer, lower contrast
        wet += 0.35 * streaks.astype(np.float32)
        return np.clip(wet, 0, 255).astype(np.uint8)
