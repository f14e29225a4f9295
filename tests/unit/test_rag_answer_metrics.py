"""What a user of /rag sees, as figures: answers shown and right, shown and wrong, how well the
confidence separates right from wrong (AUROC), and the threshold for a stated precision."""

from __future__ import annotations

import pytest

from evaluation.automatic import ExampleResult, _rag_example, aggregate
from evaluation.calibration import (
    BASE_FEATURES,
    auroc,
    calibration_metrics,
    choose_threshold,
    fit_calibration,
    threshold_for_precision,
)
from refinery.rag.answer import RagAnswer


def test_auroc_on_hand_made_sets():
    labels = [False, False, True, True]
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0  # every right answer above every wrong
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0  # inverted
    assert auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # all tied: ties count half
    # right 0.3, 0.9 against wrong 0.3, 0.7: one tie, one pair out of order: (2 + 0.5) / 4
    assert auroc([0.3, 0.7, 0.3, 0.9], labels) == pytest.approx(0.625)
    assert auroc([0.2, 0.7, 0.6, 0.9], labels) == pytest.approx(0.75)  # 0.6 < 0.7
    # one class only, or nothing: undefined, reported as 0.5 (never NaN)
    assert auroc([0.1, 0.9], [True, True]) == 0.5
    assert auroc([0.1, 0.9], [False, False]) == 0.5
    assert auroc([], []) == 0.5
    with pytest.raises(ValueError):
        auroc([0.1], [True, False])


def test_threshold_for_precision_and_its_coverage():
    probs = [0.1, 0.2, 0.4, 0.6, 0.8, 0.9]
    labels = [False, False, True, False, True, True]
    choice = threshold_for_precision(probs, labels, 0.75)
    assert choice.threshold == 0.4 and choice.reached  # shown: T F T T
    assert choice.precision == pytest.approx(3 / 4) and choice.coverage == pytest.approx(4 / 6)
    assert choose_threshold(probs, labels, max_wrong=0.25) == 0.4
    strict = threshold_for_precision(probs, labels, 0.9)
    assert strict.threshold == 0.8 and strict.precision == 1.0 and strict.coverage == 2 / 6
    # a threshold shows every answer of equal confidence: at 0.5 the group F T T is 2/3 right
    tied = threshold_for_precision([0.2, 0.5, 0.5, 0.5], [False, False, True, True], 0.75)
    assert not tied.reached and tied.threshold == 0.5
    assert tied.precision == pytest.approx(2 / 3) and tied.coverage == pytest.approx(3 / 4)


def test_fit_calibration_records_the_coverage_of_its_threshold():
    rows = [{f: float(i % 3 == 0) + 0.1 * i for f in BASE_FEATURES} for i in range(20)]
    labels = [i % 3 == 0 for i in range(20)]
    cal = fit_calibration(rows, labels, max_wrong=0.25, meta={"made_by": "test"})
    # the threshold is stored as chosen: the rows at it are shown, as the coverage counts them
    assert cal.meta["made_by"] == "test"
    assert cal.meta["threshold_target_precision"] == 0.75
    assert 0 < cal.meta["threshold_coverage"] <= 1
    probs = [cal.confidence(r) for r in rows]
    shown = [y for p, y in zip(probs, labels, strict=True) if p >= cal.threshold]
    assert cal.meta["threshold_coverage"] == pytest.approx(len(shown) / len(rows))
    assert cal.meta["threshold_reached"] and sum(shown) / len(shown) >= 0.75
    assert cal.meta["threshold_precision"] == pytest.approx(sum(shown) / len(shown), abs=1e-4)


def rag(correct: bool, abstained: bool, confidence: float, split: str = "test") -> ExampleResult:
    shown = not abstained
    scores = {
        "hit_at_k": 1.0,
        "reciprocal_rank": 1.0,
        "correct": float(correct),
        "abstained": float(abstained),
        "confidence": confidence,
        "answered_right": float(shown and correct),
        "wrong_shown": float(shown and not correct),
    }
    return ExampleResult("rag", "q", "?", "ref", "ans", scores, 0.1, 3, split=split)


def test_answered_right_and_wrong_shown_aggregate_over_rag_rows_and_per_split():
    examples = [
        rag(True, False, 0.9),  # shown, right
        rag(False, False, 0.7),  # shown, wrong
        rag(True, True, 0.2),  # right but withheld
        rag(False, True, 0.1),  # wrong and withheld
        rag(True, False, 0.8, split="tune"),
    ]
    out = aggregate(examples)
    assert out["rag_answered_right"] == pytest.approx(2 / 5)
    assert out["rag_wrong_shown"] == pytest.approx(1 / 5)
    assert out["rag_abstained"] == pytest.approx(2 / 5)
    assert out["rag_test_answered_right"] == pytest.approx(1 / 4)
    assert out["rag_test_wrong_shown"] == pytest.approx(1 / 4)
    assert out["rag_tune_answered_right"] == 1.0 and out["rag_tune_wrong_shown"] == 0.0
    test = calibration_metrics(examples, "test")
    assert test["rag_test_coverage"] == pytest.approx(2 / 4)
    assert test["rag_test_shown_precision"] == pytest.approx(1 / 2)
    # right answers at 0.9, 0.2; wrong at 0.7, 0.1: 3 of 4 pairs in order
    assert test["rag_test_auroc"] == pytest.approx(3 / 4)
    assert test["rag_test_examples"] == 4


def test_a_model_that_withholds_everything_shows_nothing_and_is_not_precise():
    examples = [rag(True, True, 0.3), rag(False, True, 0.2)]
    out = aggregate(examples)
    assert out["rag_answered_right"] == 0.0 and out["rag_wrong_shown"] == 0.0
    assert out["rag_abstained"] == 1.0
    test = calibration_metrics(examples, "test")
    assert test["rag_test_coverage"] == 0.0 and test["rag_test_shown_precision"] == 0.0
    assert test["rag_test_auroc"] == 1.0


def test_a_rag_example_scores_what_the_user_is_shown():
    row = {"id": "q1", "question": "How long?", "answer": "About 16 days.", "sources": ["a.md"]}

    def answer(abstained: bool, leak: str | None = None) -> RagAnswer:
        return RagAnswer("How long?", "x", [], 0.8, 0.5, 1.0, 10, 4, leak=leak,
                         abstained=abstained, model_answer="About 16 days.")  # fmt: skip

    shown = _rag_example(row, answer(False), 3, 0.1).scores
    assert shown["correct"] == 1.0 and shown["answered_right"] == 1.0
    assert shown["wrong_shown"] == 0.0
    withheld = _rag_example(row, answer(True), 3, 0.1).scores
    assert withheld["correct"] == 1.0 and withheld["answered_right"] == 0.0
    leaked = _rag_example(row, answer(False, leak="canary"), 3, 0.1).scores
    assert leaked["answered_right"] == 0.0 and leaked["wrong_shown"] == 0.0
