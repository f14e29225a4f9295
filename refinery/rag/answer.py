"""Retrieval-augmented answers: top-k chunks → a prompt with them (``refinery.rag.prompt``) →
the answer, its sources and a calibrated confidence (``refinery.rag.confidence``).

An answer that leaks the system prompt is replaced by ``LEAK_REFUSAL`` (``kind`` "refused").
One whose confidence is below the threshold (``min_confidence``, default the one stored with
the calibration) is withheld; in its place the reader gets the evidence: the retrieved
sentence that best supports an answer, quoted with its source (``refinery.rag.evidence``;
``kind`` "quote"), or, when no passage supports one, a "not in the documents" that names the
closest sources (``kind`` "none"). The calibration is a parameter: callers load it once
(``load_calibration``) and pass it; without one, the lexical score is reported and nothing is
withheld.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from refinery.rag.confidence import Calibration, confidence, retrieval_confidence, signals
from refinery.rag.evidence import Quote, best_quote
from refinery.rag.prompt import LEAK_REFUSAL, ChunkScreen, leak, new_canary, prepare

if TYPE_CHECKING:
    from refinery.retrieval.search import Filters, Hit


@dataclass(frozen=True)
class Source:
    source: str
    chunk_id: str
    doc_id: str
    title: str
    position: int
    score: float
    pages: list[int] | None = None


# What ``RagAnswer.answer`` shows: the model's answer; a quote of the retrieved passage that
# best supports one (the model's answer withheld below the threshold); "not in the documents"
# (withheld, and no passage supports an answer); the refusal of an answer that leaked.
Kind = Literal["answer", "quote", "none", "refused"]


@dataclass(frozen=True)
class RagAnswer:
    question: str
    answer: str  # what to show (``kind`` says which): the model's answer, a quote, a "don't know"
    sources: list[Source]
    confidence: float  # calibrated probability that the model's answer is correct
    retrieval_confidence: float
    groundedness: float
    prompt_tokens: int
    completion_tokens: int
    screened_chunks: int = 0  # retrieved chunks dropped as instructions to the model
    leak: str | None = None  # why the generated answer was withheld as a leak, if it was
    abstained: bool = False  # the model's answer was withheld: confidence below the threshold
    kind: Kind = "answer"
    quote: Quote | None = None  # the passage quoted when ``kind`` is "quote"
    signals: dict[str, float] = field(default_factory=dict)
    # The model's own text, kept even when withheld (evaluation labels it); not in to_dict.
    model_answer: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model_answer")
        return out


def not_in_documents(hits: Sequence[Hit]) -> str:
    """What a withheld answer says when no retrieved passage supports one."""
    if not hits:
        return "I don't know: no document matched the question."
    names = list(dict.fromkeys(h.source for h in hits))
    return (
        "I don't know: the answer is not in the documents I found "
        f"(the closest: {', '.join(names)})."
    )


def quoted(quote: Quote, hits: Sequence[Hit]) -> str:
    """A quote labelled as one, with its title and its number among the sources:
    ``From "Queen mating flight" [2]: "A virgin queen …"``."""
    number = next(i for i, h in enumerate(hits, 1) if h.chunk_id == quote.chunk_id)
    return f'From "{quote.title}" [{number}]: "{quote.text}"'


def evidence(hits: Sequence[Hit], quote: Quote | None) -> tuple[Kind, Quote | None, str]:
    """What stands in for a withheld answer, from the passage that best supports an answer
    (``best_quote``, None where none does): (kind, the quote or None, the text shown)."""
    if quote is None:
        return "none", None, not_in_documents(hits)
    return "quote", quote, quoted(quote, hits)


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


def supports_logprobs(generator: Any) -> bool:
    """Whether ``generator.generate`` takes ``logprobs`` (models registered before it did not)."""
    import inspect

    try:
        return "logprobs" in inspect.signature(generator.generate).parameters
    except (TypeError, ValueError):
        return False


def _chunk_screen(screen: ChunkScreen | str | None) -> ChunkScreen | None:
    if not isinstance(screen, str):
        return screen
    if screen != "default":
        raise ValueError(f"screen must be a DocumentScreen, None or 'default', not {screen!r}")
    from refinery.safety.screening.documents import document_screen

    return document_screen()


def answer_batch(
    questions: Sequence[str],
    retriever: Any,
    generator: Any,
    *,
    k: int = 3,
    filters: Filters | None = None,
    max_new_tokens: int = 64,
    calibration: Calibration | None = None,
    min_confidence: float | None = None,
    screen: ChunkScreen | str | None = "default",
    new_canary: Callable[[], str] | None = new_canary,
) -> list[RagAnswer]:
    """Answer several questions in one generation batch, as the service does: chunks
    screened, a canary in each system prompt, answers checked for leaks and calibrated."""
    screen = _chunk_screen(screen)
    hit_lists = [retriever.search(q, k=k, filters=filters) for q in questions]
    prompts = [
        prepare(q, hits, screen=screen, canary=new_canary() if new_canary else None)
        for q, hits in zip(questions, hit_lists, strict=True)
    ]
    kwargs = {"logprobs": True} if supports_logprobs(generator) else {}
    completions = generator.generate(
        [p.messages for p in prompts], max_new_tokens=max_new_tokens, **kwargs
    )
    return [
        make_answer(
            q,
            p.hits,
            c.text,
            c.prompt_tokens,
            c.completion_tokens,
            token_logprobs=getattr(c, "token_logprobs", None),
            calibration=calibration,
            min_confidence=min_confidence,
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
    token_logprobs: Sequence[float] | None = None,
    calibration: Calibration | None = None,
    min_confidence: float | None = None,
    screened: int = 0,
    canary: str | None = None,
) -> RagAnswer:
    """The answer with its sources and confidence; an answer that leaks the system prompt is
    replaced by ``LEAK_REFUSAL`` (``leak`` says why); below the threshold (``min_confidence``,
    else the calibration's; see ``refinery.rag.confidence.confidence``) it is withheld and the
    best-supported passage is quoted instead, or "not in the documents" said (``evidence``)."""
    leaked = leak(text, canary)
    best = best_quote(question, hits)
    values = signals(question, hits, text, token_logprobs, quote=best)
    score, limit = confidence(values, hits, text, calibration, min_confidence)
    abstain = score < limit and not leaked
    kind: Kind = "refused" if leaked else "answer"
    quote, shown = None, LEAK_REFUSAL if leaked else text
    if abstain:
        kind, quote, shown = evidence(hits, best)
    return RagAnswer(
        question=question,
        answer=shown,
        sources=to_sources(hits),
        confidence=round(score, 4),
        retrieval_confidence=round(retrieval_confidence(hits), 4),
        groundedness=round(values["support"], 4),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        screened_chunks=screened,
        leak=leaked,
        abstained=abstain,
        kind=kind,
        quote=quote,
        signals={k: round(v, 4) for k, v in values.items()},
        model_answer=text,
    )
