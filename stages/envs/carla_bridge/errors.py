"""The one recoverable error of the bridge, and the one place that imports `carla`.

The CARLA client reports every server problem as a bare ``RuntimeError``: a client time-out
("time-out of 10000ms while waiting for the simulator, make sure the simulator is ready and connected
to localhost:2000"), a dropped RPC connection ("rpc::rpc_error during call in function ...", "read:
End of file", "Connection reset by peer"), a traffic manager that cannot bind its port ("... failed to
create because of bind error"). Those are all "the server is gone or unusable": the cure is a new
client (`CARLABridge.reconnect`) and, if that fails, a server restart by whoever owns the server — so
they become one type, `CarlaConnectionError`. Other ``RuntimeError``s (a blueprint that does not exist,
a spawn that collides) are bugs or bad luck in this process and propagate unchanged.
"""
from __future__ import annotations

import re
from types import ModuleType
from typing import Any

from infra.packages import require_package

INSTALL_HINT = "pip install -e .[carla]"

# Substrings of the RuntimeError messages that mean the server (or the connection to it) is gone.
_CONNECTION_PATTERNS = re.compile(
    r"time-?out|timed out|rpc::|rpc_error|connection|connect to|end of file|broken pipe|reset by peer|"
    r"socket|bind error|not connected|server (?:is )?(?:down|closed)",
    re.IGNORECASE,
)


class CarlaConnectionError(RuntimeError):
    """The CARLA server timed out or the connection to it was lost; `reset()` reconnects.

    A subclass of ``RuntimeError`` so that code catching the client's own errors still catches it.
    """


def is_connection_error(error: BaseException) -> bool:
    """Whether a client ``RuntimeError`` means a lost/unresponsive server (see the module docstring)."""
    if isinstance(error, CarlaConnectionError):
        return True
    return isinstance(error, RuntimeError) and bool(_CONNECTION_PATTERNS.search(str(error)))


def load_carla(module: Any = None) -> ModuleType | Any:
    """The `carla` client module: ``module`` when given (tests hand in a fake), else the installed one
    (`MissingPackage`, an ImportError naming ``pip install -e .[carla]``, when it is not)."""
    if module is not None:
        return module
    return require_package("carla", "carla", "the CARLA bridge")   # the only import of `carla` in drivevla
