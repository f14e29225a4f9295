"""Prompt-injection guard for user turns and RAG questions, and the training of the screens.

1. Heuristics (``refinery.safety.screening.heuristics``): multilingual regular expressions for the
   phrasings injections keep reusing, run on the text and on its normalized, decoded view.
2. A learned scorer: logistic regression over the sentence embedding of the normalized text
   (the service's own MiniLM), hashed character n-grams (which carry across languages the
   English-centric embedding does not know) and flags for disguises (base64, leetspeak,
   spaced letters, look-alike letters). Trained here, on ``data/guard/prompts/train.jsonl``,
   its regularization and threshold chosen on ``tune.jsonl``; the weights are
   ``data/guard/prompt_guard.npz`` (no pickle) with their provenance in ``.json``.

A request is refused when either fires; the ``Verdict`` says why in words a user can act on.
``python -m refinery.safety.guard train`` retrains both screens (this one and the document screen);
``python -m refinery.safety.guard measure`` reports recall and false-positive rate on a split.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refinery.safety.screening import GUARD_DIR, load_labeled
from refinery.safety.screening.documents import DocumentScreen, passages, sentences, unit_features
from refinery.safety.screening.heuristics import document_reasons
from refinery.safety.screening.heuristics import heuristic_reasons as _heuristic_reasons
from refinery.safety.screening.linear import LinearScorer, rates, train_scorer
from refinery.safety.screening.text import FLAG_NAMES, view

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
                f"{probe.shape[1]}-d ones: retrain it (python -m refinery.safety.guard train)"
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


# --- training ---------------------------------------------------------------------------------


def _prompt_split(split: str) -> tuple[list[str], np.ndarray]:
    texts, y = load_labeled(GUARD_DIR / "prompts" / f"{split}.jsonl")
    if split == "train":  # the earlier exemplar set joins the training data
        more, more_y = load_labeled(GUARD_DIR / "exemplars.jsonl")
        texts, y = texts + more, np.concatenate([y, more_y])
    return texts, y


def train_prompt_guard(embedder: Any, out: Path = MODEL, max_fpr: float = 0.03) -> LinearScorer:
    """Fit on the train split (+ the earlier exemplars), choose on tune, save to ``out``."""
    train_texts, train_y = _prompt_split("train")
    tune_texts, tune_y = _prompt_split("tune")
    tr, tr_dense = prompt_features(embedder.encode, train_texts)
    tu, tu_dense = prompt_features(embedder.encode, tune_texts)
    scorer = train_scorer(
        tr,
        tr_dense,
        train_y,
        tu,
        tu_dense,
        tune_y,
        max_fpr=max_fpr,
        config={
            "what": "prompt guard",
            "features": "char n-grams of the normalized text + sentence embedding + flags",
            "dense": [f"embedding[{tr_dense.shape[1] - len(FLAG_NAMES)}]", *FLAG_NAMES],
            "embedding_model": embedder.name,
            "embedding_dim": int(tr_dense.shape[1] - len(FLAG_NAMES)),
        },
    )
    scorer.save(out)
    return scorer


def corpus_split(name: str) -> str:
    """Which split a sample-corpus document's passages belong to (fixed by its file name)."""
    import hashlib

    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 5 else "tune" if bucket < 7 else "test"


def corpus_passages(split: str, corpus: Path | None = None) -> list[str]:
    """Passages of the sample-corpus documents in ``split``: real benign text."""
    from refinery.corpus.documents import CorpusFile, corpus_file, parse_file

    folder = corpus or GUARD_DIR.parent / "corpus"
    out = []
    for path in sorted(folder.iterdir()):
        found = corpus_file(path, folder)
        if corpus_split(path.name) == split and isinstance(found, CorpusFile):
            out.extend(passages(parse_file(found).text))
    return out


def document_split(split: str) -> tuple[list[str], np.ndarray, int]:
    """Labelled passages of ``split``, then that split's sample-corpus passages (benign);
    the last value is how many of the rows are sample-corpus passages."""
    texts, y = load_labeled(GUARD_DIR / "documents" / f"{split}.jsonl")
    real = corpus_passages(split)
    return texts + real, np.concatenate([y, np.zeros(len(real), dtype=bool)]), len(real)


def _payloads(split: str) -> list[str]:
    rows = (GUARD_DIR / "documents" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(r)["payload"] for r in rows if r.strip() and "payload" in json.loads(r)]


def train_document_screen(out: Path = DOCUMENT_MODEL, max_fpr: float = 0.01) -> LinearScorer:
    """Train on sentences, choose on passages, save to ``out``.

    Positives: the injected sentences of the train split's poisoned passages and the prompt
    set's train injections (an instruction to the model reads the same typed or carried).
    Negatives: every sentence of the train split's benign passages, of the sample-corpus
    documents assigned to train, and the prompt set's benign train rows. The threshold is
    chosen on the tune split's whole passages (a passage scores its worst sentence). No
    embedding: ingestion screens without loading a model."""
    texts, y, _ = document_split("train")
    prompts, prompt_y = _prompt_split("train")
    positives = _payloads("train") + [t for t, p in zip(prompts, prompt_y, strict=True) if p]
    negatives = [u for t, p in zip(texts, y, strict=True) if not p for u in sentences(t)]
    negatives += [t for t, p in zip(prompts, prompt_y, strict=True) if not p]
    train_units = positives + negatives
    train_y = np.asarray([True] * len(positives) + [False] * len(negatives))
    tune_texts, tune_y, _ = document_split("tune")
    tune_units, groups = [], []
    for i, text in enumerate(tune_texts):
        for unit in sentences(text) or [text]:
            tune_units.append(unit)
            groups.append(i)
    tr, tr_dense = unit_features(train_units)
    tu, tu_dense = unit_features(tune_units)
    scorer = train_scorer(
        tr,
        tr_dense,
        train_y,
        tu,
        tu_dense,
        tune_y,
        max_fpr=max_fpr,
        tune_groups=np.asarray(groups),
        config={
            "what": "document screen",
            "features": "char n-grams of each normalized sentence + flags; a text scores its "
            "worst sentence",
            "dense": FLAG_NAMES,
        },
    )
    scorer.save(out)
    return scorer


# --- measurement ------------------------------------------------------------------------------


def _summary(
    texts: Sequence[str], y: np.ndarray, heur: np.ndarray, learned: np.ndarray
) -> dict[str, Any]:
    both = heur | learned
    return {
        "injections": int(y.sum()),
        "benign": int((~y).sum()),
        "heuristics": rates(heur, y),
        "classifier": rates(learned, y),
        "both": rates(both, y),
        "missed": [t for t, p, t_y in zip(texts, both, y, strict=True) if t_y and not p],
        "false_positives": [t for t, p, t_y in zip(texts, both, y, strict=True) if p and not t_y],
    }


def measure(guard: InjectionGuard, path: Path) -> dict[str, Any]:
    """Recall (injections blocked) and false-positive rate (benign blocked) on a labelled file:
    heuristics alone, the classifier alone, and both (what the service runs)."""
    texts, y = load_labeled(path)
    heur = np.asarray([bool(heuristic_reasons(t)) for t in texts])
    learned = guard.scores(texts) > guard.threshold
    return {"file": str(path), **_summary(texts, y, heur, learned)}


def measure_documents(screen: DocumentScreen, split: str = "test") -> dict[str, Any]:
    """The document screen on one split: labelled passages plus sample-corpus passages."""
    texts, y, real = document_split(split)
    heur = np.asarray([bool(document_reasons(t)) for t in texts])
    learned = screen.scores(texts) > screen.threshold
    out = {"split": split, "sample_corpus_passages": real, **_summary(texts, y, heur, learned)}
    out["sample_corpus_flagged"] = int((heur | learned)[len(texts) - real :].sum())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m refinery.safety.guard")
    parser.add_argument("command", choices=["train", "measure"])
    parser.add_argument("--split", default="tune", help="measure: train, tune or test")
    args = parser.parse_args(argv)
    from refinery.retrieval.embedding import Embedder

    embedder = Embedder()
    if args.command == "train":
        prompt = train_prompt_guard(embedder)
        document = train_document_screen()
        print(
            json.dumps(
                {
                    "prompt_guard": prompt.config["chosen"],
                    "document_screen": document.config["chosen"],
                },
                indent=2,
            )
        )
        return
    guard = InjectionGuard(embedder.encode)
    report = {
        "prompts": measure(guard, GUARD_DIR / "prompts" / f"{args.split}.jsonl"),
        "documents": measure_documents(DocumentScreen.load(DOCUMENT_MODEL), args.split),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
