"""Driving commands and ground-truth scene captions, as text.

Commands are the instructions the policy is conditioned on ("turn left at the next intersection");
a backend derives them from its route. Captions describe one frame from the simulator state (speed,
lane, nearby vehicles with relative positions in metres, weather, the command); pretraining pairs
them with the frame for image-text contrastive learning, so they only mention what the image can
show (vehicles inside the rendered area) and change whenever the scene does.

Directions follow the driver's view: "left" is the driver's left, which is also the left of the
heading-up image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FOLLOW_LANE = "follow the lane"
CHANGE_LEFT = "change to the left lane"
CHANGE_RIGHT = "change to the right lane"
TURN_LEFT = "turn left at the next intersection"
TURN_RIGHT = "turn right at the next intersection"
GO_STRAIGHT = "go straight at the next intersection"
MERGE = "merge onto the main road"

_ORDINALS = ("first", "second", "third", "fourth", "fifth")

# CARLA's global route planner speaks in `RoadOption`s; the CARLA backend turns them into the same
# text as the highway backend so that one policy reads one vocabulary.
_ROAD_OPTIONS = {
    "LANEFOLLOW": FOLLOW_LANE, "STRAIGHT": GO_STRAIGHT, "LEFT": TURN_LEFT, "RIGHT": TURN_RIGHT,
    "CHANGELANELEFT": CHANGE_LEFT, "CHANGELANERIGHT": CHANGE_RIGHT, "VOID": FOLLOW_LANE,
}


def ordinal(n: int) -> str:
    return _ORDINALS[n - 1] if 1 <= n <= len(_ORDINALS) else f"{n}th"


def roundabout_command(exit_number: int) -> str:
    return f"take the {ordinal(exit_number)} exit at the roundabout"


def curve_command(direction: str | None) -> str:
    """Lane following, with a hint of the bend ahead ("left"/"right") when there is one."""
    return f"{FOLLOW_LANE} as the road curves {direction}" if direction else FOLLOW_LANE


def road_option_to_command(option: str) -> str:
    """Text for a CARLA `RoadOption` name (e.g. ``"LEFT"``, ``"CHANGELANERIGHT"``)."""
    return _ROAD_OPTIONS.get(str(option).rsplit(".", 1)[-1].upper(), FOLLOW_LANE)


@dataclass(frozen=True)
class Neighbour:
    """Another vehicle in the ego frame."""

    forward: float              # m, positive ahead
    right: float                # m, positive to the driver's right
    lane_offset: int | None     # lanes to the right (+) / left (-) on the same road; None: other road
    relative_heading: float     # rad, its heading minus the ego's, wrapped to [-pi, pi]
    kind: str = "car"


@dataclass(frozen=True)
class SceneSnapshot:
    place: str                       # e.g. "a three-lane highway"
    speed: float                     # m/s
    command: str
    lane_number: int | None = None   # 1 = leftmost lane
    lanes_count: int | None = None
    lateral_offset: float = 0.0      # m, positive to the right
    neighbours: tuple[Neighbour, ...] = field(default_factory=tuple)
    appearance: str = "day"
    collided: bool = False
    off_road: bool = False


def _side(right: float) -> str:
    return "on the right" if right > 0 else "on the left"


def _lane_phrase(offset: int) -> str:
    if offset == 0:
        return "in the same lane"
    side = "right" if offset > 0 else "left"
    return f"in the {side} lane" if abs(offset) == 1 else f"{abs(offset)} lanes to the {side}"


def describe_neighbour(n: Neighbour) -> str:
    dist = abs(round(n.forward))
    where = "alongside" if dist < 3 else f"{dist} m {'ahead' if n.forward > 0 else 'behind'}"
    heading = abs(n.relative_heading)
    if n.lane_offset is not None and heading < 0.8:
        return f"a {n.kind} {where} {_lane_phrase(n.lane_offset)}"
    if heading > 2.4:
        return f"an oncoming {n.kind} {where} {_side(n.right)}"
    if heading > 0.8:
        # Crossing traffic: say where it comes from (its side of the ego's path).
        return f"a {n.kind} crossing {where}, coming from the {'right' if n.right > 0 else 'left'}"
    return f"a {n.kind} {where} {_side(n.right)}, {abs(round(n.right))} m to the side"


def describe_scene(scene: SceneSnapshot, max_neighbours: int = 4) -> str:
    """A caption of one frame."""
    kmh = scene.speed * 3.6
    parts = [f"Driving on {scene.place}."]
    motion = "The ego car is stopped" if kmh < 2 else f"The ego car drives at {kmh:.0f} km/h"
    if scene.lanes_count and scene.lanes_count > 1 and scene.lane_number:
        motion += f" in lane {scene.lane_number} of {scene.lanes_count}"
    if abs(scene.lateral_offset) > 0.7:
        motion += f", {abs(scene.lateral_offset):.1f} m {'right' if scene.lateral_offset > 0 else 'left'} of the lane centre"
    parts.append(motion + ".")
    near = sorted(scene.neighbours, key=lambda n: n.forward ** 2 + n.right ** 2)[:max_neighbours]
    if near:
        text = "; ".join(describe_neighbour(n) for n in near)
        parts.append(f"Nearby: {text}.")
    else:
        parts.append("No other vehicles are nearby.")
    if scene.appearance == "night":
        parts.append("It is night; the headlights light the road ahead.")
    elif scene.appearance == "rain":
        parts.append("It is raining and the view is blurred.")
    if scene.collided:
        parts.append("The car has collided.")
    elif scene.off_road:
        parts.append("The car has left the road.")
    parts.append(f"Command: {scene.command}.")
    return " ".join(parts)
