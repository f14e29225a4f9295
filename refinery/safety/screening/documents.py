"""The document screen: does a passage of a document try to instruct the model that reads it?

Used twice, with the same scorer and threshold: at ingestion (a document with such a passage
is not indexed; the ledger lists it as ``suspicious`` with the passage) and before a prompt is
built (a retrieved chunk that trips it is dropped and counted). Text only, no embedding model,
so ingestion does not load one to screen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from refinery.safety.screening import GUARD_DIR
from refinery.safety.screening.heuristics import document_reasons
from refinery.safety.screening.linear import LinearScorer
from refinery.safety.screening.text import view

MODEL = GUARD_DIR / "document_screen"
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")
_UNIT_BREAK = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def sentences(text: str, min_chars: int = 16) -> list[str]:
    """The units the scorer reads: sentences and lines, a fragment shorter than ``min_chars``
    joined to the next one. One injected sentence is scored on its own, not diluted by the
    paragraph around it."""
    out: list[str] = []
    pending = ""
    for part in _UNIT_BREAK.split(text):
        part = part.strip()
        if not part:
            continue
        pending = f"{pending} {part}" if pending else part
        if len(pending) >= min_chars:
            out.append(pending)
            pending = ""
    if pending:
        if out:
            out[-1] = f"{out[-1]} {pending}"
        else:
            out.append(pending)
    return out


def passages(text: str, target: int = 400, limit: int = 900) -> list[str]:
    """Paragraphs merged up to about ``target`` characters, long ones cut at sentence ends
    (at most ``limit``): small enough that one injected sentence dominates its passage."""
    out: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        pieces = [para] if len(para) <= limit else _cut(para, limit)
        for piece in pieces:
            if current and len(current) + len(piece) > target:
                out.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        out.append(current)
    return out


def _cut(para: str, limit: int) -> list[str]:
    pieces, current = [], ""
    for sentence in _SENTENCE_END.split(para):
        while len(sentence) > limit:  # one endless "sentence": cut it blindly
            pieces.append(sentence[:limit])
            sentence = sentence[limit:]
        if current and len(current) + len(sentence) + 1 > limit:
            pieces.append(current)
            current = ""
        current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


@dataclass(frozen=True)
class Flag:
    score: float
    reasons: list[str]
    passage: str
    index: int  # which passage
    sentence: str = ""  # the passage's most suspicious sentence: what the operator is shown

    def detail(self) -> str:
        # From the most suspicious sentence on (with what follows it), else the passage's start.
        excerpt = " ".join(self.passage.split())
        start = excerpt.find(" ".join(self.sentence.split())) if self.sentence else -1
        excerpt = excerpt[max(start, 0) :]
        if len(excerpt) > 240:
            excerpt = excerpt[:237] + "..."
        why = ", ".join(self.reasons)
        return (
            f"passage {self.index + 1} reads as instructions to an AI model ({why}; score "
            f"{self.score:.2f}): \u201c{excerpt}\u201d"
        )


class DocumentScreen:
    def __init__(self, scorer: LinearScorer):
        self.scorer = scorer
        self.threshold = scorer.threshold

    @classmethod
    def load(cls, stem: Path = MODEL) -> DocumentScreen:
        return cls(LinearScorer.load(stem))

    def sentence_scores(self, units: Sequence[str]) -> np.ndarray:
        """(n,) probability that each sentence instructs a model."""
        normalized, dense = unit_features(units)
        return self.scorer.probabilities(normalized, dense)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) for each text (a passage or chunk): its most suspicious sentence's score."""
        return self._worst(texts)[0]

    def _worst(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Each text's most suspicious sentence: its score, and the sentence."""
        units, owner = [], []
        for i, text in enumerate(texts):
            for unit in sentences(text) or [text]:
                units.append(unit)
                owner.append(i)
        out = np.full(len(texts), -1.0)
        worst = list(texts)
        if units:
            for unit, i, score in zip(units, owner, self.sentence_scores(units), strict=True):
                if score > out[i]:
                    out[i], worst[i] = float(score), unit
        return np.maximum(out, 0.0), worst

    def flags(self, texts: Sequence[str]) -> list[Flag | None]:
        """For each text: None, or why it was flagged (heuristics or the scorer)."""
        out: list[Flag | None] = []
        scores, worst = self._worst(texts)
        for i, (text, score) in enumerate(zip(texts, scores, strict=True)):
            reasons = document_reasons(text)
            if score > self.threshold:
                reasons.append("learned_scorer")
            flag = Flag(float(score), reasons, text, i, worst[i]) if reasons else None
            out.append(flag)
        return out

    def check(self, text: str) -> Flag | None:
        """The first flagged passage of a document, or None."""
        parts = passages(text)
        return next((f for f in self.flags(parts) if f is not None), None)

    def __call__(self, text: str) -> str | None:
        """The ingestion hook (``refinery.ingestion.sync.Screen``): why, or None."""
        flag = self.check(text)
        return flag.detail() if flag is not None else None


def unit_features(units: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Normalized views and the disguise flags (the dense features) of sentences."""
    views = [view(u) for u in units]
    flags = np.asarray([v.flags() for v in views], dtype=np.float32).reshape(len(units), -1)
    return [v.text for v in views], flags


@lru_cache(maxsize=1)
def document_screen() -> DocumentScreen:
    """The screen trained on ``data/guard/documents`` (loaded once per process)."""
    return DocumentScreen.load()
