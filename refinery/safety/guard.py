"""Prompt-injection guard for user turns and RAG questions.

1. Heuristics (``refinery.safety.screening.heuristics``): multilingual regular expressions for the
   phrasings injections keep reusing, run on the text and on its normalized, decoded view.
2. A learned scorer: logistic regression over the sentence embedding of the normalized text
   (the service's own MiniLM), hashed character n-grams (which carry across languages the
   English-centric embedding does not know) and flags for disguises (base64, leetspeak,
   spaced letters, look-alike letters). Trained by ``training.guard`` on
   ``data/guard/prompts/train.jsonl``, its regularization and threshold chosen on
   ``tune.jsonl``; the weights are ``data/guard/prompt_guard.npz`` (no pickle) with their
   provenance in ``.json``.

A request is refused when either fires; the ``Verdict`` says why in words a user can act on.
``python -m training.guard`` retrains both screens (this one and the document screen);
``python -m evaluation.guard --split tune`` reports recall and false-positive rate on a split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refinery.safety.screening import GUARD_DIR, load_labeled
from refinery.safety.screening.heuristics import heuristic_reasons as _heuristic_reasons
from refinery.safety.screening.linear import LinearScorer
from refinery.safety.screening.text import view

# GUARD_DIR and load_labeled are re-exported: callers that read the labelled sets import them here.
__all__ = [
    "DOCUMENT_MODEL",
    "GUARD_DIR",
    "LEARNED",
    "MODEL",
    "InjectionGuard",
    "Verdict",
    "heuristic_reasons",
    "load_labeled",
    "prompt_features",
    "refusal_message",
]

MODEL = GUARD_DIR / "prompt_guard"
DOCUMENT_MODEL = GUARD_DIR / "document_screen"
LEARNED = "learned_scorer"

# What each reason means to the person whose request was refused.
_WHY = {
    "override": "it asks the assistant to ignore, forget or replace its instructions",
    "reveal": "it asks for the assistant's hidden instructions, configuration or secrets",
    "persona": "it asks the assistant to play a persona that has no rules",
    "jailbreak_mode": "it asks the assistant to switch to a mode without its rules",
    "role_marker": "it contains chat-template markers that imitate a system message",
    "addresses_the_model": "it contains text addressed to the AI model as instructions",
    LEARNED: "it reads like a prompt injection to the guard's classifier",
}
_REPHRASE = (
    "Ask your question directly, without instructions about the assistant's rules, role or "
    "configuration. If you are quoting a text that contains such instructions, describe or "
    "summarize it in your own words instead."
)


def heuristic_reasons(text: str) -> list[str]:
    """Names of the injection patterns ``text`` matches (also used to screen user data)."""
    return _heuristic_reasons(text)


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    score: float  # the learned scorer's probability that the text is an injection
    reasons: list[str]
    message: str = ""  # for the user: why it was refused and how to rephrase ("" if passed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def refusal_message(reasons: Sequence[str], decoded: bool = False) -> str:
    whys = [_WHY.get(r, r) for r in reasons]
    if decoded:
        whys.append("part of it is encoded (base64, hex, rot13...) and decodes to such text")
    return (
        "This request was refused by the prompt-injection guard: "
        + "; ".join(dict.fromkeys(whys))
        + ". "
        + _REPHRASE
    )


Embed = Callable[[list[str]], np.ndarray]  # texts → (n, dim) unit vectors


def prompt_features(embed: Embed, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Normalized views and their dense features: [embedding of the view | disguise flags]."""
    views = [view(t) for t in texts]
    normalized = [v.text for v in views]
    if not texts:
        return normalized, np.zeros((0, 0), dtype=np.float32)
    vectors = np.asarray(embed([n[:2000] for n in normalized]), dtype=np.float32)  # (n, dim)
    flags = np.asarray([v.flags() for v in views], dtype=np.float32)  # (n, len(FLAG_NAMES))
    return normalized, np.hstack([vectors, flags])


class InjectionGuard:
    def __init__(self, embed: Embed, model: Path = MODEL, threshold: float | None = None):
        self.scorer = LinearScorer.load(model)
        self.embed = embed
        self.threshold = self.scorer.threshold if threshold is None else threshold
        dim = int(self.scorer.config.get("embedding_dim", 0))
        probe = np.asarray(embed(["probe"]))
        if dim and probe.shape[1] != dim:
            raise ValueError(
                f"the guard at {model} was trained on {dim}-d vectors of "
                f"{self.scorer.config.get('embedding_model')}; this embedder gives "
                f"{probe.shape[1]}-d ones: retrain it (python -m training.guard)"
            )

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) probabilities that each text is an injection."""
        if not texts:
            return np.zeros(0)
        normalized, dense = prompt_features(self.embed, texts)
        return self.scorer.probabilities(normalized, dense)

    def check(self, texts: Sequence[str]) -> list[Verdict]:
        out = []
        for text, score in zip(texts, self.scores(texts), strict=True):
            reasons = heuristic_reasons(text)
            if score > self.threshold:
                reasons.append(LEARNED)
            message = refusal_message(reasons, bool(view(text).decoded)) if reasons else ""
            out.append(Verdict(bool(reasons), round(float(score), 4), reasons, message))
        return out
