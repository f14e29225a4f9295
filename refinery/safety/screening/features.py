"""Character n-grams, hashed: features that work in any language and survive misspellings.

The sentence model the guard also uses (all-MiniLM-L6-v2) was trained on English; "ignorez les
instructions précédentes" lands nowhere near "ignore the previous instructions" in its space.
Character n-grams of the normalized text ("instr", "nstru", "ignor", "anwei") carry over
between French, Italian, Portuguese and English and need no vocabulary.

Hashing is a polynomial over code points (numpy, vectorized, the same on every machine;
Python's ``hash`` is salted per process), folded into ``2**bits`` buckets. Each text becomes a
sparse vector of sublinear counts (1 + log count), scaled to unit length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_BASE = np.uint64(1_000_003)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def ngram_buckets(text: str, n_min: int = 2, n_max: int = 5, bits: int = 18) -> np.ndarray:
    """Bucket of every character n-gram (n_min..n_max) of `` text ``, padded with spaces."""
    if not text.strip():
        return np.zeros(0, dtype=np.int64)
    padded = " " + " ".join(text.split()) + " "
    codes = np.frombuffer(padded.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    out = []
    with np.errstate(over="ignore"):  # the hash wraps around 2**64 on purpose
        for n in range(n_min, n_max + 1):
            if len(codes) < n:
                break
            h = np.full(len(codes) - n + 1, np.uint64(n), dtype=np.uint64)
            for k in range(n):
                h = h * _BASE + codes[k : len(codes) - n + 1 + k]
            out.append((h * _GOLDEN) >> np.uint64(64 - bits))
    if not out:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(out).astype(np.int64)


def ngram_vector(
    text: str, n_min: int = 2, n_max: int = 5, bits: int = 18
) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, weights): a unit-length sparse vector of sublinear n-gram counts."""
    buckets = ngram_buckets(text, n_min, n_max, bits)
    if len(buckets) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    idx, counts = np.unique(buckets, return_counts=True)
    values = 1.0 + np.log(counts.astype(np.float64))
    values /= np.linalg.norm(values)
    return idx, values.astype(np.float32)


def ngram_matrix(texts: list[str], n_min: int = 2, n_max: int = 5, bits: int = 18) -> Any:
    """(len(texts), 2**bits) scipy CSR matrix of ``ngram_vector`` rows (for training)."""
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        idx, values = ngram_vector(text, n_min, n_max, bits)
        rows.append(np.full(len(idx), i))
        cols.append(idx)
        vals.append(values)
    return csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(texts), 1 << bits),
        dtype=np.float32,
    )
