"""How sure a RAG answer is: its signals, the calibrated confidence model over them, and the
threshold below which the answer is withheld.

Confidence (0–1) is the probability that the answer is correct, from a small logistic model
(``ConfidenceModel``, coefficients in ``data/rag/confidence.json``, fitted and checked on
labelled answers by ``benchmarks/confidence.py``) over signals of the answer (``signals``):
- retrieval: the best chunk's cosine, its margin over the next, whether the best chunk was
  found by both vector and text search, the share of the question's words the chunks contain;
- the answer against its chunks: the share of its content words found there (``support``,
  "groundedness") and of its numbers and names (``fact_support``); whether it says it does
  not know;
- the answer against the evidence: whether a retrieved sentence supports an answer at all
  (``has_evidence``, ``refinery.rag.evidence.best_quote``) and the share of the answer's
  content words that sentence holds (``evidence_agreement``);
- the model's own token log-probabilities on the answer (mean, minimum), when the generator
  returned them (a second set of coefficients is used when it did not).

The stored ``Calibration`` is read by ``load_calibration``, once, by whoever answers
(the service at start-up, an evaluation run, a benchmark) and passed down. Without one,
``lexical_confidence`` (the earlier score: mean of retrieval closeness and support) is used
and nothing is withheld.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from refinery.rag.evidence import Quote, best_quote
from refinery.rag.text import content_words

if TYPE_CHECKING:
    from refinery.retrieval.search import Hit

# Beside the guard's sets and weights (data/), staged into the Bento with them.
CONFIDENCE_FILE = Path(__file__).resolve().parents[2] / "data" / "rag" / "confidence.json"

# A signal counts at most this many of its training standard deviations from its training
# mean: a value the fit never saw (fact_support 0 where nearly every training answer had 1,
# so its scale is 0.02) cannot swing the answer to certainty or to nothing.
Z_CLIP = 3.0
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


# --- signals ------------------------------------------------------------------------------------
def support(answer: str, contexts: Sequence[str]) -> float:
    """Share of the answer's content words that appear in the contexts (1.0: all of them; an
    answer with no content word, like "Yes.", counts as supported)."""
    wanted = content_words(answer)
    if not wanted:
        return 1.0
    context = set().union(*(content_words(c) for c in contexts)) if contexts else set()
    return len(wanted & context) / len(wanted)


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
    quote: Quote | EllipsisType | None = ...,
) -> dict[str, float]:
    """The confidence model's inputs (see the module docstring); logprob signals only when
    ``token_logprobs`` is given. ``quote``: the passage that best supports an answer
    (``refinery.rag.evidence.best_quote``), found here when not given."""
    if quote is ...:
        quote = best_quote(question, hits)
    cosines = sorted((h.score for h in hits), reverse=True)
    contexts = [h.text for h in hits]
    q_words = content_words(question)
    chunk_words = set().union(*(content_words(c) for c in contexts)) if contexts else set()
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
        # Agreement with the evidence: whether some passage supports an answer at all, and
        # the share of the answer's content words that passage holds.
        "has_evidence": float(quote is not None),
        "evidence_agreement": support(answer, [quote.text]) if quote is not None else 0.0,
    }
    if token_logprobs is not None:
        values = list(token_logprobs) or [-10.0]
        out["mean_logprob"] = sum(values) / len(values)
        out["min_logprob"] = max(-20.0, min(values))
    return out


def retrieval_confidence(hits: Sequence[Hit]) -> float:
    if not hits:
        return 0.0
    return min(1.0, max(0.0, (hits[0].score - 0.2) / 0.5))


def lexical_confidence(hits: Sequence[Hit], answer: str) -> float:
    """The earlier confidence: mean of retrieval closeness and lexical support."""
    return (retrieval_confidence(hits) + support(answer, [h.text for h in hits])) / 2


# --- the calibrated model -----------------------------------------------------------------------
@dataclass(frozen=True)
class ConfidenceModel:
    """Logistic regression over standardized signals, each clipped to ``Z_CLIP``:
    P(correct) = sigmoid(b + w·clip((x-m)/s))."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float

    def predict(self, values: Mapping[str, float]) -> float:
        z = self.intercept
        for name, m, sd, w in zip(self.features, self.mean, self.scale, self.coef, strict=True):
            z += w * max(-Z_CLIP, min(Z_CLIP, (float(values[name]) - m) / sd))
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


def load_calibration(path: Path = CONFIDENCE_FILE) -> Calibration | None:
    """The calibration stored at ``path`` (JSON coefficients, never a pickle); None where no
    file is there (a checkout before the first ``python -m benchmarks confidence``): answers
    then carry the lexical score and none is withheld. Load it once and pass it down."""
    path = Path(path)
    if not path.exists():
        return None
    return Calibration.from_dict(json.loads(path.read_text()))


def check_min_confidence(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {value}")
    return value


def confidence(
    values: Mapping[str, float],
    hits: Sequence[Hit],
    answer: str,
    calibration: Calibration | None,
    min_confidence: float | None = None,
) -> tuple[float, float]:
    """(the answer's confidence, the threshold below which it is withheld). The threshold is
    ``min_confidence`` if given (0 never withholds), else the calibration's own; without a
    calibration, the lexical score and nothing withheld."""
    if calibration is None:  # no fitted coefficients: the lexical score, nothing withheld
        return lexical_confidence(hits, answer), 0.0
    if min_confidence is None:
        return calibration.confidence(values), calibration.threshold
    return calibration.confidence(values), check_min_confidence(min_confidence)
