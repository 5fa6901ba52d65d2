"""The promotion judgement: the thresholds a candidate must meet and the comparison with production.

:class:`PromotionThresholds` is the one type of the thresholds: the ``promote:`` section of the config
(``stages.config.PromoteParams`` is this class) and the promotion flow both use it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

__all__ = ["PromotionThresholds", "Check", "Decision", "judge"]


def _finite(value: Any, key: str) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value  # not a number at all: pydantic's own type error says so
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{key}={value!r} is not a finite number; give a finite number such as 0.01")
    return value


def _finite_limit(value: Any) -> Any:
    return _finite(value, "limit")


# A guard's limit: pydantic reports a bad one at its own key (``max_drop.route_completion``).
Limit = Annotated[float, BeforeValidator(_finite_limit)]


class PromotionThresholds(BaseModel):
    """When a candidate may replace production: the ``promote:`` section of the config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    score_metric: str = Field("driving_score", description="the metric that must improve")
    min_driving_score_delta: float = Field(
        0.01, description="candidate score − production score must be at least this (>0: strictly better)")
    # Guard metrics: each may get worse by at most the given amount.
    # command_following_rate (metrics/evaluate.json): a candidate may not follow its commands worse than
    # production; the check is skipped while either has none (a production model evaluated before it).
    max_drop: dict[str, Limit] = Field({"route_completion": 0.05, "command_following_rate": 0.0},
                                       description="higher-is-better metric -> largest allowed drop")
    max_rise: dict[str, Limit] = Field({"collisions_per_km": 0.5},
                                       description="lower-is-better metric -> largest allowed rise")
    parity_metric: str = "onnx_max_abs_error"
    max_parity_error: float = Field(1e-4, gt=0, description="largest ONNX-vs-PyTorch abs error allowed")

    # NaN compares false with everything, so a NaN threshold would silently pass or fail every check.
    @field_validator("min_driving_score_delta", "max_parity_error", mode="before")
    @classmethod
    def _finite_number(cls, value: Any, info: Any) -> Any:
        return _finite(value, info.field_name)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Decision:
    accepted: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    def summary(self) -> str:
        if self.accepted:
            return "accepted: " + "; ".join(c.detail for c in self.checks)
        return "rejected: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def _num(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def judge(candidate: dict[str, Any], production: dict[str, Any] | None,
          thresholds: PromotionThresholds | None = None) -> Decision:
    """Compare the candidate's metrics with production's. ``production=None``: nothing to beat yet."""
    t = thresholds or PromotionThresholds()
    checks: list[Check] = []

    parity = _num(candidate, t.parity_metric)
    if parity is None:
        checks.append(Check("parity", False, f"candidate has no {t.parity_metric}: run the export stage"))
    else:
        ok = parity <= t.max_parity_error
        checks.append(Check("parity", ok, f"{t.parity_metric} {parity:.2e} {'<=' if ok else '>'} "
                                         f"max_parity_error {t.max_parity_error:.0e}"))

    score = _num(candidate, t.score_metric)
    if score is None:
        checks.append(Check(t.score_metric, False,
                            f"candidate has no {t.score_metric}: run the evaluate stage (metrics/evaluate.json)"))
    elif production is None:
        checks.append(Check(t.score_metric, True, f"{t.score_metric} {score:.4f}; no production model yet"))
    else:
        prod = _num(production, t.score_metric)
        if prod is None:
            checks.append(Check(t.score_metric, True,
                                f"{t.score_metric} {score:.4f}; production has none recorded"))
        else:
            delta = score - prod
            ok = delta >= t.min_driving_score_delta
            checks.append(Check(t.score_metric, ok,
                                f"{t.score_metric} {score:.4f} vs production {prod:.4f} (delta {delta:+.4f} "
                                f"{'>=' if ok else '<'} min_driving_score_delta {t.min_driving_score_delta})"))

    if production is not None:
        # Guard metrics: how far each may move the wrong way (down for max_drop, up for max_rise).
        for limits, sign, verb in ((t.max_drop, -1.0, "drops"), (t.max_rise, 1.0, "rises")):
            for name, allowed in limits.items():
                c, p = _num(candidate, name), _num(production, name)
                if c is not None and p is not None:
                    ok = sign * (c - p) <= allowed
                    checks.append(Check(name, ok, f"{name} {c:.4f} vs production {p:.4f} "
                                                  f"({'within' if ok else verb + ' more than'} {allowed})"))
    return Decision(all(c.passed for c in checks), checks)
