"""Evaluation sets: the RAG question set shipped in the repo, validated like the SFT set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from refinery.core.jsonl import json_objects
from refinery.core.settings import REPO_ROOT

DEFAULT_RAG_QUESTIONS = REPO_ROOT / "data" / "eval" / "rag_questions.jsonl"
# The second set: questions over SQLite's documentation (scripts/sqlite-docs.sh fetches it).
SQLITE_QUESTIONS = REPO_ROOT / "data" / "eval" / "sqlite" / "questions.jsonl"
SQLITE_CORPUS = REPO_ROOT / "data" / "external" / "sqlite-docs"


class EvaluationDataError(ValueError):
    pass


def load_rag_questions(
    path: Path = DEFAULT_RAG_QUESTIONS,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Rows {id, question, answer, sources: [file, ...], split}; bad rows dropped and counted.

    ``split`` is "tune" (used to choose retrieval settings and fit the confidence model) or
    "test" (reported, never tuned on); fixed in the file. Rows without one count as "test".
    """
    if not path.exists():
        raise EvaluationDataError(f"RAG question set {path} does not exist")
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    for row in json_objects(path.read_text(encoding="utf-8").splitlines(), dropped):
        q, a, s = row.get("question"), row.get("answer"), row.get("sources")
        if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
            dropped["missing_question_or_answer"] += 1
            continue
        if not (isinstance(s, list) and s and all(isinstance(x, str) for x in s)):
            dropped["missing_sources"] += 1
            continue
        key = q.strip().lower()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        rows.append(
            {
                "id": str(row.get("id") or f"rag-{len(rows)}"),
                "question": q.strip(),
                "answer": a.strip(),
                "sources": s,
                "split": "tune" if row.get("split") == "tune" else "test",
            }
        )
    return rows, dropped
