"""RAG confidence: fit the calibrated model on the tune split, report it on the test split,
against the earlier lexical confidence, in the same run.

Answers: SmolLM2-135M-Instruct fine-tuned as the pipeline does by default (LoRA on RAG-format
rows, see benchmarks/answers.py), answering both question sets
(beekeeping and sqlite, see benchmarks/retrieval.py) from the top 3 hybrid hits over the
default index, greedy, at most 48 new tokens, with per-token log-probabilities. Each answer
is labelled correct or not by ``evaluation.calibration.is_correct`` against the reference.
The fit (logistic regression on ``refinery.rag.confidence.signals``, with and without the log-probability
signals) and the threshold (the lowest confidence at which at most 25% of the kept tune
answers are wrong) use tune rows only and are written to data/rag/confidence.json.
Reported on test rows: AUROC (right against wrong answers), expected calibration error (10 bins), and the share of wrong answers
that get through at the threshold, against the lexical confidence at 0.5 and at the threshold
that answers as many questions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.answers import STEPS, fine_tune, searcher
from benchmarks.common import RESULTS, WORK, write_table
from benchmarks.retrieval import DEFAULT_CHUNKING, QuestionSet, index, index_home, question_sets
from evaluation.calibration import (
    BASE_FEATURES,
    auroc,
    expected_calibration_error,
    fit_calibration,
    is_correct,
    reliability_diagram,
    wrong_above,
)
from refinery.rag.confidence import CONFIDENCE_FILE, lexical_confidence, signals
from refinery.rag.prompt import build_messages
from refinery.retrieval.embedding import Embedder
from refinery.retrieval.search import Mode, search

K = 3
MAX_NEW_TOKENS = 48
BATCH = 8
MAX_WRONG = 0.25


def answers(qs: QuestionSet, engine: Any, space: Any, generator: Any) -> list[dict[str, Any]]:
    assert qs.vectors is not None
    out: list[dict[str, Any]] = []
    for start in range(0, len(qs.rows), BATCH):
        batch = list(range(start, min(start + BATCH, len(qs.rows))))
        hit_lists = [
            search(engine, space, qs.vectors[i], qs.rows[i]["question"], K, mode=Mode.HYBRID)
            for i in batch
        ]
        prompts = [
            build_messages(qs.rows[i]["question"], hits)
            for i, hits in zip(batch, hit_lists, strict=True)
        ]
        completions = generator.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, logprobs=True)
        for i, hits, c in zip(batch, hit_lists, completions, strict=True):
            row = qs.rows[i]
            out.append(
                {
                    "set": qs.name,
                    "id": row["id"],
                    "split": row["split"],
                    "question": row["question"],
                    "reference": row["answer"],
                    "answer": c.text,
                    "correct": is_correct(c.text, row["answer"]),
                    "signals": signals(row["question"], hits, c.text, c.token_logprobs),
                    "lexical": lexical_confidence(hits, c.text),
                }
            )
    return out


def generate_answers(base_dir: str, generator_class: Any) -> tuple[list[dict[str, Any]], float]:
    """Both question sets answered by the RAG fine-tune, with signals; and the seconds it took."""
    embedder = Embedder()
    sets = question_sets(embedder)
    rows: list[dict[str, Any]] = []
    with index_home() as server:
        # The model the pipeline trains by default (benchmarks/answers.py: same rows, schedule
        # and seed), whose answers the served confidence has to judge.
        with index(server, sets[0], DEFAULT_CHUNKING, embedder) as (engine, space, _n):
            generator = generator_class(
                fine_tune("rag", searcher(engine, space, embedder), base_dir)
            )
        t0 = time.perf_counter()
        for qs in sets:
            with index(server, qs, DEFAULT_CHUNKING, embedder) as (engine, space, _n):
                rows += answers(qs, engine, space, generator)
    seconds = time.perf_counter() - t0
    return rows, seconds


def main(reuse_answers: bool = False) -> None:
    """``reuse_answers`` (``python -m benchmarks.confidence --reuse-answers``): fit and report
    on the answers the last run stored (``.work/confidence_answers.json``) instead of
    generating them again (5 minutes); the fit is deterministic, so the result is the same."""
    from refinery.generation.generator import Generator
    from training.base_model import resolve_base_model

    cache = WORK / "confidence_answers.json"
    info = resolve_base_model(None, WORK / "models")
    if reuse_answers and cache.exists():
        rows: list[dict[str, Any]] = json.loads(cache.read_text())
        seconds = float("nan")
    else:
        rows, seconds = generate_answers(info.path, Generator)

    tune = [r for r in rows if r["split"] == "tune"]
    test = [r for r in rows if r["split"] == "test"]
    calibration = fit_calibration(
        [r["signals"] for r in tune],
        [r["correct"] for r in tune],
        max_wrong=MAX_WRONG,
        meta={
            "fitted_on": "tune split of data/eval/rag_questions.jsonl and data/eval/sqlite/questions.jsonl",
            "answers_by": f"{info.name}, LoRA on RAG-format rows ({STEPS} steps; benchmarks/answers.py)",
            "rows": len(tune),
            "correct": sum(r["correct"] for r in tune),
            "features_without_logprobs": list(BASE_FEATURES),
            "made_by": "python -m benchmarks confidence",
        },
    )
    CONFIDENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    CONFIDENCE_FILE.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    labels = [r["correct"] for r in test]
    new = [calibration.confidence(r["signals"]) for r in test]
    no_lp = [calibration.without_logprobs.predict(r["signals"]) for r in test]
    old = [r["lexical"] for r in test]
    new_gate = wrong_above(new, labels, calibration.threshold)
    # The lexical score at the threshold that answers as many test questions as the new one.
    answered = round(new_gate["answered"] * len(test))
    same_coverage = sorted(old, reverse=True)[answered - 1] if answered else 1.01
    table: list[list[Any]] = []

    def line(name: str, probs: list[float], threshold: float) -> None:
        g = wrong_above(probs, labels, threshold)
        table.append(
            [
                name, f"{auroc(probs, labels):.3f}", f"{expected_calibration_error(probs, labels):.3f}", f"{threshold:.3f}",
                f"{g['answered']:.2f}", f"{g['wrong_share_of_answered']:.2f}",
                f"{g['wrong_let_through']:.2f}",
            ]
        )  # fmt: skip

    line("calibrated, with token log-probabilities (new default)", new, calibration.threshold)
    line("calibrated, without log-probabilities (/rag today)", no_lp, calibration.threshold)
    line("lexical confidence (before), at 0.5", old, 0.5)
    line("lexical confidence (before), same share answered", old, same_coverage)
    png = reliability_diagram(
        new,
        labels,
        RESULTS / "confidence_reliability.png",
        title="RAG confidence, test split",
        baseline=("lexical (before)", old),
    )
    cache.write_text(json.dumps(rows, indent=2, default=float))
    accuracy = sum(labels) / len(labels)
    write_table(
        "confidence",
        "RAG confidence: calibration on the test split",
        __doc__ or "",
        [
            "confidence",
            "AUROC",
            "ECE",
            "threshold",
            "share answered",
            "wrong among answered",
            "wrong answers let through",
        ],
        table,
        notes=f"Test split: {len(test)} answers, {accuracy:.0%} correct; tune split: {len(tune)} "
        f"answers, {sum(r['correct'] for r in tune)} correct. Answering both sets took {seconds:.0f} s "
        "(nan: answers reused). "
        f"Reliability diagram: {Path(png).name}. Coefficients: data/rag/confidence.json "
        f"(threshold {calibration.threshold}). Targets: AUROC >= 0.8, ECE <= 0.1.",
    )


if __name__ == "__main__":
    main(reuse_answers="--reuse-answers" in sys.argv[1:])
