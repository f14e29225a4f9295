"""Retrieval-augmented answers: top-k chunks → a prompt with them → the answer, its sources
and a confidence score.

Confidence (0–1) is the mean of two signals, each in [0, 1]:
- retrieval: how close the best chunk is, ``(top cosine − 0.2) / 0.5`` clipped (with
  all-MiniLM-L6-v2, unrelated text scores about 0.2 and a chunk that answers the question 0.6+);
- groundedness (``support``): the share of the answer's content words found in the retrieved
  chunks. Lexical, so a faithful paraphrase scores lower than a copy: it flags answers that
  bring in words from nowhere. Evaluation reports the same measure.
A low value means "the corpus probably does not say this": show it, do not trust the answer.

Indirect injection: ``prepare`` screens the retrieved chunks with the document screen
(``serving.screening.documents``) before they enter the prompt; a chunk with a sentence that
instructs the model is dropped and counted (``Prompt.screened``). The system prompt carries a
random canary per request; ``leak`` finds the canary (or a long run of the system prompt) in
an answer, which is then replaced by ``LEAK_REFUSAL`` and counted.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from serving.corpus.retrieval import Filters, Hit

SYSTEM_PROMPT = (
    "You answer questions using only the numbered documents you are given. "
    "Answer in one or two short sentences. If the documents do not contain the answer, "
    "say that you do not know."
)
LEAK_REFUSAL = (
    "I can't answer that: the reply repeated the assistant's confidential instructions and was "
    "withheld. Ask about the documents themselves instead."
)
# Texts → one score per text, above ``threshold`` a chunk is dropped (DocumentScreen fits).
ChunkScreen = Any
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "it",
        "its",
        "this",
        "that",
    ]
)


@dataclass(frozen=True)
class Source:
    source: str
    chunk_id: str
    doc_id: str
    title: str
    position: int
    score: float
    pages: list[int] | None = None


@dataclass(frozen=True)
class RagAnswer:
    question: str
    answer: str
    sources: list[Source]
    confidence: float
    retrieval_confidence: float
    groundedness: float
    prompt_tokens: int
    completion_tokens: int
    screened_chunks: int = 0  # retrieved chunks dropped as instructions to the model
    leak: str | None = None  # why the generated answer was withheld, if it was

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_canary() -> str:
    """A random marker for one request's system prompt; seeing it in an answer means a leak."""
    return "rfy-" + secrets.token_hex(6)


def system_prompt(canary: str | None = None) -> str:
    if not canary:
        return SYSTEM_PROMPT
    return f"{SYSTEM_PROMPT} (Reference {canary}; confidential.)"


@dataclass(frozen=True)
class Prompt:
    """The messages for one RAG question and what screening did to the retrieved chunks."""

    messages: list[dict[str, str]]
    hits: list[Hit]  # the chunks that went into the prompt
    screened: int  # chunks dropped by the screen
    canary: str | None
    screened_reasons: list[str] = field(default_factory=list)


def screen_hits(hits: Sequence[Hit], screen: ChunkScreen | None) -> tuple[list[Hit], list[str]]:
    """(chunks kept, why each dropped one was dropped). A chunk whose worst sentence scores
    above the screen's threshold, or that trips its heuristics, instructs the model: it is
    data that tries to be an instruction, so it does not reach the prompt."""
    if screen is None or not hits:
        return list(hits), []
    flags = screen.flags([h.text for h in hits])
    kept = [h for h, f in zip(hits, flags, strict=True) if f is None]
    dropped = [
        f"{h.source}#{h.position}: {f.detail()}" for h, f in zip(hits, flags, strict=True) if f
    ]
    return kept, dropped


def prepare(
    question: str,
    hits: Sequence[Hit],
    *,
    screen: ChunkScreen | None = None,
    canary: str | None = None,
    max_context_chars: int = 2400,
) -> Prompt:
    """Screen the chunks, then build the messages (with the canary in the system prompt)."""
    kept, dropped = screen_hits(hits, screen)
    messages = build_messages(question, kept, max_context_chars, canary=canary)
    return Prompt(messages, kept, len(dropped), canary, dropped)


def leak(answer: str, canary: str | None, prompt: str = SYSTEM_PROMPT, run: int = 10) -> str | None:
    """Why ``answer`` leaks the system prompt: it holds the canary (also spaced out or in
    other case), or ``run`` consecutive words of the prompt; None when it does not."""
    if canary:
        squeezed = re.sub(r"[^a-z0-9]", "", answer.lower())
        if re.sub(r"[^a-z0-9]", "", canary.lower()) in squeezed:
            return "canary"
        if canary.split("-", 1)[-1].lower() in squeezed:
            return "canary"
    words = _WORD.findall(prompt.lower())
    said = " " + " ".join(_WORD.findall(answer.lower())) + " "
    for i in range(0, max(0, len(words) - run + 1)):
        if " " + " ".join(words[i : i + run]) + " " in said:
            return "system_prompt"
    return None


def build_messages(
    question: str,
    hits: Sequence[Hit],
    max_context_chars: int = 2400,
    canary: str | None = None,
) -> list[dict[str, str]]:
    """A system instruction and one user turn holding the numbered chunks and the question."""
    blocks, used = [], 0
    for i, hit in enumerate(hits, start=1):
        text = hit.text.strip()
        if used + len(text) > max_context_chars:
            text = text[: max(0, max_context_chars - used)]
        if not text:
            break
        blocks.append(f"[{i}] ({hit.title}) {text}")
        used += len(text)
    context = "\n\n".join(blocks) if blocks else "(no documents found)"
    return [
        {"role": "system", "content": system_prompt(canary)},
        {"role": "user", "content": f"Documents:\n{context}\n\nQuestion: {question}"},
    ]


def _content(text: str) -> set[str]:
    return {
        w
        for w in _WORD.findall(text.lower().translate(str.maketrans("", "", string.punctuation)))
        if w not in _STOP and len(w) > 1
    }


def support(answer: str, contexts: Sequence[str]) -> float:
    """Share of the answer's content words that appear in the contexts (1.0: all of them; an
    answer with no content word, like "Yes.", counts as supported)."""
    words = _content(answer)
    if not words:
        return 1.0
    context = set().union(*(_content(c) for c in contexts)) if contexts else set()
    return len(words & context) / len(words)


def retrieval_confidence(hits: Sequence[Hit]) -> float:
    if not hits:
        return 0.0
    return min(1.0, max(0.0, (hits[0].score - 0.2) / 0.5))


def to_sources(hits: Sequence[Hit]) -> list[Source]:
    return [
        Source(
            h.source,
            h.chunk_id,
            h.doc_id,
            h.title,
            h.position,
            round(h.score, 4),
            h.meta.get("pages"),
        )
        for h in hits
    ]


def answer_batch(
    questions: Sequence[str],
    retriever: Any,
    generator: Any,
    *,
    k: int = 3,
    filters: Filters | None = None,
    max_new_tokens: int = 64,
    screen: ChunkScreen | str | None = "default",
    new_canary: Callable[[], str] | None = new_canary,
) -> list[RagAnswer]:
    """Answer several questions in one padded generation batch (chunks screened, answers
    checked for leaks, as the service does)."""
    if isinstance(screen, str):
        if screen != "default":
            raise ValueError(f"screen must be a DocumentScreen, None or 'default', not {screen!r}")
        from serving.screening.documents import document_screen

        screen = document_screen()
    hit_lists = [retriever.search(q, k=k, filters=filters) for q in questions]
    prompts = [
        prepare(q, hits, screen=screen, canary=new_canary() if new_canary else None)
        for q, hits in zip(questions, hit_lists, strict=True)
    ]
    completions = generator.generate([p.messages for p in prompts], max_new_tokens=max_new_tokens)
    return [
        make_answer(
            q,
            p.hits,
            c.text,
            c.prompt_tokens,
            c.completion_tokens,
            screened=p.screened,
            canary=p.canary,
        )
        for q, p, c in zip(questions, prompts, completions, strict=True)
    ]


def make_answer(
    question: str,
    hits: Sequence[Hit],
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    screened: int = 0,
    canary: str | None = None,
) -> RagAnswer:
    """The answer with its sources and confidence (see the module docstring); an answer that
    leaks the system prompt is replaced by ``LEAK_REFUSAL`` (``leak`` says why)."""
    leaked = leak(text, canary)
    if leaked:
        text = LEAK_REFUSAL
    grounded = support(text, [h.text for h in hits])
    r_conf = retrieval_confidence(hits)
    return RagAnswer(
        question=question,
        answer=text,
        sources=to_sources(hits),
        confidence=round((r_conf + grounded) / 2, 4),
        retrieval_confidence=round(r_conf, 4),
        groundedness=round(grounded, 4),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        screened_chunks=screened,
        leak=leaked,
    )
