"""The labelled sets of the injection screens, split by what may read them: train and tune for
training (``training.guard``), test for measurement (``evaluation.guard``).

Prompts: ``data/guard/prompts/{train,tune,test}.jsonl`` (the earlier exemplars join train).
Documents: ``data/guard/documents/{split}.jsonl`` plus the passages of the sample-corpus
documents assigned to that split by a hash of their file name (real benign text).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from refinery.safety.screening import GUARD_DIR, load_labeled
from refinery.safety.screening.documents import passages


def prompt_split(split: str) -> tuple[list[str], np.ndarray]:
    """Texts and labels (True: injection) of one split of the prompt set."""
    texts, y = load_labeled(GUARD_DIR / "prompts" / f"{split}.jsonl")
    if split == "train":  # the earlier exemplar set joins the training data
        more, more_y = load_labeled(GUARD_DIR / "exemplars.jsonl")
        texts, y = texts + more, np.concatenate([y, more_y])
    return texts, y


def corpus_split(name: str) -> str:
    """Which split a sample-corpus document's passages belong to (fixed by its file name)."""
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


def payloads(split: str) -> list[str]:
    """The injected sentences of the poisoned passages of ``split``."""
    rows = (GUARD_DIR / "documents" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(r)["payload"] for r in rows if r.strip() and "payload" in json.loads(r)]
