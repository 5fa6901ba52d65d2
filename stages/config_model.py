"""The base every section of the pipeline's config derives from (`stages.config` assembles them).

Kept apart from `stages.config` because that module imports the env and RL configs, which derive
from this base too. Two rules hold for every field of every section:

- unknown keys are refused (a typo must not be silently ignored);
- numbers must be finite: NaN and ±infinity are refused while the value is parsed, before any range
  rule, because NaN slips through comparisons (``nan > 0`` is False, so ``gt=0`` would call it "not
  greater than 0", and a rule written as ``not x < 0`` would let it through).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

STRICT_CONFIG = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StrictModel(BaseModel):
    """A config section: unknown keys and non-finite numbers are validation errors."""

    model_config = STRICT_CONFIG
