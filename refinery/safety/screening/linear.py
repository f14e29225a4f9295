"""A logistic-regression scorer over hashed character n-grams plus a few dense features, its
storage (weights in ``.npz`` read with ``allow_pickle=False``, settings and provenance in
``.json``: nothing is unpickled) and its training (scikit-learn, deterministic).

Training picks the regularization and the threshold on the *tune* split: the threshold is the
lowest score that keeps the tune false-positive rate at or under ``max_fpr``; the test split is
not read. The weights, the threshold, the grid tried and the tune figures are saved together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refinery.safety.screening.features import ngram_matrix, ngram_vector


@dataclass
class LinearScorer:
    """p(injection) = sigmoid(w_ngrams · ngrams(text) + w_dense · dense + bias)."""

    ngram_weights: np.ndarray  # (2**bits,)
    dense_weights: np.ndarray  # (n_dense,)
    bias: float
    threshold: float  # on the probability; above it blocks
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.config.get("bits", 18))

    @property
    def ngram_range(self) -> tuple[int, int]:
        lo, hi = self.config.get("ngram_range", (2, 5))
        return int(lo), int(hi)

    def probabilities(self, texts: Sequence[str], dense: np.ndarray | None = None) -> np.ndarray:
        """(n,) probabilities for normalized texts and their (n, n_dense) dense features."""
        lo, hi = self.ngram_range
        logits = np.empty(len(texts))
        for i, text in enumerate(texts):
            idx, values = ngram_vector(text, lo, hi, self.bits)
            logits[i] = float(self.ngram_weights[idx] @ values)
        if dense is not None and len(self.dense_weights):
            logits += dense @ self.dense_weights
        logits += self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, stem: Path) -> None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            stem.with_suffix(".npz"),
            ngram_weights=self.ngram_weights.astype(np.float32),
            dense_weights=self.dense_weights.astype(np.float32),
            bias=np.float64(self.bias),
        )
        meta = {**self.config, "threshold": self.threshold}
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, stem: Path) -> LinearScorer:
        meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".npz")
        if not weights_path.exists() or not meta_path.exists():
            raise FileNotFoundError(
                f"no trained scorer at {stem}.npz/.json: run `python -m training.guard`"
            )
        config = json.loads(meta_path.read_text())
        with np.load(weights_path, allow_pickle=False) as w:
            scorer = cls(
                ngram_weights=w["ngram_weights"].astype(np.float32),
                dense_weights=w["dense_weights"].astype(np.float32),
                bias=float(w["bias"]),
                threshold=float(config.pop("threshold")),
                config=config,
            )
        if len(scorer.ngram_weights) != 1 << scorer.bits:
            raise ValueError(
                f"{weights_path}: {len(scorer.ngram_weights)} weights for {scorer.bits} bits"
            )
        return scorer


def threshold_for(
    benign_scores: np.ndarray, max_fpr: float, injection_scores: np.ndarray | None = None
) -> float:
    """A threshold at which at most ``max_fpr`` of these benign scores lie above it: halfway
    between the highest benign score that must stay below and the next injection score above
    it (a margin on both sides, not a knife edge on one tune example)."""
    ranked = np.sort(np.asarray(benign_scores))[::-1]
    allowed = int(np.floor(max_fpr * len(ranked)))
    if allowed >= len(ranked):
        return 0.0
    cut = float(ranked[allowed])
    above = np.asarray(injection_scores if injection_scores is not None else [])
    above = above[above > cut]
    if len(above) == 0:
        return float(min(1.0, cut + 1e-3))
    return (cut + float(above.min())) / 2


def rates(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        "recall": round(float(pred[y].mean()), 4) if y.any() else float("nan"),
        "false_positive_rate": round(float(pred[~y].mean()), 4) if (~y).any() else float("nan"),
    }


def train_scorer(
    train_texts: Sequence[str],
    train_dense: np.ndarray,
    train_y: np.ndarray,
    tune_texts: Sequence[str],
    tune_dense: np.ndarray,
    tune_y: np.ndarray,
    *,
    max_fpr: float = 0.02,
    bits: int = 18,
    ngram_range: tuple[int, int] = (2, 5),
    grid_c: Sequence[float] = (0.3, 1.0, 3.0, 10.0, 30.0),
    grid_dense_scale: Sequence[float] = (0.5, 1.0, 2.0),
    config: dict[str, Any] | None = None,
    tune_groups: np.ndarray | None = None,
) -> LinearScorer:
    """Fit on train, choose C, the dense block's scale and the threshold on tune.

    The choice maximizes tune recall at the threshold that keeps tune FPR ≤ ``max_fpr`` (ties:
    the larger margin between that threshold and the benign scores' median).

    ``tune_groups``: when tune rows are parts of longer texts (sentences of passages), the id
    of the text each row belongs to; a text scores its highest row and ``tune_y`` labels texts.
    """
    from scipy.sparse import csr_matrix, hstack

    lo, hi = ngram_range
    x_train_ng = ngram_matrix(list(train_texts), lo, hi, bits)
    x_tune_ng = ngram_matrix(list(tune_texts), lo, hi, bits)
    best: tuple[tuple[float, float], LinearScorer, dict[str, Any]] | None = None
    tried = []
    for dense_scale in grid_dense_scale if train_dense.shape[1] else (1.0,):
        x_train = hstack([x_train_ng, csr_matrix(train_dense * dense_scale)]).tocsr()
        x_tune = hstack([x_tune_ng, csr_matrix(tune_dense * dense_scale)]).tocsr()
        for c in grid_c:
            model, threshold, figures, margin = _fit_and_tune(
                c, x_train, train_y, x_tune, tune_y, tune_groups, max_fpr
            )
            tried.append({"C": c, "dense_scale": dense_scale, "threshold": threshold, **figures})
            key = (figures["recall"], margin)
            if best is None or key > best[0]:
                scorer = _scorer_of(model, bits, dense_scale, threshold)
                best = (key, scorer, {"C": c, "dense_scale": dense_scale, **figures})
    assert best is not None
    _, scorer, chosen = best
    scorer.config = {
        **(config or {}),
        "bits": bits,
        "ngram_range": list(ngram_range),
        "max_fpr_on_tune": max_fpr,
        "chosen": chosen,
        "grid": tried,
        "train_rows": len(train_texts),
        "tune_rows": len(tune_y),
    }
    return scorer


def _fit_and_tune(
    c: float,
    x_train: Any,
    train_y: np.ndarray,
    x_tune: Any,
    tune_y: np.ndarray,
    tune_groups: np.ndarray | None,
    max_fpr: float,
) -> tuple[Any, float, dict[str, float], float]:
    """One grid point: (the model fitted at ``C=c``, its tune threshold, its tune recall and
    FPR at that threshold, the threshold's margin over the benign scores' median)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(
        C=c, class_weight="balanced", solver="liblinear", max_iter=1000, random_state=0
    )
    model.fit(x_train, train_y)
    tune_p = model.predict_proba(x_tune)[:, 1]
    if tune_groups is not None:
        grouped = np.zeros(len(tune_y))
        np.maximum.at(grouped, tune_groups, tune_p)
        tune_p = grouped
    threshold = threshold_for(tune_p[~tune_y], max_fpr, tune_p[tune_y])
    figures = rates(tune_p > threshold, tune_y)
    margin = threshold - float(np.median(tune_p[~tune_y]))
    return model, threshold, figures, margin


def _scorer_of(model: Any, bits: int, dense_scale: float, threshold: float) -> LinearScorer:
    """The fitted weights as a scorer of unscaled dense features (the scale folded in)."""
    coef = model.coef_[0]
    return LinearScorer(
        ngram_weights=coef[: 1 << bits].astype(np.float32),
        dense_weights=(coef[1 << bits :] * dense_scale).astype(np.float32),
        bias=float(model.intercept_[0]),
        threshold=threshold,
    )
