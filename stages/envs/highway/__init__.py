"""The embedded backend: `DrivingEnv` on highway-env (no simulator server, runs on one CPU core).

Modules, one concern each:
- `sims`: highway-env's env classes with their own rewards, ends and observation off, our traffic
  classes, the action mapping constants (`MAX_ACCELERATION`, `MAX_BRAKING`, `MAX_STEERING`) and the
  highway-env config of a scenario;
- `route`: `LaneRoute`, the road sequence the ego follows and its progress along it;
- `missions`: per scenario, what the ego is asked to do (route, destination, yield lines, command);
- `camera`: the observation image (highway-env's road drawing, heading-up, night / rain);
- `env`: `DrivingEnv`, the `stages.envs.base.DrivingEnvBase` backend that ties them together.

Drawing uses off-screen pygame surfaces only; the variables below must be set before pygame loads.
"""
from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from stages.envs.highway.env import DrivingEnv  # noqa: E402  (after the variables above)

__all__ = ["DrivingEnv"]
