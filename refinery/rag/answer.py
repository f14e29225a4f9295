"""Retrieval-augmented answers: top-k chunks → a prompt with them → the answer, its sources
and a calibrated confidence; below a threshold the answer says it does not know.

Confidence (0–1) is the probability that the answer is correct, from a small logistic model
(``ConfidenceModel``, coefficients in ``data/rag/confidence.json``, fitted and checked on
labelled answers by ``benchmarks/confidence.py``) over signals of the answer (``signals``):
- retrieval: the best chunk's cosine, its margin over the next, whether the best chunk was
  found by both vector and text search, the share of the question's words the chunks contain;
- the answer against its chunks: the share of its content words found there (``support``,
  "groundedness") and of its numbers and names (``fact_support``); whether it says it does
  not know;
- the model's own token log-probabilities on the answer (mean, minimum), when the generator
  returned them (a second set of coefficients is used when it did not).
An answer whose confidence is below the threshold (``REFINERY_RAG_MIN_CONFIDENCE``, default
the one stored with the coefficients) is replaced by a "don't know" that lists its sources.
``lexical_confidence`` is the earlier score (mean of retrieval closeness and support), kept
for comparison.

Indirect injection: ``prepare`` screens the retrieved chunks with the document screen
(``refinery.safety.screening.documents``) before they enter the prompt; a chunk with a sentence that
instructs the model is dropped and counted (``Prompt.screened``). The system prompt carries a
random canary per request; ``leak`` finds the canary (or a long run of the system prompt) in
an answer, which is then replaced by ``LEAK_REFUSAL`` and counted.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from refinery.retrieval.search import Filters, Hit

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
    answer: str  # what to show: the model's answer, or a "don't know" below the threshold
    sources: list[Source]
    confidence: float  # calibrated probability that the model's answer is correct
    retrieval_confidence: float
    groundedness: float
    prompt_tokens: int
    completion_tokens: int
    screened_chunks: int = 0  # retrieved chunks dropped as instructions to the model
    leak: str | None = None  # why the generated answer was withheld as a leak, if it was
    abstained: bool = False  # the model's answer was withheld: confidence below the threshold
    signals: dict[str, float] = field(default_factory=dict)
    # The model's own text, kept even when withheld (evaluation labels it); not in to_dict.
    model_answer: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model_answer")
        return out


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


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3})")
_TOKEN = re.compile(r"\d+(?:\.\d+)*|[a-z0-9_]+")
_NAME = re.compile(
    r"\b(?:[A-Z][A-Za-z0-9]*[A-Z0-9_][A-Za-z0-9_]*|[a-z]+_[a-z0-9_]+|[A-Z][a-z]{2,})\b"
)
_SENTENCE_START = re.compile(r"(?:^|[.!?:]\s+|\n)([A-Z][a-z]+)")
_UNKNOWN = re.compile(
    r"\b(?:i do not know|i don'?t know|not (?:mentioned|stated|specified|provided|contain)|"
    r"do(?:es)? not (?:say|mention|contain|specify|provide)|no information|cannot (?:find|answer))\b",
    re.IGNORECASE,
)


def facts(text: str) -> set[str]:
    """Numbers and names in ``text``: digits, CamelCase/ALLCAPS/snake_case identifiers and
    capitalized words that do not start a sentence (lower-cased)."""
    starts = {m.group(1) for m in _SENTENCE_START.finditer(text)}
    found = {_THOUSANDS.sub("", n).rstrip(".,") for n in _NUMBER.findall(text)}
    found |= {w.lower() for w in _NAME.findall(text) if w not in starts}
    return found


def fact_support(answer: str, contexts: Sequence[str]) -> float:
    """Share of the answer's numbers and names that appear in the contexts (1.0: none to
    check). A wrong number or an invented name is what a small model gets wrong most."""
    wanted = facts(answer)
    if not wanted:
        return 1.0
    text = _THOUSANDS.sub("", " ".join(contexts).lower())
    tokens = set(_TOKEN.findall(text))  # whole words and numbers: "16" is not found in "160"
    return sum(1 for f in wanted if f in tokens) / len(wanted)


def says_unknown(answer: str) -> bool:
    return bool(_UNKNOWN.search(answer)) or not answer.strip()


def signals(
    question: str,
    hits: Sequence[Hit],
    answer: str,
    token_logprobs: Sequence[float] | None = None,
) -> dict[str, float]:
    """The confidence model's inputs (see the module docstring); logprob signals only when
    ``token_logprobs`` is given."""
    cosines = sorted((h.score for h in hits), reverse=True)
    contexts = [h.text for h in hits]
    q_words = _content(question)
    chunk_words = set().union(*(_content(c) for c in contexts)) if contexts else set()
    out = {
        "top_cosine": cosines[0] if cosines else 0.0,
        "cosine_margin": cosines[0] - cosines[1] if len(cosines) > 1 else 0.0,
        "both_lists": float(
            bool(hits) and hits[0].vector_rank is not None and hits[0].text_rank is not None
        ),
        "question_coverage": len(q_words & chunk_words) / len(q_words) if q_words else 0.0,
        "support": support(answer, contexts),
        "fact_support": fact_support(answer, contexts),
        "says_unknown": float(says_unknown(answer)),
    }
    if token_logprobs is not None:
        values = list(token_logprobs) or [-10.0]
        out["mean_logprob"] = sum(values) / len(values)
        out["min_logprob"] = max(-20.0, min(values))
    return out


@dataclass(frozen=True)
class ConfidenceModel:
    """Logistic regression over standardized signals: P(correct) = sigmoid(b + w·(x-m)/s)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    def predict(self, values: Mapping[str, float]) -> float:
        z = self.intercept
        for name, m, sd, w in zip(self.features, self.mean, self.scale, self.coef, strict=True):
            z += w * (float(values[name]) - m) / sd
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfidenceModel:
        model = cls(
            tuple(data["features"]),
            tuple(float(x) for x in data["mean"]),
            tuple(float(x) for x in data["scale"]),
            tuple(float(x) for x in data["coef"]),
            float(data["intercept"]),
        )
        n = len(model.features)
        if not (len(model.mean) == len(model.scale) == len(model.coef) == n):
            raise ValueError("confidence model: features, mean, scale and coef differ in length")
        if any(sd <= 0 for sd in model.scale):
            raise ValueError("confidence model: scale must be positive")
        return model


# Beside the guard's exemplars (data/), staged into the Bento with them.
CONFIDENCE_FILE = Path(__file__).resolve().parents[2] / "data" / "rag" / "confidence.json"


@dataclass(frozen=True)
class Calibration:
    """The fitted confidence models (with and without token log-probabilities) and the
    threshold below which an answer is withheld."""

    with_logprobs: ConfidenceModel | None
    without_logprobs: ConfidenceModel
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)

    def confidence(self, values: Mapping[str, float]) -> float:
        model = self.with_logprobs
        if model is None or any(f not in values for f in model.features):
            model = self.without_logprobs
        return model.predict(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "with_logprobs": self.with_logprobs.to_dict() if self.with_logprobs else None,
            "without_logprobs": self.without_logprobs.to_dict(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(
            ConfidenceModel.from_dict(data["with_logprobs"]) if data.get("with_logprobs") else None,
            ConfidenceModel.from_dict(data["without_logprobs"]),
            float(data["threshold"]),
            dict(data.get("meta", {})),
        )


@lru_cache(maxsize=4)
def load_calibration(path: Path = CONFIDENCE_FILE) -> Calibration:
    """The stored calibration (JSON: coefficients, never a pickle)."""
    return Calibration.from_dict(json.loads(Path(path).read_text()))


def min_confidence(calibration: Calibration) -> float:
    """The threshold: REFINERY_RAG_MIN_CONFIDENCE if set (0 turns withholding off)."""
    raw = os.environ.get("REFINERY_RAG_MIN_CONFIDENCE", "").strip()
    if not raw:
        return calibration.threshold
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"REFINERY_RAG_MIN_CONFIDENCE must be a number, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"REFINERY_RAG_MIN_CONFIDENCE must be in [0, 1], got {value}")
    return value


def dont_know(hits: Sequence[Hit], confidence: float) -> str:
    """What an answer below the threshold says instead of a guess."""
    if not hits:
        return "I don't know: no document matched the question."
    names = list(dict.fromkeys(h.source for h in hits))
    return (
        f"I don't know: the documents I found do not answer this with enough confidence "
        f"({confidence:.2f}). The closest sources: {', '.join(names)}."
    )


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


def lexical_confidence(hits: Sequence[Hit], answer: str) -> float:
    """The earlier confidence: mean of retrieval closeness and lexical support."""
    return (retrieval_confidence(hits) + support(answer, [h.text for h in hits])) / 2


def supports_logprobs(generator: Any) -> bool:
    """Whether ``generator.generate`` takes ``logprobs`` (models registered before it did not)."""
    import inspect

    try:
        return "logprobs" in inspect.signature(generator.generate).parameters
    except (TypeError, ValueError):
        return False


def answer_batch(
    questions: Sequence[str],
    retriever: Any,
    generator: Any,
    *,
    k: int = 3,
    filters: Filters | None = None,
    max_new_tokens: int = 64,
    calibration: Calibration | None = None,
    threshold: float | None = None,
    screen: ChunkScreen | str | None = "default",
    new_canary: Callable[[], str] | None = new_canary,
) -> list[RagAnswer]:
    """Answer several questions in one generation batch, as the service does: chunks
    screened, a canary in each system prompt, answers checked for leaks and calibrated."""
    if isinstance(screen, str):
        if screen != "default":
            raise ValueError(f"screen must be a DocumentScreen, None or 'default', not {screen!r}")
        from refinery.safety.screening.documents import document_screen

        screen = document_screen()
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
            threshold=threshold,
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
    threshold: float | None = None,
    screened: int = 0,
    canary: str | None = None,
) -> RagAnswer:
    """The answer with its sources and calibrated confidence; an answer that leaks the system
    prompt is replaced by ``LEAK_REFUSAL`` (``leak`` says why); below the confidence threshold
    (default: ``min_confidence``) it says it does not know instead (see the module docstring)."""
    leaked = leak(text, canary)
    if calibration is None and CONFIDENCE_FILE.exists():
        calibration = load_calibration()
    values = signals(question, hits, text, token_logprobs)
    if calibration is None:  # no fitted coefficients yet: the lexical score, nothing withheld
        confidence, limit = lexical_confidence(hits, text), 0.0
    else:
        confidence = calibration.confidence(values)
        limit = min_confidence(calibration) if threshold is None else threshold
    abstain = confidence < limit and not leaked
    answer = LEAK_REFUSAL if leaked else dont_know(hits, confidence) if abstain else text
    return RagAnswer(
        question=question,
        answer=answer,
        sources=to_sources(hits),
        confidence=round(confidence, 4),
        retrieval_confidence=round(retrieval_confidence(hits), 4),
        groundedness=round(values["support"], 4),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        screened_chunks=screened,
        leak=leaked,
        abstained=abstain,
        signals={k: round(v, 4) for k, v in values.items()},
        model_answer=text,
    )
