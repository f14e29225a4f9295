"""Metrics, the bootstrap interval, the promotion gate and the RAG prompt: pure functions."""

from __future__ import annotations

import json
import math

import pytest

from evaluation.datasets import DEFAULT_RAG_QUESTIONS, EvaluationDataError, load_rag_questions
from evaluation.gate import (
    DEFAULT_FLOORS,
    FloorRule,
    GatePolicy,
    HumanRule,
    HumanSummary,
    MetricRule,
    compare_to_champion,
    policy_from,
)
from evaluation.metrics import (
    bootstrap_ci,
    exact_match,
    hit_at_k,
    reciprocal_rank,
    rouge_l,
    token_f1,
)
from refinery.rag.confidence import retrieval_confidence, support
from refinery.rag.prompt import build_messages
from refinery.retrieval.search import Hit


def test_exact_match_and_token_f1():
    assert exact_match("The capital is Paris.", "the capital is paris") == 1.0
    assert exact_match("Paris", "Lyon") == 0.0
    assert token_f1("21 days for a worker", "A worker takes 21 days") == pytest.approx(
        2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4)
    )
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    # LCS of "queen cells appear in spring" and "queen cells in late spring" is "queen cells in spring" (4)
    assert rouge_l("queen cells appear in spring", "queen cells in late spring") == pytest.approx(
        2 * 0.8 * 0.8 / 1.6
    )
    assert rouge_l("abc", "xyz") == 0.0
    assert rouge_l("same words here", "same words here") == 1.0


def test_retrieval_metrics():
    retrieved = ["a.md", "b.md", "c.md"]
    assert hit_at_k(retrieved, ["c.md"], 3) == 1.0 and hit_at_k(retrieved, ["c.md"], 2) == 0.0
    assert reciprocal_rank(retrieved, ["b.md", "z.md"]) == 0.5
    assert reciprocal_rank(retrieved, ["z.md"]) == 0.0


def test_groundedness_is_the_share_of_supported_content_words():
    context = ["A worker bee develops in 21 days from egg to adult."]
    assert support("A worker develops in 21 days.", context) == 1.0
    assert support("Drones live on the moon.", context) == 0.0
    assert support("Worker bees fly to the moon.", context) == pytest.approx(
        1 / 4
    )  # worker, bees, fly, moon
    assert support("Yes.", []) == 0.0 and support("", context) == 1.0


def test_bootstrap_interval():
    values = [4, 5, 4, 3, 5, 4, 4, 5, 3, 4] * 3
    mean, low, high = bootstrap_ci(values, seed=1)
    assert mean == pytest.approx(4.1) and low < mean < high
    assert bootstrap_ci(values, seed=1) == (mean, low, high)  # seeded: reproducible
    narrow = bootstrap_ci(values * 10, seed=1)
    assert narrow[2] - narrow[1] < high - low  # more ratings, tighter interval
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert bootstrap_ci([5, 5, 5]) == (5.0, 5.0, 5.0)


GOOD = {
    "examples": 10,
    "rag_token_f1": 0.40,
    "rag_rouge_l": 0.38,
    "rag_groundedness": 0.8,
    "retrieval_hit_at_k": 0.9,
    "heldout_token_f1": 0.3,
    "heldout_perplexity": 20.0,
    "rag_answered_right": 0.5,
    "rag_wrong_shown": 0.1,
    "rag_abstained": 0.4,
}
HAPPY_HUMANS = HumanSummary(count=12, mean=4.4, ci_low=4.1, ci_high=4.7)


def test_gate_promotes_a_challenger_that_is_not_worse():
    decision = compare_to_champion(dict(GOOD, rag_token_f1=0.39), GOOD, HAPPY_HUMANS, GatePolicy())
    assert decision.passed and not decision.human_waived
    assert "all rules passed" in decision.reasons


def test_gate_refuses_a_worse_challenger_and_says_why():
    worse = dict(GOOD, rag_token_f1=0.30, heldout_perplexity=22.0)
    decision = compare_to_champion(worse, GOOD, HAPPY_HUMANS, GatePolicy())
    assert not decision.passed
    assert any(
        r.startswith("rag_token_f1: 0.3 is lower than the champion's 0.4") for r in decision.reasons
    )
    assert any(r.startswith("heldout_perplexity: 22 is higher") for r in decision.reasons)
    failed = {c["metric"] for c in decision.checks if not c["ok"]}
    assert failed == {"rag_token_f1", "heldout_perplexity"}


def test_relative_tolerance_for_perplexity():
    rule = MetricRule("heldout_perplexity", higher_is_better=False, tolerance=0.05, relative=True)
    assert rule.ok(20.9, 20.0) and not rule.ok(21.1, 20.0)


@pytest.mark.parametrize(
    ("human", "message"),
    [
        (None, "no ratings yet"),
        (HumanSummary(5, 4.6, 4.2, 4.9), "5 ratings < 10"),
        (HumanSummary(20, 3.9, 3.6, 4.1), "mean 3.90 < 4.0"),
        (HumanSummary(20, 4.1, 3.7, 4.4), "CI lower bound 3.70 < 3.8"),
    ],
)
def test_human_gate(human, message):
    decision = compare_to_champion(GOOD, GOOD, human, GatePolicy())
    assert not decision.passed
    assert any(message in r for r in decision.reasons)


def test_waiver_is_explicit_and_needs_a_reason():
    waived = compare_to_champion(
        GOOD, None, None, GatePolicy(human_gate="waived", waiver_reason="demo")
    )
    assert waived.passed and waived.human_waived
    assert "human gate WAIVED: demo" in waived.reasons
    assert "no champion yet" in waived.reasons[0]
    no_reason = compare_to_champion(GOOD, None, None, GatePolicy(human_gate="waived"))
    assert not no_reason.passed and any("needs a reason" in r for r in no_reason.reasons)


def test_empty_or_broken_evaluations_never_promote():
    policy = GatePolicy(human_gate="waived", waiver_reason="test")
    assert not compare_to_champion(None, GOOD, HAPPY_HUMANS, policy).passed
    assert not compare_to_champion({"examples": 0}, GOOD, HAPPY_HUMANS, policy).passed
    missing = compare_to_champion(
        {"examples": 3, "rag_token_f1": float("nan")}, None, HAPPY_HUMANS, policy
    )
    assert not missing.passed and any("missing" in r for r in missing.reasons)
    custom = GatePolicy(
        rules=(MetricRule("heldout_perplexity", higher_is_better=False),),
        floors=(),
        human=HumanRule(min_ratings=1),
        human_gate="waived",
        waiver_reason="x",
    )
    assert compare_to_champion(
        {"examples": 1, "heldout_perplexity": 10.0}, {"heldout_perplexity": 11.0}, None, custom
    ).passed


WAIVED = GatePolicy(human_gate="waived", waiver_reason="unit test")


def test_a_first_model_that_withholds_everything_is_refused_by_the_floor():
    useless = dict(GOOD, rag_answered_right=0.0, rag_wrong_shown=0.0, rag_abstained=1.0)
    decision = compare_to_champion(useless, None, HAPPY_HUMANS, WAIVED)
    assert not decision.passed and "all rules passed" not in decision.reasons
    assert (
        "rag_answered_right: 0 is below the floor 0.25 (a model must answer and be right)"
        in decision.reasons
    )
    (check,) = [c for c in decision.checks if c["metric"] == "rag_answered_right"]
    assert check == {
        "metric": "rag_answered_right",
        "kind": "floor",
        "challenger": 0.0,
        "minimum": 0.25,
        "maximum": None,
        "ok": False,
    }
    wrong = compare_to_champion(dict(GOOD, rag_wrong_shown=0.4), None, HAPPY_HUMANS, WAIVED)
    assert not wrong.passed
    assert any(
        r.startswith("rag_wrong_shown: 0.4 is above the ceiling 0.25") for r in wrong.reasons
    )


def test_a_challenger_better_than_the_champion_but_below_a_floor_is_refused():
    weak_champion = dict(GOOD, rag_token_f1=0.1, rag_answered_right=0.1)
    challenger = dict(GOOD, rag_token_f1=0.2, rag_answered_right=0.2)
    decision = compare_to_champion(challenger, weak_champion, HAPPY_HUMANS, GatePolicy())
    assert not decision.passed
    failed = {c["metric"] for c in decision.checks if not c["ok"]}
    assert failed == {"rag_answered_right"}
    assert any(r.startswith("rag_answered_right: 0.2 is below the floor") for r in decision.reasons)


def test_a_model_that_meets_the_floors_passes_and_a_missing_floor_metric_fails():
    first = compare_to_champion(GOOD, None, HAPPY_HUMANS, GatePolicy())
    assert first.passed and "all rules passed" in first.reasons
    floors = [c for c in first.checks if c.get("kind") == "floor"]
    assert {c["metric"] for c in floors} == {f.metric for f in DEFAULT_FLOORS}
    assert all(c["ok"] for c in floors)
    at_the_bounds = dict(GOOD, rag_answered_right=0.25, rag_wrong_shown=0.25)
    assert compare_to_champion(at_the_bounds, None, HAPPY_HUMANS, GatePolicy()).passed
    for broken in ({k: v for k, v in GOOD.items() if k != "rag_wrong_shown"},
                   dict(GOOD, rag_wrong_shown=float("nan"))):  # fmt: skip
        decision = compare_to_champion(broken, None, HAPPY_HUMANS, GatePolicy())
        assert not decision.passed
        assert any(r.startswith("rag_wrong_shown: missing") for r in decision.reasons)


def test_floor_overrides_and_unknown_names():
    policy = policy_from(floors={"rag_answered_right": 0.6, "rag_wrong_shown": 0.05})
    assert policy.floors == (
        FloorRule("rag_answered_right", minimum=0.6, why=DEFAULT_FLOORS[0].why),
        FloorRule("rag_wrong_shown", maximum=0.05, why=DEFAULT_FLOORS[1].why),
    )
    decision = compare_to_champion(GOOD, None, HAPPY_HUMANS, policy)
    assert {c["metric"] for c in decision.checks if not c["ok"]} == {
        "rag_answered_right",
        "rag_wrong_shown",
    }
    # restricting the comparison with the champion leaves the floors on
    assert policy_from(rules=["heldout_perplexity"]).floors == DEFAULT_FLOORS
    assert policy_from().floors == DEFAULT_FLOORS
    with pytest.raises(ValueError, match=r"unknown floor metrics \['rag_token_f1'\]"):
        policy_from(floors={"rag_token_f1": 0.3})
    with pytest.raises(ValueError, match="finite"):
        policy_from(floors={"rag_answered_right": float("nan")})


def test_the_promotion_policy_resource_passes_floor_overrides():
    from assets.resources import PromotionPolicy

    policy = PromotionPolicy(floors={"rag_answered_right": 0.1}).policy()
    assert policy.floors[0].minimum == 0.1 and policy.floors[1] == DEFAULT_FLOORS[1]
    with pytest.raises(ValueError, match="unknown floor metrics"):
        PromotionPolicy(floors={"nope": 1.0}).policy()


def hit(i: int, score: float, text: str) -> Hit:
    return Hit(f"c{i}", f"d{i}", f"doc{i}.md", f"Doc {i}", 0, text, score, {})


def test_rag_prompt_numbers_chunks_and_bounds_context():
    hits = [hit(1, 0.7, "Queens develop in 16 days."), hit(2, 0.5, "x" * 5000)]
    msgs = build_messages("How long for a queen?", hits, max_context_chars=100)
    assert msgs[0]["role"] == "system" and "only the numbered documents" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert "[1] (Doc 1) Queens develop in 16 days." in user and user.endswith(
        "Question: How long for a queen?"
    )
    assert len(user) < 300
    assert "(no documents found)" in build_messages("q", [])[1]["content"]


def test_retrieval_confidence_scale():
    assert retrieval_confidence([]) == 0.0
    assert retrieval_confidence([hit(1, 0.2, "")]) == 0.0
    assert retrieval_confidence([hit(1, 0.45, "")]) == pytest.approx(0.5)
    assert retrieval_confidence([hit(1, 0.95, "")]) == 1.0


def test_rag_question_set_ships_valid_and_bad_rows_are_counted(tmp_path):
    rows, dropped = load_rag_questions(DEFAULT_RAG_QUESTIONS)
    assert len(rows) == 60 and not dropped
    bad = tmp_path / "q.jsonl"
    bad.write_text(
        "\n".join(
            [
                json.dumps({"question": "q?", "answer": "a", "sources": ["x.md"]}),
                "{oops",
                json.dumps({"question": "q?", "answer": "a", "sources": ["x.md"]}),
                json.dumps({"question": "z?", "answer": "a", "sources": []}),
            ]
        )
    )
    rows, dropped = load_rag_questions(bad)
    assert len(rows) == 1 and dict(dropped) == {
        "malformed_json": 1,
        "duplicate": 1,
        "missing_sources": 1,
    }
    with pytest.raises(EvaluationDataError, match="does not exist"):
        load_rag_questions(tmp_path / "none.jsonl")
