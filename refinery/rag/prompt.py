"""The prompt of one RAG question, and the checks around it against indirect injection.

``prepare`` screens the retrieved chunks with a document screen
(``refinery.safety.screening.documents``) before they enter the prompt: a chunk with a
sentence that instructs the model is dropped and counted (``Prompt.screened``). The system
prompt carries a random canary per request; ``leak`` finds the canary (or a long run of the
system prompt) in an answer, which is then replaced by ``LEAK_REFUSAL``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from refinery.rag.text import words

if TYPE_CHECKING:
    from refinery.retrieval.search import Hit

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
    prompt_words = words(prompt)
    said = " " + " ".join(words(answer)) + " "
    for i in range(0, max(0, len(prompt_words) - run + 1)):
        if " " + " ".join(prompt_words[i : i + run]) + " " in said:
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
