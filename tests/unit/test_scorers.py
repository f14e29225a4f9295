"""The GenAI scorers are named like the aggregate metrics they make, and score as the automatic
evaluation does (no MLflow store involved: scorers are called directly)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evaluation.automatic import aggregate, metric_name
from evaluation.scorers import expectations, scorers_for
from refinery.core.registry import logged_model_id
from tests.eval_helpers import scored_examples


def _trace(scores: dict[str, float]) -> SimpleNamespace:
    root = SimpleNamespace(parent_id=None, attributes={f"score.{k}": v for k, v in scores.items()})
    return SimpleNamespace(data=SimpleNamespace(spans=[root]))


def test_every_scorer_is_an_aggregate_metric_and_scores_like_the_evaluation():
    examples = scored_examples()
    metrics = aggregate(examples)
    for example in examples:
        given = {
            "outputs": {"answer": example.answer, "sources": example.sources},
            "expectations": expectations(example.kind, example.reference, example.gold_sources),
            "trace": _trace(example.scores),
        }
        scored = {s.name: s.run(**given) for s in scorers_for(example.kind, k=2)}
        assert set(scored) <= set(metrics)  # "<name>/mean" in MLflow is the run's own metric
        for key, value in example.scores.items():
            assert scored[metric_name(example.kind, key)] == pytest.approx(value), key


def test_a_trace_without_a_recorded_score_is_an_error_not_a_zero():
    (confidence,) = [s for s in scorers_for("rag", 3) if s.name == "rag_confidence"]
    with pytest.raises(ValueError, match=r"score\.confidence"):
        confidence.run(trace=_trace({}))


@pytest.mark.parametrize(
    ("source", "model_id"),
    [
        ("models:/m-0123abcd", "m-0123abcd"),
        ("models:/m-0123abcd/", "m-0123abcd"),
        ("runs:/abc/model-none", ""),
        ("models:/refinery-chat/3", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_logged_model_id_of_a_version_source(source, model_id):
    assert logged_model_id(source) == model_id
