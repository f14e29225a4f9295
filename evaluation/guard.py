"""Measuring the injection screens on a labelled split: recall (injections blocked) and
false-positive rate (benign text blocked), for the heuristics alone, the learned scorer alone,
and both (what the service and ingestion run).

``python -m evaluation.guard --split tune`` prints both screens' figures; the reported ones
(``python -m benchmarks guard``) are on test, which training never reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refinery.safety.guard import DOCUMENT_MODEL, InjectionGuard, heuristic_reasons
from refinery.safety.screening import GUARD_DIR, load_labeled
from refinery.safety.screening.documents import DocumentScreen
from refinery.safety.screening.heuristics import document_reasons
from refinery.safety.screening.linear import rates
from refinery.safety.splits import document_split


def _summary(
    texts: Sequence[str], y: np.ndarray, heur: np.ndarray, learned: np.ndarray
) -> dict[str, Any]:
    both = heur | learned
    return {
        "injections": int(y.sum()),
        "benign": int((~y).sum()),
        "heuristics": rates(heur, y),
        "classifier": rates(learned, y),
        "both": rates(both, y),
        "missed": [t for t, p, t_y in zip(texts, both, y, strict=True) if t_y and not p],
        "false_positives": [t for t, p, t_y in zip(texts, both, y, strict=True) if p and not t_y],
    }


def measure(guard: InjectionGuard, path: Path) -> dict[str, Any]:
    """Recall (injections blocked) and false-positive rate (benign blocked) on a labelled file:
    heuristics alone, the classifier alone, and both (what the service runs)."""
    texts, y = load_labeled(path)
    heur = np.asarray([bool(heuristic_reasons(t)) for t in texts])
    learned = guard.scores(texts) > guard.threshold
    return {"file": str(path), **_summary(texts, y, heur, learned)}


def measure_documents(screen: DocumentScreen, split: str = "test") -> dict[str, Any]:
    """The document screen on one split: labelled passages plus sample-corpus passages."""
    texts, y, real = document_split(split)
    heur = np.asarray([bool(document_reasons(t)) for t in texts])
    learned = screen.scores(texts) > screen.threshold
    out = {"split": split, "sample_corpus_passages": real, **_summary(texts, y, heur, learned)}
    out["sample_corpus_flagged"] = int((heur | learned)[len(texts) - real :].sum())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from refinery.retrieval.embedding import Embedder

    parser = argparse.ArgumentParser(
        prog="python -m evaluation.guard", description="Measure both injection screens."
    )
    parser.add_argument("--split", default="tune", help="train, tune or test")
    args = parser.parse_args(argv)
    guard = InjectionGuard(Embedder().encode)
    report = {
        "prompts": measure(guard, GUARD_DIR / "prompts" / f"{args.split}.jsonl"),
        "documents": measure_documents(DocumentScreen.load(DOCUMENT_MODEL), args.split),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
