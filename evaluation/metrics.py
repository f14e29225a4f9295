"""Answer and retrieval metrics, and a bootstrap interval: small pure functions."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalization)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalized tokens."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    # lcs[j] holds the LCS length of pred[:i] and ref[:j] for the current i (one row at a time).
    lcs = [0] * (len(ref) + 1)
    for p in pred:
        prev_diag = 0
        for j, r in enumerate(ref, start=1):
            prev_row = lcs[j]
            lcs[j] = prev_diag + 1 if p == r else max(lcs[j], lcs[j - 1])
            prev_diag = prev_row
    best = lcs[-1]
    if best == 0:
        return 0.0
    precision, recall = best / len(pred), best / len(ref)
    return 2 * precision * recall / (precision + recall)


def hit_at_k(retrieved_sources: Sequence[str], gold_sources: Sequence[str], k: int) -> float:
    return float(any(s in gold_sources for s in retrieved_sources[:k]))


def reciprocal_rank(retrieved_sources: Sequence[str], gold_sources: Sequence[str]) -> float:
    for rank, source in enumerate(retrieved_sources, start=1):
        if source in gold_sources:
            return 1.0 / rank
    return 0.0


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and a percentile bootstrap interval for it."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(data, size=(resamples, data.size), replace=True).mean(axis=1)  # (resamples,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(data.mean()), float(low), float(high)


def paired_bootstrap(
    rows: Sequence[Sequence[float]],
    *,
    relative: bool = False,
    exp: bool = False,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(difference, low, high) of challenger − champion over the same examples, resampled in
    pairs: ``low`` and ``high`` are the (1 − confidence) and confidence quantiles of the
    resampled differences, so each end is a one-sided bound at ``confidence``.

    Each row is one example: ``(challenger, champion)`` for a metric that is a mean, or
    ``(challenger_sum, challenger_count, champion_sum, champion_count)`` for a ratio of sums
    (perplexity: summed NLL over answer tokens, with ``exp``). ``relative``: the difference is
    challenger / champion − 1."""
    data = np.asarray(rows, dtype=float)  # (examples, 2 or 4)
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] not in (2, 4):
        raise ValueError("paired_bootstrap needs rows of 2 or 4 numbers, at least one row")
    if data.shape[1] == 2:
        data = np.stack([data[:, 0], np.ones(len(data)), data[:, 1], np.ones(len(data))], axis=1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))  # (resamples, examples)

    def statistic(sample: np.ndarray) -> np.ndarray:  # (..., examples, 4) -> (...,)
        sums = sample.sum(axis=-2)  # (..., 4)
        ours, theirs = sums[..., 0] / sums[..., 1], sums[..., 2] / sums[..., 3]
        if exp:
            ours, theirs = np.exp(ours), np.exp(theirs)
        if relative:
            return np.asarray(ours / theirs - 1.0)
        return np.asarray(ours - theirs)

    observed = float(statistic(data))
    spread = statistic(data[picks])  # (resamples,)
    low, high = np.quantile(spread, [1 - confidence, confidence])
    return observed, float(low), float(high)
