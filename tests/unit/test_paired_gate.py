"""Promotion by statistics: the paired bootstrap, per-example pairs from two evaluations, and
the gate's non-inferiority rule over them (pure functions)."""

from __future__ import annotations

import json

import pytest

from evaluation.automatic import ExampleResult, ModelEvaluation, aggregate, paired_scores
from evaluation.gate import GatePolicy, HumanSummary, MetricRule, compare_to_champion, policy_from
from evaluation.metrics import paired_bootstrap

HAPPY = HumanSummary(count=12, mean=4.4, ci_low=4.1, ci_high=4.7)
ONLY_F1 = GatePolicy(rules=(MetricRule("rag_token_f1", tolerance=0.02),), floors=())


def test_paired_bootstrap_of_means_and_of_ratios():
    rows = [(0.5, 0.4)] * 10 + [(0.3, 0.3)] * 10
    diff, low, high = paired_bootstrap(rows, seed=3)
    assert diff == pytest.approx(0.05) and low <= diff <= high
    assert paired_bootstrap(rows, seed=3) == (diff, low, high)  # seeded: reproducible
    # Identical models: no difference and no spread.
    assert paired_bootstrap([(0.7, 0.7)] * 5) == (0.0, 0.0, 0.0)
    # Perplexity from summed NLL over answer tokens, as a fraction of the champion's.
    ppl = paired_bootstrap([(10.0, 5, 12.0, 5)] * 8, exp=True, relative=True)
    assert ppl[0] == pytest.approx(2.718281828 ** (2.0) / 2.718281828 ** (2.4) - 1)
    with pytest.raises(ValueError, match="rows of 2 or 4"):
        paired_bootstrap([])
    with pytest.raises(ValueError, match="rows of 2 or 4"):
        paired_bootstrap([(1.0, 2.0, 3.0)])


def test_more_examples_give_a_tighter_interval():
    rows = [(0.9, 0.2), (0.1, 0.6), (0.5, 0.5), (0.4, 0.7)] * 5
    _, low, high = paired_bootstrap(rows, seed=1)
    _, low_many, high_many = paired_bootstrap(rows * 10, seed=1)
    assert high_many - low_many < high - low


def _metrics(f1: float) -> dict[str, float]:
    return {"examples": 40, "rag_token_f1": f1}


def test_same_mean_difference_passes_when_steady_and_fails_when_noisy():
    """Both challengers are 0.01 below the champion on average (within the 0.02 tolerance as
    a point estimate). Steady pairs pass; pairs that swing either way do not show, at 95%,
    that the challenger is not worse beyond the tolerance."""
    steady = {"rag_token_f1": {"rows": [[0.49, 0.5]] * 40}}
    passed = compare_to_champion(_metrics(0.49), _metrics(0.5), HAPPY, ONLY_F1, paired=steady)
    assert passed.passed, passed.reasons
    (check,) = [c for c in passed.checks if c["metric"] == "rag_token_f1"]
    assert check["method"] == "paired bootstrap" and check["examples"] == 40
    assert check["difference"] == pytest.approx(-0.01) and check["bound"] == pytest.approx(-0.01)
    assert any(r.startswith("rag_token_f1: not worse beyond the tolerance") for r in passed.reasons)

    noisy = {"rag_token_f1": {"rows": [[0.8, 0.5], [0.18, 0.5]] * 20}}
    refused = compare_to_champion(_metrics(0.49), _metrics(0.5), HAPPY, ONLY_F1, paired=noisy)
    assert not refused.passed
    (check,) = [c for c in refused.checks if c["metric"] == "rag_token_f1"]
    low, high = check["interval"]
    assert low < -0.02 < high and check["bound"] == low and not check["ok"]
    (reason,) = [r for r in refused.reasons if r.startswith("rag_token_f1:")]
    assert "lower than the champion's beyond the tolerance at 95% confidence" in reason
    assert "over 40 paired examples" in reason
    # The same figures compared as means pass: the interval is what refuses it.
    assert compare_to_champion(_metrics(0.49), _metrics(0.5), HAPPY, ONLY_F1).passed


def test_perplexity_rule_on_paired_sums():
    policy = GatePolicy(
        rules=(MetricRule("heldout_perplexity", False, tolerance=0.02, relative=True),), floors=()
    )
    better = {"heldout_perplexity": {"rows": [[9.0, 5, 10.0, 5]] * 8, "exp": True}}
    worse = {"heldout_perplexity": {"rows": [[12.0, 5, 10.0, 5]] * 8, "exp": True}}
    ppl = {"examples": 8, "heldout_perplexity": 6.0}
    assert compare_to_champion(ppl, ppl, HAPPY, policy, paired=better).passed
    refused = compare_to_champion(ppl, ppl, HAPPY, policy, paired=worse)
    assert not refused.passed
    assert any(
        r.startswith("heldout_perplexity:") and "higher than the champion's" in r
        for r in refused.reasons
    )


def test_confidence_is_validated_and_used():
    assert policy_from(confidence=0.9).confidence == 0.9
    for bad in (0.3, 1.0):
        with pytest.raises(ValueError, match="confidence must be"):
            policy_from(confidence=bad)
    rows = {"rag_token_f1": {"rows": [[0.6, 0.5], [0.38, 0.5]] * 10}}  # mean −0.01
    lenient = compare_to_champion(
        _metrics(0.49), _metrics(0.5), HAPPY, GatePolicy(rules=ONLY_F1.rules, floors=(), confidence=0.5),
        paired=rows,
    )  # fmt: skip
    strict = compare_to_champion(_metrics(0.49), _metrics(0.5), HAPPY, ONLY_F1, paired=rows)
    assert lenient.passed and not strict.passed
    json.dumps(strict.checks)  # the decision's checks are recorded as JSON on the version


def _example(kind: str, i: int, f1: float, nll: float = 0.0) -> ExampleResult:
    scores = {"exact_match": 0.0, "token_f1": f1, "rouge_l": f1}
    if kind == "heldout":
        scores.update(nll=nll, answer_tokens=4.0)
    else:
        scores.update(hit_at_k=1.0, reciprocal_rank=1.0, groundedness=0.5)
    return ExampleResult(kind, f"{kind}-{i}", "q", "a", "a", scores, 0.1, 3)


def test_paired_scores_match_examples_by_kind_and_id():
    ours = [_example("heldout", i, 0.5, nll=4.0) for i in range(3)] + [
        _example("rag", i, 0.6) for i in range(2)
    ]
    theirs = [_example("heldout", i, 0.4, nll=6.0) for i in range(3)] + [
        _example("rag", i, 0.2) for i in range(2)
    ]
    a, b = (
        ModelEvaluation("m/2", aggregate(ours), ours),
        ModelEvaluation("m/1", aggregate(theirs), theirs),
    )
    pairs = paired_scores(a, b)
    assert pairs["rag_token_f1"]["rows"] == [[0.6, 0.2], [0.6, 0.2]]
    assert pairs["heldout_token_f1"]["rows"] == [[0.5, 0.4]] * 3
    assert pairs["retrieval_hit_at_k"]["rows"] == [[1.0, 1.0]] * 2
    assert pairs["heldout_perplexity"] == {"rows": [[4.0, 4.0, 6.0, 4.0]] * 3, "exp": True}
    # The summed parts are not means of their own.
    assert "heldout_nll" not in pairs and "heldout_nll" not in a.metrics
    # Other examples (a changed question set): no pairs for that kind, the gate compares means.
    moved = [_example("rag", i + 5, 0.2) for i in range(2)] + theirs[:3]
    assert "rag_token_f1" not in paired_scores(a, ModelEvaluation("m/1", {}, moved))
