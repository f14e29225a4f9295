"""Calibrated RAG confidence: what counts as correct, the logistic fit, ECE, the threshold,
the signals, the stored coefficients, and withholding an unsure answer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.calibration import (
    BASE_FEATURES,
    LOGPROB_FEATURES,
    choose_threshold,
    expected_calibration_error,
    fit_calibration,
    fit_logistic,
    is_correct,
    wrong_above,
)
from refinery.rag.answer import make_answer
from refinery.rag.confidence import (
    CONFIDENCE_FILE,
    Z_CLIP,
    Calibration,
    ConfidenceModel,
    fact_support,
    facts,
    load_calibration,
    signals,
)
from refinery.retrieval.search import Hit


@pytest.mark.parametrize(
    ("answer", "reference", "correct"),
    [
        ("A queen emerges about 16 days after the egg is laid.", "About 16 days.", True),
        ("About 21 days.", "About 16 days.", False),  # the number is what matters
        ("It takes 160 days.", "About 16 days.", False),  # not a substring match
        ("The spermatheca.", "The spermatheca.", True),
        ("In the honey stomach.", "The spermatheca.", False),
        ("I don't know.", "The spermatheca.", False),
        ("The documents do not mention it.", "About 16 days.", False),
        ("Use VACUUM INTO with a file name.", "Use VACUUM INTO 'filename'.", True),
        (
            "2,000 columns, up to 32767.",
            "2000 columns by default; up to 32767 at compile time.",
            True,
        ),
    ],
)
def test_what_counts_as_a_correct_answer(answer, reference, correct):
    assert is_correct(answer, reference) is correct


def test_logistic_fit_learns_the_direction_and_gives_probabilities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    y = rng.random(400) < 1 / (1 + np.exp(-(2.0 * x - 0.5)))
    model = fit_logistic([{"s": v} for v in x], list(y), ["s"], l2=0.01)
    # standardized coefficient -> slope on the raw signal ~ 2, intercept ~ -0.5
    slope = model.coef[0] / model.scale[0]
    assert 1.5 < slope < 2.6
    assert 0 < model.predict({"s": -3}) < 0.05 < 0.95 < model.predict({"s": 3}) < 1
    with pytest.raises(ValueError):
        fit_logistic([{"s": 1.0}], [True], ["s"])


def test_expected_calibration_error():
    assert expected_calibration_error([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.8] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.3)
    # two bins, each half of the rows: |0.2-0| and |0.7-1| averaged
    assert expected_calibration_error(
        [0.2, 0.2, 0.7, 0.7], [False, False, True, True]
    ) == pytest.approx(0.25)


def test_threshold_and_wrong_answers_let_through():
    probs = [0.1, 0.2, 0.4, 0.6, 0.8, 0.9]
    labels = [False, False, True, False, True, True]
    t = choose_threshold(probs, labels, max_wrong=0.25)
    assert t == 0.4  # kept: T F T T -> 1 wrong in 4
    g = wrong_above(probs, labels, t)
    assert g["answered"] == pytest.approx(4 / 6)
    assert g["wrong_share_of_answered"] == pytest.approx(1 / 4)
    assert g["wrong_let_through"] == pytest.approx(1 / 3)


def hit(text: str, score: float, vector_rank=1, text_rank=1) -> Hit:
    return Hit("c", "d", "doc.md", "Doc", 0, text, score, {}, vector_rank, text_rank, 0.1, 0.03)


def test_facts_and_fact_support():
    assert facts("A queen lays 1,500 eggs. Use PRAGMA foreign_keys in SQLite.") >= {
        "1500",
        "pragma",
        "foreign_keys",
        "sqlite",
    }
    ctx = ["Queens lay up to 1500 eggs a day in SQLite."]
    assert fact_support("About 1,500 eggs.", ctx) == 1.0
    assert fact_support("About 2000 eggs.", ctx) == 0.0
    assert fact_support("Yes, they do.", ctx) == 1.0
    assert fact_support("About 16 days.", ["It takes 160 days."]) == 0.0  # whole numbers only


def test_signals():
    hits = [hit("Queens emerge after 16 days.", 0.7), hit("Drones take 24 days.", 0.5, 2, None)]
    s = signals("When does a queen emerge?", hits, "After 16 days.", [-0.1, -0.3, -2.0])
    assert s["top_cosine"] == 0.7 and s["cosine_margin"] == pytest.approx(0.2)
    assert s["both_lists"] == 1.0 and s["fact_support"] == 1.0 and s["says_unknown"] == 0.0
    assert s["mean_logprob"] == pytest.approx(-0.8) and s["min_logprob"] == -2.0
    assert s["has_evidence"] == 1.0 and s["evidence_agreement"] == 1.0
    off = signals("When does a queen emerge?", hits, "After the swarm leaves the hive.")
    assert off["has_evidence"] == 1.0 and off["evidence_agreement"] < 0.5
    unsupported = signals("How far do drones fly?", hits, "Five miles.")
    assert unsupported["has_evidence"] == 0.0 and unsupported["evidence_agreement"] == 0.0
    assert "mean_logprob" not in signals("q", hits, "a")
    assert signals("q", [], "I don't know.")["says_unknown"] == 1.0


def calibration(threshold: float) -> Calibration:
    without = ConfidenceModel(("top_cosine",), (0.5,), (0.1,), (2.0,), 0.0)
    with_lp = ConfidenceModel(
        ("top_cosine", "mean_logprob"), (0.5, -1.0), (0.1, 0.5), (2.0, 1.0), 0.0
    )
    return Calibration(with_lp, without, threshold)


def test_with_and_without_logprobs():
    cal = calibration(0.5)
    assert cal.confidence({"top_cosine": 0.5}) == pytest.approx(0.5)
    assert cal.confidence({"top_cosine": 0.5, "mean_logprob": -0.5}) == pytest.approx(
        1 / (1 + math.exp(-1.0))
    )


def test_an_unsure_answer_says_it_does_not_know_with_its_sources():
    hits = [hit("Queens emerge after 16 days.", 0.3)]
    unsure = make_answer("When?", hits, "After 40 days.", 10, 4, calibration=calibration(0.5))
    assert unsure.abstained and unsure.confidence < 0.5
    assert unsure.answer.startswith("I don't know") and "doc.md" in unsure.answer
    assert unsure.model_answer == "After 40 days." and "model_answer" not in unsure.to_dict()
    assert unsure.sources and unsure.sources[0].source == "doc.md"
    sure = make_answer(
        "When?",
        [hit("Queens emerge after 16 days.", 0.8)],
        "After 16 days.",
        10,
        4,
        calibration=calibration(0.5),
    )
    assert not sure.abstained and sure.answer == "After 16 days."
    # the threshold is configurable: 0 never withholds
    assert not make_answer(
        "When?", hits, "x", 1, 1, calibration=calibration(0.5), min_confidence=0
    ).abstained
    with pytest.raises(ValueError, match="min_confidence"):
        make_answer("When?", hits, "x", 1, 1, calibration=calibration(0.5), min_confidence=2)
    # without a calibration: the lexical score, nothing withheld
    lexical = make_answer("When?", hits, "After 40 days.", 10, 4)
    assert not lexical.abstained and lexical.answer == "After 40 days."


def test_calibration_round_trips_through_json_and_the_stored_one_loads():
    rows = [{f: float(i % 3 == 0) + 0.1 * i for f in BASE_FEATURES + LOGPROB_FEATURES}
            for i in range(20)]  # fmt: skip
    labels = [i % 3 == 0 for i in range(20)]
    cal = fit_calibration(rows, labels)
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    assert cal.with_logprobs is not None and 0 <= cal.threshold <= 1
    with pytest.raises(ValueError, match="differ in length"):
        ConfidenceModel.from_dict(
            {"features": ["a"], "mean": [0, 1], "scale": [1], "coef": [1], "intercept": 0}
        )


def test_the_stored_calibration_loads():
    """data/rag/confidence.json is made by `python -m benchmarks confidence` and committed."""
    stored = load_calibration(CONFIDENCE_FILE)
    assert stored is not None
    assert 0 < stored.threshold < 1 and stored.without_logprobs.features


def test_no_stored_calibration_means_none(tmp_path):
    assert load_calibration(tmp_path / "none.json") is None


def test_a_signal_far_outside_its_training_range_counts_only_z_clip_deviations():
    # fact_support's training answers nearly all had 1 (scale 0.02): an answer with none of its
    # facts in the chunks must not swing to certainty on that one signal.
    model = ConfidenceModel(("fact_support",), (0.99,), (0.02,), (-0.5,), 0.0)
    bounded = 1 / (1 + math.exp(-0.5 * Z_CLIP))
    assert model.predict({"fact_support": 0.0}) == pytest.approx(bounded)
    assert model.predict({"fact_support": -50.0}) == pytest.approx(bounded)
    assert model.predict({"fact_support": 0.99}) == pytest.approx(0.5)


def test_a_signal_that_can_only_help_never_gets_a_negative_weight():
    # On these rows "support" goes against rightness by chance; held at zero, "logprob" decides.
    rows = [{"support": s, "logprob": lp} for s, lp in
            [(0.9, -2.0), (0.8, -1.8), (0.7, -1.5), (0.2, -0.2), (0.3, -0.3), (0.1, -0.1),
             (0.85, -1.9), (0.25, -0.4)]]  # fmt: skip
    labels = [False, False, False, True, True, True, False, True]
    free = fit_logistic(rows, labels, ["support", "logprob"])
    held = fit_logistic(rows, labels, ["support", "logprob"], positive={"support"})
    assert free.coef[0] < 0
    assert held.features == ("support", "logprob") and held.coef[0] == 0.0 and held.coef[1] > 0
    assert held.predict({"support": 1.0, "logprob": -0.2}) == pytest.approx(
        held.predict({"support": 0.0, "logprob": -0.2})
    )
