"""Fine-tuning rows for the task the service runs: answering from retrieved chunks.

``/rag`` shows the model a system prompt and numbered chunks, then the question
(``refinery.rag.prompt``). A model fine-tuned on closed-book question → answer pairs never sees
that prompt, so each question-answer row is turned into that prompt here, with the chunks the
retriever actually returns for the question:

- an **answer** row keeps the chunk that holds the answer (the source document's chunk that
  best matches the reference answer, put in the context when the retriever missed it) among
  the retrieved distractors, and its target is the answer's first sentence: short, with the
  numbers and names as the document gives them;
- a **no-answer** row (``no_answer_fraction`` of the rows, chosen with the seed) has every
  chunk of the source document removed, and its target says that the documents do not
  answer (``NO_ANSWER``).

Rows whose question is close to an evaluation question are dropped (``held_out``), so the
questions the gate scores are never trained on. Everything is deterministic for a given seed,
corpus and retriever: the same chunks give the same rows and the same content hash.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from refinery.rag.prompt import build_messages
from refinery.rag.text import content_words

if TYPE_CHECKING:
    from refinery.retrieval.search import Filters, Hit

NO_ANSWER = "The documents do not answer this question."
# (question, k, filters) -> hits, best first: ``Retriever.search`` of the served index.
Search = Callable[[str, int, "Filters | None"], list["Hit"]]


@dataclass(frozen=True)
class RagSFTConfig:
    k: int = 3  # chunks in each prompt: what /rag retrieves by default
    no_answer_fraction: float = 0.2
    max_context_chars: int = 2400  # as refinery.rag.prompt.build_messages
    held_out_overlap: float = 0.6  # question content-word overlap that counts as the same question
    seed: int = 42

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if not 0.0 <= self.no_answer_fraction < 1.0:
            raise ValueError(f"no_answer_fraction must be in [0, 1), got {self.no_answer_fraction}")


def first_sentence(text: str) -> str:
    """The answer's first sentence (the whole text when it has one)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9])", text.strip(), maxsplit=1)
    return parts[0].strip()


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, min(len(a), len(b)))


def is_held_out(question: str, held_out: Sequence[set[str]], limit: float) -> bool:
    """Whether ``question`` shares ``limit`` of its content words (or of an evaluation
    question's, whichever is shorter) with any evaluation question."""
    mine = set(content_words(question))
    return bool(mine) and any(_overlap(mine, other) >= limit for other in held_out if other)


def _canary(rng: random.Random) -> str:
    """A canary like the service's (``refinery.rag.prompt.new_canary``), drawn from the seed."""
    return "rfy-" + rng.getrandbits(48).to_bytes(6, "big").hex()


def _answer_row(
    row: dict[str, Any], hits: list[Hit], search: Search, config: RagSFTConfig
) -> list[Hit] | None:
    """The context of an answer row: the retrieved chunks with the answering chunk among the
    first ``k`` (None when the source document has no chunk in the index)."""
    from refinery.retrieval.search import Filters

    source = str(row.get("source") or "")
    context = hits[: config.k]
    if not source:
        return context if context else None
    if any(h.source == source for h in context):
        return context
    answering = search(row["response"], 1, Filters(sources=(source,)))
    if not answering:
        return None
    return [*context[: config.k - 1], answering[0]]


def rag_rows(
    rows: Sequence[dict[str, Any]],
    search: Search,
    config: RagSFTConfig,
    held_out_questions: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """(RAG-format rows, rows dropped by reason). Each row keeps its ``id``, ``source`` and
    ``instruction`` (the question) for lineage, and gains ``prompt`` (system and user turns,
    as served), ``response`` (the target) and ``kind`` ("answer" or "no_answer")."""
    rng = random.Random(config.seed)
    held_out = [set(content_words(q)) for q in held_out_questions]
    dropped: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    for row in rows:
        question = row["instruction"]
        if is_held_out(question, held_out, config.held_out_overlap):
            dropped["close_to_an_evaluation_question"] += 1
            continue
        no_answer = rng.random() < config.no_answer_fraction
        canary = _canary(rng)
        hits = search(question, config.k + 4, None)
        if no_answer:
            source = row.get("source")
            context = [h for h in hits if h.source != source][: config.k]
            target = NO_ANSWER
        else:
            context = _answer_row(row, hits, search, config) or []
            target = first_sentence(row["response"])
        if not context or not target:
            dropped["no_chunk_for_the_source"] += 1
            continue
        prompt = build_messages(question, context, config.max_context_chars, canary=canary)
        out.append(
            {
                **row,
                "prompt": prompt,
                "response": target,
                "kind": "no_answer" if no_answer else "answer",
                "chunk_ids": [h.chunk_id for h in context],
            }
        )
    return out, dropped
