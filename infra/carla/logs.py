"""Copies the output of a manager's containers, line by line, to a sink (e.g. a Prefect run logger)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from infra.carla.manager import CarlaServerManager

__all__ = ["LogFollower", "parse_docker_time"]

log = logging.getLogger(__name__)


class LogFollower:
    """Copies the output of a manager's containers, line by line, to ``sink`` (e.g. a Prefect run
    logger) until `stop()`; re-attaches after a restart without repeating earlier lines."""

    def __init__(self, manager: CarlaServerManager, sink: Callable[[str, str], None], poll_s: float = 0.5) -> None:
        self.manager = manager
        self.sink = sink
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> LogFollower:
        for index in range(len(self.manager)):
            thread = threading.Thread(target=self._follow, args=(index,), name=f"carla-logs-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop copying. A thread blocked on a quiet container ends when the container goes: remove
        the containers, then `join`."""
        self._stop.set()

    def join(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _follow(self, index: int) -> None:
        since: float | None = None
        while not self._stop.is_set():
            try:
                server = self.manager._server(index)
            except IndexError:
                return  # the manager stopped
            if server.removed:
                return
            try:
                kwargs = {"stream": True, "follow": True, "timestamps": True}
                if since:
                    kwargs["since"] = since
                for raw in server.container.logs(**kwargs):
                    for line in raw.decode("utf-8", "replace").splitlines():
                        stamp, _, text = line.partition(" ")
                        since = parse_docker_time(stamp) or since
                        self.sink(server.name, text)
                    if self._stop.is_set():
                        return
            except Exception as exc:
                log.debug("carla: log stream of %s ended: %s", server.name, exc)
            # The stream ends when the container stops; a restarted one is followed again.
            self._stop.wait(self.poll_s)


def parse_docker_time(stamp: str) -> float | None:
    """Docker's RFC 3339 nano timestamp → epoch seconds (+1 µs so the same line is not read twice)."""
    try:
        head, _, frac = stamp.rstrip("Z").partition(".")
        base = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        return base.timestamp() + float(f"0.{frac or '0'}") + 1e-6
    except ValueError:
        return None
