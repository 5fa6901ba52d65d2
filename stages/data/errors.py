"""The data package's error type, in a module of its own so that every reader (episodes, shards,
nuScenes) can raise it without importing another reader (`dataset` imports the recorder, whose box
helpers import the nuScenes schema: the error living in `dataset` made a cycle)."""
from __future__ import annotations

from stages.common import StageInputError


class DatasetError(StageInputError):
    """The dataset folder is missing, incomplete or corrupt."""
