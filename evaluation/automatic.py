"""Automatic evaluation of one chat model: held-out answers and RAG questions.

Metrics (all in MLflow, per example and aggregated):
- held-out SFT split: perplexity of the reference answers; exact match, token F1 and ROUGE-L of
  the generated answers against them;
- RAG questions: the same three against the reference answers; retrieval hit@k and MRR against
  the documents that hold the answer; groundedness of each answer in the chunks it was given
  (``refinery.rag.confidence.support``); whether the answer is correct (``evaluation.calibration.is_correct``)
  and the calibrated confidence, with its expected calibration error on the test split
  (``rag_test_ece``) and a reliability diagram (``reliability_png``); what a user would see:
  ``answered_right`` (shown and correct) and ``wrong_shown`` (shown and wrong), where "shown"
  means neither withheld below the confidence threshold (``abstained``) nor replaced as a leak,
  over all RAG rows (``rag_answered_right``, ``rag_wrong_shown``: the gate's floors) and per
  split (``rag_test_answered_right`` ...); how well confidence separates right from wrong
  (``rag_test_auroc``), and the precision and coverage of shown answers at the stored threshold
  (``evaluation.calibration.calibration_metrics``);
- latency per question (generation is batched: batch time / batch size) and tokens/s.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from evaluation.calibration import calibration_metrics, is_correct, reliability_diagram
from evaluation.metrics import exact_match, hit_at_k, reciprocal_rank, rouge_l, token_f1
from refinery.generation.scoring import answer_nll_rows, row_prompt
from refinery.rag.answer import answer_batch
from refinery.rag.confidence import Calibration


class EvaluationError(ValueError):
    pass


@dataclass
class ExampleResult:
    kind: str  # "heldout" or "rag"
    example_id: str
    question: str
    reference: str
    answer: str
    scores: dict[str, float]
    latency_s: float
    completion_tokens: int
    sources: list[dict[str, Any]] = field(default_factory=list)
    gold_sources: list[str] = field(default_factory=list)
    trace_id: str = ""
    split: str = ""  # RAG rows: "tune" or "test" (see evaluation.datasets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelEvaluation:
    label: str  # "refinery-chat/3"
    metrics: dict[str, float]
    examples: list[ExampleResult]


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate_model(
    label: str,
    generator: Any,
    heldout_rows: list[dict[str, Any]],
    rag_rows: list[dict[str, Any]],
    retriever: Any,
    *,
    k: int = 3,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    calibration: Calibration | None = None,
    progress: Callable[[str], None] | None = None,
) -> ModelEvaluation:
    """Both sets answered and scored. ``calibration``: the RAG confidence model the service
    runs (``refinery.rag.confidence.load_calibration``); None: the lexical score."""
    if not heldout_rows and not rag_rows:
        raise EvaluationError("both evaluation sets are empty: nothing to evaluate")
    say = progress or (lambda _m: None)
    examples, tokens, seconds = _heldout_examples(
        generator, heldout_rows, batch_size, max_new_tokens
    )
    say(f"{label}: {len(heldout_rows)} held-out answers")
    rag, rag_tokens, rag_seconds = _rag_examples(
        generator, rag_rows, retriever, k, batch_size, max_new_tokens, calibration
    )
    examples += rag
    tokens += rag_tokens
    seconds += rag_seconds
    say(f"{label}: {len(rag_rows)} RAG answers")
    if heldout_rows:  # each held-out example's reference NLL, for paired comparisons
        per_row = answer_nll_rows(generator, heldout_rows)
        heldout = [e for e in examples if e.kind == "heldout"]
        for example, (nll, n) in zip(heldout, per_row, strict=True):
            example.scores.update(nll=nll, answer_tokens=float(n))
    metrics = aggregate(examples)
    metrics.update(calibration_metrics(examples, "test"))
    if heldout_rows:
        nll_sum = sum(e.scores["nll"] for e in examples if e.kind == "heldout")
        tokens_sum = sum(e.scores["answer_tokens"] for e in examples if e.kind == "heldout")
        metrics["heldout_perplexity"] = math.exp(nll_sum / max(1.0, tokens_sum))
    metrics["tokens_per_second"] = tokens / seconds if seconds else 0.0
    return ModelEvaluation(label, metrics, examples)


def _heldout_examples(
    generator: Any, rows: list[dict[str, Any]], batch_size: int, max_new_tokens: int
) -> tuple[list[ExampleResult], int, float]:
    """(scored held-out answers, completion tokens, generation seconds)."""
    examples: list[ExampleResult] = []
    tokens, seconds = 0, 0.0
    for batch in _batches(rows, batch_size):
        t0 = time.perf_counter()
        outs = generator.generate([row_prompt(r) for r in batch], max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        seconds += dt
        for row, out in zip(batch, outs, strict=True):
            tokens += out.completion_tokens
            examples.append(
                ExampleResult(
                    "heldout",
                    str(row.get("id", len(examples))),
                    row["instruction"],
                    row["response"],
                    out.text,
                    _answer_scores(out.text, row["response"]),
                    dt / len(batch),
                    out.completion_tokens,
                )
            )
    return examples, tokens, seconds


def _rag_examples(
    generator: Any,
    rows: list[dict[str, Any]],
    retriever: Any,
    k: int,
    batch_size: int,
    max_new_tokens: int,
    calibration: Calibration | None,
) -> tuple[list[ExampleResult], int, float]:
    """(scored RAG answers, completion tokens, answering seconds)."""
    examples: list[ExampleResult] = []
    tokens, seconds = 0, 0.0
    for batch in _batches(rows, batch_size):
        t0 = time.perf_counter()
        answers = answer_batch(
            [r["question"] for r in batch], retriever, generator, k=k,
            max_new_tokens=max_new_tokens, calibration=calibration,
        )  # fmt: skip
        dt = time.perf_counter() - t0
        seconds += dt
        for row, ans in zip(batch, answers, strict=True):
            tokens += ans.completion_tokens
            examples.append(_rag_example(row, ans, k, dt / len(batch)))
    return examples, tokens, seconds


def _rag_example(row: dict[str, Any], ans: Any, k: int, latency_s: float) -> ExampleResult:
    retrieved = [s.source for s in ans.sources]
    correct = is_correct(ans.model_answer, row["answer"])
    # What the user gets: the model's text unless withheld as unsure or replaced as a leak.
    shown = not ans.abstained and not ans.leak
    # The model's own text is scored (what the gate compares models on), also when the
    # service would withhold it below the confidence threshold ("abstained").
    scores = {
        **_answer_scores(ans.model_answer, row["answer"]),
        "hit_at_k": hit_at_k(retrieved, row["sources"], k),
        "reciprocal_rank": reciprocal_rank(retrieved, row["sources"]),
        "groundedness": ans.groundedness,
        # correctness of the model's own text, even when it was withheld as unsure
        "correct": float(correct),
        "confidence": ans.confidence,
        "abstained": float(ans.abstained),
        "answered_right": float(shown and correct),
        "wrong_shown": float(shown and not correct),
    }
    return ExampleResult(
        "rag",
        row["id"],
        row["question"],
        row["answer"],
        ans.model_answer,
        scores,
        latency_s,
        ans.completion_tokens,
        [asdict(s) for s in ans.sources],
        list(row["sources"]),
        split=str(row.get("split", "test")),
    )


def _answer_scores(answer: str, reference: str) -> dict[str, float]:
    return {
        "exact_match": exact_match(answer, reference),
        "token_f1": token_f1(answer, reference),
        "rouge_l": rouge_l(answer, reference),
    }


def aggregate(examples: Sequence[ExampleResult]) -> dict[str, float]:
    """Means per kind of example, named like the gate's rules (``rag_token_f1`` ...), and the
    RAG rows' ``SPLIT_SCORES`` per split (``rag_test_answered_right`` ...)."""
    out: dict[str, float] = {"examples": float(len(examples))}
    for kind in ("heldout", "rag"):
        mine = [e for e in examples if e.kind == kind]
        out[f"{kind}_examples"] = float(len(mine))
        if not mine:
            continue
        for key in mine[0].scores:
            if key in _SUMMED:
                continue  # part of heldout_perplexity, computed from the sums
            out[metric_name(kind, key)] = statistics.fmean(e.scores[key] for e in mine)
        if kind == "rag":
            out.update(_per_split(mine))
    latencies = sorted(e.latency_s for e in examples)
    if latencies:
        out["latency_p50_s"] = latencies[len(latencies) // 2]
        out["latency_p95_s"] = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    return out


SPLIT_SCORES = ("answered_right", "wrong_shown")
# Per-example parts of a metric that is a ratio of sums, not a mean of examples.
_SUMMED = ("nll", "answer_tokens")


def metric_name(kind: str, key: str) -> str:
    """The aggregate metric of a per-example score: ``rag_token_f1``, ``retrieval_hit_at_k``."""
    if key == "hit_at_k":
        return "retrieval_hit_at_k"
    if key == "reciprocal_rank":
        return "retrieval_mrr"
    return f"{kind}_{key}"


def paired_scores(
    challenger: ModelEvaluation, champion: ModelEvaluation
) -> dict[str, dict[str, Any]]:
    """Per aggregate metric, both models' per-example scores over the examples they share
    (matched by kind and id, in order): ``{"rows": [[challenger, champion], ...]}``, and for
    ``heldout_perplexity`` ``{"rows": [[nll, tokens, nll, tokens], ...], "exp": True}``. The
    gate resamples these in pairs (``evaluation.gate.MetricRule.paired``)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("heldout", "rag"):
        ours = [e for e in challenger.examples if e.kind == kind]
        theirs = [e for e in champion.examples if e.kind == kind]
        if not ours or [e.example_id for e in ours] != [e.example_id for e in theirs]:
            continue  # not the same examples: no pairs (the gate compares the means)
        keys = [k for k in ours[0].scores if k not in _SUMMED]
        for key in keys:
            if all(key in e.scores for e in ours + theirs):
                out[metric_name(kind, key)] = {
                    "rows": [
                        [a.scores[key], b.scores[key]] for a, b in zip(ours, theirs, strict=True)
                    ]
                }
        if kind == "heldout" and all("nll" in e.scores for e in ours + theirs):
            out["heldout_perplexity"] = {
                "rows": [
                    [
                        a.scores["nll"],
                        a.scores["answer_tokens"],
                        b.scores["nll"],
                        b.scores["answer_tokens"],
                    ]
                    for a, b in zip(ours, theirs, strict=True)
                ],
                "exp": True,
            }
    return out


def _per_split(rag: Sequence[ExampleResult]) -> dict[str, float]:
    """``rag_<split>_<score>`` means of ``SPLIT_SCORES``, named like ``calibration_metrics``."""
    out: dict[str, float] = {}
    for split in sorted({e.split for e in rag if e.split}):
        rows = [e for e in rag if e.split == split]
        for key in SPLIT_SCORES:
            if all(key in e.scores for e in rows):
                out[f"rag_{split}_{key}"] = statistics.fmean(e.scores[key] for e in rows)
    return out


def reliability_png(result: ModelEvaluation, path: Any, split: str = "test") -> Any:
    """The reliability diagram of the RAG answers of ``split`` (None when there are none)."""
    rows = [e for e in result.examples if e.kind == "rag" and e.split == split]
    if not rows:
        return None
    return reliability_diagram(
        [e.scores["confidence"] for e in rows],
        [bool(e.scores["correct"]) for e in rows],
        path,
        title=f"{result.label}: RAG confidence ({split} split)",
    )
