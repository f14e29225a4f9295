"""The automatic evaluation's per-example metrics as MLflow GenAI scorers, so that
``mlflow.genai.evaluate`` writes them onto each example's trace as assessments (the Evaluations
UI) and their means onto the model (``evaluation.tracing.evaluate_in_mlflow``).

Each scorer is named like the aggregate metric it makes (``evaluation.automatic.metric_name``:
``rag_token_f1``, ``retrieval_mrr`` ...), so ``<name>/mean`` in MLflow is the run's own metric.
Two kinds:
- computed from the trace's answer and the row's expectations, with the same functions as
  ``evaluation.automatic`` (exact match, token F1, ROUGE-L, correctness, hit@k, MRR);
- recorded when the model answered, from model internals that a trace does not hold (the
  answer's groundedness in its chunks, the calibrated confidence, whether the service would
  have shown it): read from the root span's ``score.<key>`` attribute that
  ``evaluation.tracing.log_traces`` writes.
The held-out perplexity is a ratio of sums over examples, not a mean of per-example scores: it
is linked to the model as a metric, not scored per example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evaluation.automatic import metric_name
from evaluation.calibration import is_correct
from evaluation.metrics import exact_match, hit_at_k, reciprocal_rank, rouge_l, token_f1

EXPECTED_RESPONSE = "expected_response"  # MLflow's name for a reference answer
EXPECTED_SOURCES = "expected_sources"  # the documents that hold a RAG question's answer
# What the service computed as it answered, carried from the trace (see the module's text).
RECORDED = ("groundedness", "confidence", "abstained", "answered_right", "wrong_shown")

_ANSWER_METRICS: dict[str, Callable[[str, str], Any]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def expectations(kind: str, reference: str, gold_sources: list[str]) -> dict[str, Any]:
    """The row's expectations: its reference answer, and for RAG the documents that hold it."""
    out: dict[str, Any] = {EXPECTED_RESPONSE: reference}
    if kind == "rag":
        out[EXPECTED_SOURCES] = list(gold_sources)
    return out


def scorers_for(kind: str, k: int) -> list[Any]:
    """The scorers of ``kind`` ("heldout" or "rag"); ``k``: the retrieval depth evaluated."""
    out = [_answer_scorer(metric_name(kind, key), fn) for key, fn in _ANSWER_METRICS.items()]
    if kind == "rag":
        out += [
            _answer_scorer(metric_name(kind, "correct"), is_correct),
            _retrieval_scorer(metric_name(kind, "hit_at_k"), lambda r, g: hit_at_k(r, g, k)),
            _retrieval_scorer(metric_name(kind, "reciprocal_rank"), reciprocal_rank),
            *(_recorded_scorer(metric_name(kind, key), key) for key in RECORDED),
        ]
    return out


def _answer(outputs: Any) -> str:
    return str((outputs or {}).get("answer", "")) if isinstance(outputs, dict) else str(outputs)


def _answer_scorer(name: str, fn: Callable[[str, str], Any]) -> Any:
    from mlflow.genai.scorers import scorer

    def score(outputs: Any, expectations: dict[str, Any]) -> float:
        # RAG rows score the model's own text (what the gate compares models on), as
        # evaluation.automatic does; the argument order is (answer, reference).
        return float(fn(_answer(outputs), str(expectations[EXPECTED_RESPONSE])))

    return scorer(score, name=name)


def _retrieval_scorer(name: str, fn: Callable[[list[str], list[str]], float]) -> Any:
    from mlflow.genai.scorers import scorer

    def score(outputs: Any, expectations: dict[str, Any]) -> float:
        retrieved = [str(s.get("source", "")) for s in (outputs or {}).get("sources", [])]
        return float(fn(retrieved, list(expectations[EXPECTED_SOURCES])))

    return scorer(score, name=name)


def _recorded_scorer(name: str, key: str) -> Any:
    from mlflow.genai.scorers import scorer

    def score(trace: Any) -> float:
        root = next(s for s in trace.data.spans if s.parent_id is None)
        value = root.attributes.get(f"score.{key}")
        if value is None:
            raise ValueError(f"the trace records no score.{key}")
        return float(value)

    return scorer(score, name=name)
