"""Prompt-injection guard: fixed heuristics plus a scorer that runs offline.

1. Heuristics: regular expressions for the phrasings that injections keep reusing ("ignore
   the previous instructions", "you are now DAN", "reveal your system prompt", fake role
   markers such as ``<|im_start|>system``). A match blocks.
2. Scorer: nearest-neighbour similarity in the embedding space of the service's own sentence
   model. ``score = mean(top-3 cosine to injection exemplars) − mean(top-3 cosine to benign
   exemplars)``; above ``threshold`` blocks. The exemplars are a small labelled file shipped in
   the repo (``data/guard/exemplars.jsonl``); no model is trained or downloaded.

Recall and false-positive rate are measured on a separate labelled set
(``data/guard/labeled.jsonl``) by ``python -m serving.guard`` and in ``benchmarks/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

GUARD_DIR = Path(__file__).resolve().parent.parent / "data" / "guard"
DEFAULT_THRESHOLD = 0.06

_P = re.IGNORECASE | re.DOTALL
PATTERNS: dict[str, re.Pattern[str]] = {
    "override": re.compile(
        r"\b(ignore|disregard|forget|override|bypass|skip)\b[^.?!\n]{0,40}?"
        r"\b(previous|prior|above|earlier|preceding|all|any|your|the|these|those|system)\b"
        r"[^.?!\n]{0,30}?\b(instructions?|rules?|prompts?|directives?|guidelines?|guardrails?|"
        r"polic(y|ies)|constraints?|restrictions?)",
        _P,
    ),
    "reveal": re.compile(
        r"\b(reveal|show|print|repeat|output|display|leak|tell me|what (is|are|was|were))\b"
        r"[^.?!\n]{0,40}?\b(your|the)\b[^.?!\n]{0,20}?"
        r"\b(system prompt|initial prompt|hidden (prompt|instructions?)|instructions you were given|"
        r"original instructions|developer message|secret (key|password|token)s?)",
        _P,
    ),
    "persona": re.compile(
        r"\b(you are now|from now on,? you are|act as|pretend (to be|you are)|roleplay as)\b"
        r"[^.?!\n]{0,60}?\b(DAN|jailbr(oken|eak)|unfiltered|uncensored|unrestricted|"
        r"no (rules|restrictions|filters|limits)|developer mode|evil)",
        _P,
    ),
    "jailbreak_mode": re.compile(
        r"\b(developer mode|DAN mode|jailbreak mode|god mode|sudo mode)\b", _P
    ),
    "role_marker": re.compile(
        r"(<\|im_start\|>\s*system|<\|system\|>|\[/?INST\]|<<SYS>>|###\s*system\s*:|"
        r"^\s*system\s*:\s)",
        re.IGNORECASE | re.MULTILINE,
    ),
}


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    score: float  # the scorer's margin (injection − benign similarity)
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heuristic_reasons(text: str) -> list[str]:
    return [name for name, pattern in PATTERNS.items() if pattern.search(text)]


def load_labeled(path: Path) -> tuple[list[str], list[int]]:
    """Rows of {"text": ..., "label": "injection" | "benign"} → texts and 1/0 labels."""
    texts, labels = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") not in ("injection", "benign") or not str(row.get("text", "")).strip():
            raise ValueError(f"{path}:{n}: need a non-empty text and label injection|benign")
        texts.append(str(row["text"]))
        labels.append(1 if row["label"] == "injection" else 0)
    return texts, labels


Embed = Callable[[list[str]], np.ndarray]  # texts → (n, dim) unit vectors


class InjectionGuard:
    def __init__(
        self,
        embed: Embed,
        exemplars: Path = GUARD_DIR / "exemplars.jsonl",
        threshold: float = DEFAULT_THRESHOLD,
        top: int = 3,
    ):
        texts, labels = load_labeled(exemplars)
        vectors = embed(texts)  # (n, dim)
        mask = np.asarray(labels, dtype=bool)
        self.injection, self.benign = vectors[mask], vectors[~mask]
        self.embed, self.threshold, self.top = embed, threshold, top

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) margins; positive means closer to the injection exemplars."""
        if not texts:
            return np.zeros(0)
        q = self.embed(list(texts))  # (n, dim)
        inj = np.sort(q @ self.injection.T, axis=1)[:, -self.top :].mean(axis=1)
        ben = np.sort(q @ self.benign.T, axis=1)[:, -self.top :].mean(axis=1)
        return inj - ben

    def check(self, texts: Sequence[str]) -> list[Verdict]:
        out = []
        for text, score in zip(texts, self.scores(texts), strict=True):
            reasons = heuristic_reasons(text)
            if score > self.threshold:
                reasons.append("similar_to_known_injections")
            out.append(Verdict(bool(reasons), round(float(score), 4), reasons))
        return out


def measure(guard: InjectionGuard, path: Path = GUARD_DIR / "labeled.jsonl") -> dict[str, Any]:
    """Recall (injections blocked) and false-positive rate (benign blocked) on a labelled set,
    for the heuristics alone, the scorer alone, and both (what the service runs)."""
    texts, labels = load_labeled(path)
    y = np.asarray(labels, dtype=bool)
    scores = guard.scores(texts)
    heur = np.asarray([bool(heuristic_reasons(t)) for t in texts])
    scorer = scores > guard.threshold
    out: dict[str, Any] = {"injections": int(y.sum()), "benign": int((~y).sum())}
    for name, pred in (("heuristics", heur), ("scorer", scorer), ("guard", heur | scorer)):
        out[name] = {
            "recall": round(float(pred[y].mean()), 3),
            "false_positive_rate": round(float(pred[~y].mean()), 3),
        }
    blocked = heur | scorer
    out["missed"] = [t for t, b, inj in zip(texts, blocked, y, strict=True) if inj and not b]
    out["false_positives"] = [
        t for t, b, inj in zip(texts, blocked, y, strict=True) if b and not inj
    ]
    return out


if __name__ == "__main__":  # python -m serving.guard: measure the guard on the labelled set
    from serving.corpus.embedding import Embedder

    embedder = Embedder()
    print(json.dumps(measure(InjectionGuard(embedder.encode)), indent=2))
