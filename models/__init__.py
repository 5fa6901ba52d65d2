"""The DrivingVLA model (torch only): config, tokenizer, network, action distributions, export wrapper."""

from models.config import SIZE_PRESETS, DrivingVLAConfig
from models.distributions import (
    ACTION_HIGH,
    ACTION_LOW,
    ActionDistribution,
    ScaledBeta,
    SquashedGaussian,
    make_distribution,
)
from models.driving_vla import DrivingVLA, DrivingVLAOutput
from models.export_wrapper import DeterministicPolicy
from models.tokenizer import ByteTokenizer

__all__ = [
    "ACTION_HIGH",
    "ACTION_LOW",
    "SIZE_PRESETS",
    "ActionDistribution",
    "ByteTokenizer",
    "DeterministicPolicy",
    "DrivingVLA",
    "DrivingVLAConfig",
    "DrivingVLAOutput",
    "ScaledBeta",
    "SquashedGaussian",
    "make_distribution",
]
