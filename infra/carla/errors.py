"""What can go wrong with CARLA servers, as exception types (no Docker needed to import them)."""
from __future__ import annotations

__all__ = ["CarlaServerError", "CarlaServerNotReady", "DockerUnavailable", "ImageUnavailable"]


class CarlaServerError(RuntimeError):
    """A CARLA server could not be started, kept alive or stopped."""


class DockerUnavailable(CarlaServerError):
    """The Docker engine cannot be reached."""


class ImageUnavailable(CarlaServerError):
    """The server image is not on the engine and could not be pulled."""


class CarlaServerNotReady(CarlaServerError):
    """A server did not answer its version before the deadline (or exited first)."""

    def __init__(self, message: str, name: str = "", logs: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.logs = logs
