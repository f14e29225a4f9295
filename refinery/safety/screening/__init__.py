"""Text screens against prompt injection that need no model beyond numpy: normalization of
disguised text, multilingual heuristics, hashed character n-grams and a linear scorer.

Ingestion flags suspicious documents with them, RAG screens retrieved chunks, and the guard
screens user turns (adding the sentence embedding); they import nothing else of Refinery's
domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GUARD_DIR = Path(__file__).resolve().parents[3] / "data" / "guard"


def load_labeled(path: Path) -> tuple[list[str], np.ndarray]:
    """Rows of {"text": ..., "label": "injection" | "benign", ...} → texts and a bool array."""
    texts, labels = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("label") not in ("injection", "benign") or not str(row.get("text", "")).strip():
            raise ValueError(f"{path}:{n}: need a non-empty text and label injection|benign")
        texts.append(str(row["text"]))
        labels.append(row["label"] == "injection")
    return texts, np.asarray(labels, dtype=bool)
