"""The release gate: one decision, approve or reject, with every reason, from data (a config) alone.

Checks, each named in the decision:
- `floor:<metric>`: the candidate's metric is at least its absolute floor (always checked);
- `champion:<metric>`: the candidate beats the champion by at least `min_gain_over_champion`;
- `significance`: the paired test's p-value against the champion is below `significance_level`
  (a failing check only when `require_significance`; otherwise it is recorded);
- `drift`: the share of drifted feature columns is at most `max_drift_share`;
- `prediction_drift`: the fused score's distribution moved (a failing check only when
  `reject_on_prediction_drift`: a new model may legitimately score on another scale).
With no champion yet, the floors alone decide (champion, significance and drift are recorded as skipped).
`force` lets a test or an operator take a branch; the checks are still computed and reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from fusionrank.drift import DriftResult
from fusionrank.errors import ConfigError

Force = Literal["auto", "approve", "reject"]
FORCES: tuple[str, ...] = ("auto", "approve", "reject")


@dataclass(frozen=True)
class GateConfig:
    """The gate's thresholds. Build it from a mapping with `from_dict` (or a file with `load`): every value
    is checked when the config is built, so a typo fails before any model is trained."""

    metric: str = "ndcg@10"
    floors: dict[str, float] = field(default_factory=dict)
    min_gain_over_champion: float = 0.0
    significance_level: float = 0.05
    require_significance: bool = False
    max_drift_share: float = 0.5
    reject_on_prediction_drift: bool = False
    force: Force = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise ConfigError(f"gate metric must be a non-empty metric name, got {self.metric!r}")
        if not isinstance(self.floors, Mapping):
            raise ConfigError(f"gate floors must map metric names to numbers, got {self.floors!r}")
        for name, value in self.floors.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"gate floor names must be metric names, got {name!r}")
            _number(f"floors.{name}", value)
        object.__setattr__(self, "floors", {k: float(v) for k, v in self.floors.items()})
        _number("min_gain_over_champion", self.min_gain_over_champion)
        level = _number("significance_level", self.significance_level)
        if not 0.0 < level < 1.0:
            raise ConfigError(f"gate significance_level must be in (0, 1), got {level}")
        share = _number("max_drift_share", self.max_drift_share)
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"gate max_drift_share must be in [0, 1], got {share}")
        for flag in ("require_significance", "reject_on_prediction_drift"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"gate {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.force not in FORCES:
            raise ConfigError(f"gate force must be one of {', '.join(FORCES)}, got {self.force!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        """A config from a mapping; ConfigError names unknown keys and bad values."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"gate config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            known_list = ", ".join(sorted(known))
            raise ConfigError(f"unknown gate setting(s) {unknown}; known settings: {known_list}")
        return cls(**dict(data))

    @classmethod
    def load(cls, path: str | Path) -> GateConfig:
        """A config from a YAML or JSON file (JSON is YAML)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the gate config ({exc})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML/JSON ({exc})") from exc
        try:
            return cls.from_dict(data or {})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GateDecision:
    """The gate's output: approved or not, the reasons (failures on reject, passes on approve), and every
    check with its value and threshold."""

    approved: bool
    reasons: list[str]
    checks: list[dict]
    forced: bool = False

    @property
    def branch(self) -> str:
        return "approve" if self.approved else "reject"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "branch": self.branch}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def decide(
    candidate_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    drift: DriftResult | Mapping[str, Any] | None,
    config: GateConfig,
    p_value: float | None = None,
) -> GateDecision:
    """Approve or reject the candidate; every failing check is a reason, and approving lists what passed.

    `p_value` is the paired significance test of the candidate against the champion on `config.metric`.
    A champion without a drift result is a reject: drift is only unknown when its step did not run.
    """
    checks = [_floor_check(name, floor, candidate_metrics) for name, floor in config.floors.items()]
    if champion_metrics is None:
        skipped = "no champion yet: the floors alone decide"
        checks += [
            _check(f"champion:{config.metric}", True, None, None, skipped, skipped=True),
            _check("significance", True, p_value, config.significance_level, skipped, skipped=True),
            _check("drift", True, None, config.max_drift_share, skipped, skipped=True),
        ]
    else:
        checks.append(_champion_check(config, candidate_metrics, champion_metrics))
        checks.append(_significance_check(config, p_value))
        checks.extend(_drift_checks(config, drift))
    failed = [c for c in checks if not c["passed"]]
    if config.force == "auto":
        approved = not failed
        reasons = [c["reason"] for c in (failed if failed else checks)]
    else:
        approved = config.force == "approve"
        reasons = [f"forced to {config.force} by the gate config (force={config.force!r})"]
        reasons += [f"check would have failed: {c['reason']}" for c in failed]
    return GateDecision(approved=approved, reasons=reasons, checks=checks, forced=config.force != "auto")


def _floor_check(metric: str, floor: float, metrics: Mapping[str, float]) -> dict:
    name = f"floor:{metric}"
    value = _metric(metrics, metric)
    if value is None:
        return _check(name, False, None, floor, f"{name}: the candidate reports no {metric!r}")
    passed = value >= floor
    relation = ">=" if passed else "<"
    return _check(name, passed, value, floor, f"{name}: {value:.4f} {relation} floor {floor:.4f}")


def _champion_check(
    config: GateConfig, candidate: Mapping[str, float], champion: Mapping[str, float]
) -> dict:
    name = f"champion:{config.metric}"
    mine, theirs = _metric(candidate, config.metric), _metric(champion, config.metric)
    need = config.min_gain_over_champion
    if mine is None or theirs is None:
        who = "candidate" if mine is None else "champion"
        return _check(name, False, None, need, f"{name}: the {who} reports no {config.metric!r}")
    gain = mine - theirs
    passed = gain >= need
    relation = ">=" if passed else "<"
    reason = f"{name}: candidate {mine:.4f} vs champion {theirs:.4f}, gain {gain:+.4f} {relation} {need:+.4f}"
    return _check(name, passed, gain, need, reason)


def _significance_check(config: GateConfig, p_value: float | None) -> dict:
    level = config.significance_level
    required = config.require_significance
    if p_value is None or (isinstance(p_value, float) and math.isnan(p_value)):
        detail = "significance: no p-value against the champion"
        if required:
            return _check("significance", False, None, level, f"{detail}, but require_significance is set")
        return _check("significance", True, None, level, f"{detail} (not required)")
    p = float(p_value)
    significant = p < level
    relation = "<" if significant else ">="
    detail = f"significance: p={p:.4g} {relation} {level:g}"
    if required:
        return _check("significance", significant, p, level, detail)
    return _check("significance", True, p, level, f"{detail} (recorded, not required)")


def _drift_checks(config: GateConfig, drift: DriftResult | Mapping[str, Any] | None) -> list[dict]:
    limit = config.max_drift_share
    if drift is None:
        return [_check("drift", False, None, limit, "drift: not measured although a champion exists")]
    data = drift.to_dict() if isinstance(drift, DriftResult) else dict(drift)
    if "drift_share" not in data:
        return [_check("drift", False, None, limit, "drift: the result has no 'drift_share'")]
    share = float(data["drift_share"])
    drifted = list(data.get("drifted_columns", []))
    passed = share <= limit
    relation = "<=" if passed else ">"
    columns = f" (drifted: {', '.join(drifted)})" if drifted else ""
    reason = f"drift: share {share:.3f} {relation} max {limit:.3f}{columns}"
    checks = [_check("drift", passed, share, limit, reason)]
    moved = bool(data.get("prediction_drift", False))
    score = data.get("prediction_score")
    shown = "n/a" if score is None else f"{float(score):.3f}"
    blocking = config.reject_on_prediction_drift
    detail = f"prediction_drift: {'drifted' if moved else 'stable'} (score {shown})"
    if not blocking:
        detail += " (recorded, not blocking)"
    checks.append(_check("prediction_drift", not (moved and blocking), score, None, detail))
    return checks


def _metric(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _check(
    name: str, passed: bool, value: float | None, threshold: float | None, reason: str, skipped: bool = False
) -> dict:
    return {
        "name": name,
        "passed": bool(passed),
        "value": value,
        "threshold": threshold,
        "reason": reason,
        "skipped": skipped,
    }


def _number(name: str, value: Any) -> float:
    # bool is an int subclass and a quoted number is a string: both are config typos, not numbers
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"gate {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"gate {name} must be finite, got {value!r}")
    return float(value)
