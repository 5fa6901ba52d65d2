"""Plane geometry shared by the env backends (highway-env and the CARLA bridge) and the expert."""
from __future__ import annotations

import math
from typing import overload

import numpy as np


@overload
def wrap_angle(angle: float) -> float: ...
@overload
def wrap_angle(angle: np.ndarray) -> np.ndarray: ...


def wrap_angle(angle: float | np.ndarray) -> float | np.ndarray:
    """``angle`` in radians wrapped into ``[-pi, pi)``; element-wise on arrays.

    A Python or numpy scalar stays a scalar of its own type (``(a + pi) % 2pi - pi`` in its own
    arithmetic), so results are the same bits as the expression written out inline.
    """
    if isinstance(angle, np.ndarray):
        return (angle + np.pi) % (2 * np.pi) - np.pi
    return (angle + math.pi) % (2 * math.pi) - math.pi
