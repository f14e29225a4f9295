"""Training the injection screens: the prompt guard (``refinery.safety.guard.InjectionGuard``)
and the document screen (``refinery.safety.screening.documents.DocumentScreen``).

Each is fitted on the train split of its labelled set (``refinery.safety.splits``), its
regularization and threshold chosen on tune; the weights are saved beside the sets in
``data/guard`` (numpy arrays, no pickle, with their provenance in ``.json``). Deterministic.

``python -m training.guard`` retrains both; ``python -m evaluation.guard`` measures them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refinery.safety.guard import DOCUMENT_MODEL, MODEL, prompt_features
from refinery.safety.screening.documents import sentences, unit_features
from refinery.safety.screening.linear import LinearScorer, train_scorer
from refinery.safety.screening.text import FLAG_NAMES
from refinery.safety.splits import document_split, payloads, prompt_split


def train_prompt_guard(embedder: Any, out: Path = MODEL, max_fpr: float = 0.03) -> LinearScorer:
    """Fit on the train split (+ the earlier exemplars), choose on tune, save to ``out``."""
    train_texts, train_y = prompt_split("train")
    tune_texts, tune_y = prompt_split("tune")
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


def _document_training_units() -> tuple[list[str], np.ndarray]:
    """Sentences to train the document screen on, and their labels (True: an instruction).

    Positives: the injected sentences of the train split's poisoned passages and the prompt
    set's train injections (an instruction to the model reads the same typed or carried).
    Negatives: every sentence of the train split's benign passages, of the sample-corpus
    documents assigned to train, and the prompt set's benign train rows."""
    texts, y, _ = document_split("train")
    prompts, prompt_y = prompt_split("train")
    positives = payloads("train") + [t for t, p in zip(prompts, prompt_y, strict=True) if p]
    negatives = [u for t, p in zip(texts, y, strict=True) if not p for u in sentences(t)]
    negatives += [t for t, p in zip(prompts, prompt_y, strict=True) if not p]
    return positives + negatives, np.asarray([True] * len(positives) + [False] * len(negatives))


def train_document_screen(out: Path = DOCUMENT_MODEL, max_fpr: float = 0.01) -> LinearScorer:
    """Train on sentences (``_document_training_units``), choose on passages, save to ``out``.

    The threshold is chosen on the tune split's whole passages (a passage scores its worst
    sentence). No embedding: ingestion screens without loading a model."""
    train_units, train_y = _document_training_units()
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


def main(argv: Sequence[str] | None = None) -> None:
    """Retrain both screens, save them in data/guard, print what was chosen on tune."""
    import argparse

    from refinery.retrieval.embedding import Embedder

    argparse.ArgumentParser(
        prog="python -m training.guard",
        description="Retrain the prompt guard and the document screen (train split, chosen on "
        "tune) and save their weights in data/guard.",
    ).parse_args(argv)
    prompt = train_prompt_guard(Embedder())
    document = train_document_screen()
    chosen = {"prompt_guard": prompt.config["chosen"], "document_screen": document.config["chosen"]}
    print(json.dumps(chosen, indent=2))


if __name__ == "__main__":
    main()
