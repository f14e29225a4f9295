"""Evaluation examples scored as ``evaluation.automatic`` scores them, without a model."""

from __future__ import annotations

from types import SimpleNamespace

from evaluation.automatic import ExampleResult, _answer_scores, _rag_example
from refinery.rag.answer import Source


def scored_examples() -> list[ExampleResult]:
    """Scored as ``evaluation.automatic`` scores them: held-out answers and RAG answers."""
    heldout = [
        ("h1", "How long does a worker develop?", "21 days", "21 days"),
        ("h2", "What do drones do?", "they mate with queens", "drones mate with a queen"),
        ("h3", "What is propolis?", "tree resin", "bee glue"),
    ]
    out = [
        ExampleResult("heldout", i, q, ref, ans, _answer_scores(ans, ref), 0.1, 4)
        for i, q, ref, ans in heldout
    ]
    rag = [
        ("r1", "When does a queen mate?", "in her first week", ["queen.md"], ["queen.md", "x.md"]),
        ("r2", "How many eggs a day?", "up to 2000 eggs", ["eggs.md"], ["x.md", "eggs.md"]),
        ("r3", "What is varroa?", "a parasitic mite", ["varroa.md"], ["x.md", "y.md"]),
    ]
    answers = ["in her first week", "about 200 eggs", "I don't know"]
    for (i, q, ref, gold, retrieved), text in zip(rag, answers, strict=True):
        ans = SimpleNamespace(
            model_answer=text,
            sources=[Source(s, f"{s}#0", s, s, 0, 0.5) for s in retrieved],
            groundedness=0.7,
            confidence=0.4 if text != "I don't know" else 0.1,
            abstained=text == "I don't know",
            leak=False,
            completion_tokens=5,
        )
        row = {"id": i, "question": q, "answer": ref, "sources": gold, "split": "test"}
        out.append(_rag_example(row, ans, 2, 0.2))
    return out
