"""The release gate: each branch forced, floors alone without a champion, and every reason by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusionrank.drift import DriftResult
from fusionrank.errors import ConfigError
from fusionrank.gate import GateConfig, GateDecision, decide

CANDIDATE = {"ndcg@10": 0.80, "recall@10": 0.60}
CHAMPION = {"ndcg@10": 0.78, "recall@10": 0.61}
CALM = {"drift_share": 0.0, "drifted_columns": [], "prediction_drift": False, "prediction_score": 0.01}
STORM = {
    "drift_share": 0.75,
    "drifted_columns": ["f_title_tokens", "f_pop_7d", "s_bm25"],
    "prediction_drift": True,
    "prediction_score": 0.4,
}


def _config(**overrides) -> GateConfig:
    return GateConfig.from_dict({"floors": {"ndcg@10": 0.5}, **overrides})


def _names(decision: GateDecision, passed: bool) -> list[str]:
    return [c["name"] for c in decision.checks if c["passed"] is passed]


def test_no_champion_floors_alone_decide() -> None:
    decision = decide(CANDIDATE, None, STORM, _config(require_significance=True))
    assert decision.approved
    assert _names(decision, passed=False) == []
    skipped = {c["name"] for c in decision.checks if c["skipped"]}
    assert skipped == {"champion:ndcg@10", "significance", "drift"}
    assert any(r.startswith("floor:ndcg@10") for r in decision.reasons)


def test_no_champion_failing_floor_rejects_with_its_name() -> None:
    config = _config(floors={"ndcg@10": 0.9, "recall@10": 0.5, "mrr": 0.1})
    decision = decide(CANDIDATE, None, None, config)
    assert not decision.approved
    assert _names(decision, passed=False) == ["floor:ndcg@10", "floor:mrr"]
    assert decision.reasons[0].startswith("floor:ndcg@10: 0.8000 < floor 0.9000")
    assert "no 'mrr'" in decision.reasons[1]


def test_approving_lists_what_passed() -> None:
    decision = decide(CANDIDATE, CHAMPION, CALM, _config())
    assert decision.approved
    assert decision.branch == "approve"
    assert [r.split(":")[0] for r in decision.reasons] == [
        "floor",
        "champion",
        "significance",
        "drift",
        "prediction_drift",
    ]


def test_regression_against_the_champion_rejects() -> None:
    decision = decide({"ndcg@10": 0.70}, CHAMPION, CALM, _config())
    assert not decision.approved
    assert _names(decision, passed=False) == ["champion:ndcg@10"]
    assert "gain -0.0800" in decision.reasons[0]


def test_a_gain_below_the_required_margin_rejects() -> None:
    decision = decide(CANDIDATE, CHAMPION, CALM, _config(min_gain_over_champion=0.05))
    assert _names(decision, passed=False) == ["champion:ndcg@10"]


def test_drift_rejects_and_names_the_columns() -> None:
    decision = decide(CANDIDATE, CHAMPION, STORM, _config(max_drift_share=0.5))
    assert not decision.approved
    assert _names(decision, passed=False) == ["drift"]
    assert "f_title_tokens" in decision.reasons[0]
    assert "0.750 > max 0.500" in decision.reasons[0]


def test_prediction_drift_blocks_only_when_configured() -> None:
    moved = {**CALM, "prediction_drift": True, "prediction_score": 0.3}
    assert decide(CANDIDATE, CHAMPION, moved, _config()).approved
    decision = decide(CANDIDATE, CHAMPION, moved, _config(reject_on_prediction_drift=True))
    assert _names(decision, passed=False) == ["prediction_drift"]


def test_a_champion_without_drift_figures_rejects() -> None:
    decision = decide(CANDIDATE, CHAMPION, None, _config())
    assert _names(decision, passed=False) == ["drift"]
    assert "not measured" in decision.reasons[0]


def test_significance_decides_only_when_required() -> None:
    assert decide(CANDIDATE, CHAMPION, CALM, _config(), p_value=0.4).approved
    required = _config(require_significance=True, significance_level=0.05)
    assert decide(CANDIDATE, CHAMPION, CALM, required, p_value=0.01).approved
    for p_value in (0.2, None):
        decision = decide(CANDIDATE, CHAMPION, CALM, required, p_value=p_value)
        assert _names(decision, passed=False) == ["significance"]


def test_every_failing_check_is_a_reason() -> None:
    config = _config(floors={"ndcg@10": 0.9}, require_significance=True)
    decision = decide({"ndcg@10": 0.70}, CHAMPION, STORM, config, p_value=0.5)
    assert _names(decision, passed=False) == ["floor:ndcg@10", "champion:ndcg@10", "significance", "drift"]
    assert [r.split(":")[0] for r in decision.reasons] == ["floor", "champion", "significance", "drift"]


def test_forced_approve_overrides_failing_checks_and_says_so() -> None:
    decision = decide({"ndcg@10": 0.1}, CHAMPION, STORM, _config(force="approve"))
    assert decision.approved
    assert decision.forced
    assert decision.reasons[0].startswith("forced to approve")
    assert any("floor:ndcg@10" in r for r in decision.reasons[1:])


def test_forced_reject_overrides_passing_checks() -> None:
    decision = decide(CANDIDATE, CHAMPION, CALM, _config(force="reject"))
    assert not decision.approved
    assert decision.forced
    assert decision.branch == "reject"
    assert decision.reasons == ["forced to reject by the gate config (force='reject')"]


def test_the_drift_result_object_is_read_like_its_dict() -> None:
    result = DriftResult(
        drift_share=0.75, drifted_columns=STORM["drifted_columns"], per_column={}, prediction_drift=False
    )
    assert _names(decide(CANDIDATE, CHAMPION, result, _config()), passed=False) == ["drift"]


def test_decision_serialises_to_json() -> None:
    decision = decide(CANDIDATE, CHAMPION, CALM, _config())
    data = json.loads(decision.to_json())
    assert data["approved"] is True
    assert data["branch"] == "approve"
    assert {c["name"] for c in data["checks"]} >= {"floor:ndcg@10", "champion:ndcg@10", "drift"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"floors": {"ndcg@10": "0.5"}}, "floors.ndcg@10 must be a number"),
        ({"max_drift_share": 1.5}, "max_drift_share must be in"),
        ({"significance_level": 0}, "significance_level must be in"),
        ({"force": "maybe"}, "force must be one of"),
        ({"require_significance": "yes"}, "require_significance must be true or false"),
        ({"min_gain_over_champion": float("nan")}, "must be finite"),
        ({"max_drift": 0.3}, "unknown gate setting"),
    ],
)
def test_bad_configs_are_refused_when_built(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GateConfig.from_dict(settings)


def test_config_loads_from_yaml_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "gate.yaml"
    path.write_text("metric: ndcg@10\nfloors:\n  ndcg@10: 0.7\n  recall@10: 0.4\nmax_drift_share: 0.3\n")
    config = GateConfig.load(path)
    assert config.floors == {"ndcg@10": 0.7, "recall@10": 0.4}
    assert GateConfig.from_dict(config.to_dict()) == config
    path.write_text("floors: [0.7]\n")
    with pytest.raises(ConfigError, match=r"gate\.yaml"):
        GateConfig.load(path)
