"""Calibrating RAG confidence on labelled answers: what "correct" means, the logistic fit,
expected calibration error and the reliability diagram.

**Correct** (``is_correct``): an answer is correct when it carries the reference answer's facts:
every number in the reference appears in the answer, and at least half of the reference's
content words appear in it (``refinery.rag.text.content_words``: the same words that RAG's
confidence signals count). Lexical on purpose: it can be computed for every answer, and what a
small model gets wrong is mostly a number or the thing named. An answer that says it does not
know is not correct (every question in the sets has an answer).

The model (``fit_calibration``): logistic regression with an L2 penalty on standardized signals
(``refinery.rag.confidence.signals``), fitted by Newton's method in numpy; stored as JSON coefficients.
Fitted only on rows of the tune split; ECE and the reliability diagram are reported on the test
split.

The threshold (``threshold_for_precision``): the lowest confidence at which the answers shown
(confidence at or above it) reach a stated precision, e.g. 0.75 (``max_wrong`` 0.25 in
``fit_calibration``); the share of answers it still shows (coverage) is stored in the
calibration's meta. On the test split ``calibration_metrics`` reports how well confidence
separates right from wrong answers (``auroc``), and the precision and coverage of the answers
shown at the stored threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refinery.rag.confidence import Z_CLIP, Calibration, ConfidenceModel, says_unknown
from refinery.rag.text import content_words

LOGPROB_FEATURES = ("mean_logprob", "min_logprob")
BASE_FEATURES = (
    "top_cosine",
    "cosine_margin",
    "both_lists",
    "question_coverage",
    "support",
    "fact_support",
    "says_unknown",
    "has_evidence",
    "evidence_agreement",
)
# Signals that can only raise the chance an answer is right: the fit keeps their coefficients
# at or above zero (a negative one is noise of a small tune set, and would have an answer lose
# confidence for being better supported). says_unknown has no sign: "I don't know" is right
# when the documents do not answer.
POSITIVE_FEATURES = frozenset(
    ("top_cosine", "cosine_margin", "both_lists", "question_coverage", "support",
     "fact_support", "has_evidence", "evidence_agreement", "mean_logprob", "min_logprob")
)  # fmt: skip
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")


def is_correct(answer: str, reference: str, min_recall: float = 0.5) -> bool:
    """See the module docstring."""
    if says_unknown(answer):
        return False
    text = _THOUSANDS.sub("", answer.lower())
    numbers = set(_NUMBER.findall(_THOUSANDS.sub("", reference)))
    if any(not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", text) for n in numbers):
        return False
    wanted = content_words(reference)
    if not wanted:
        return True
    return len(wanted & content_words(answer)) / len(wanted) >= min_recall


def fit_logistic(
    rows: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    features: Sequence[str],
    *,
    l2: float = 1.0,
    iterations: int = 50,
    positive: Collection[str] = (),
) -> ConfidenceModel:
    """Logistic regression, L2-penalized (not on the intercept), Newton's method. A feature
    in ``positive`` whose coefficient comes out negative is held at zero (the most negative
    first, then the fit is redone), so the model has the same features either way."""
    free = list(features)
    while True:
        model = _fit_logistic(rows, labels, free, l2=l2, iterations=iterations)
        wrong = [
            (w, f)
            for f, w in zip(model.features, model.coef, strict=True)
            if f in positive and w < 0
        ]
        if not wrong:
            break
        free.remove(min(wrong)[1])
    fitted = dict(
        zip(model.features, zip(model.mean, model.scale, model.coef, strict=True), strict=True)
    )
    held = (0.0, 1.0, 0.0)  # (mean, scale, coefficient) of a feature held at zero
    return ConfidenceModel(
        tuple(features),
        tuple(fitted.get(f, held)[0] for f in features),
        tuple(fitted.get(f, held)[1] for f in features),
        tuple(fitted.get(f, held)[2] for f in features),
        model.intercept,
    )


def _fit_logistic(
    rows: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    features: Sequence[str],
    *,
    l2: float,
    iterations: int,
) -> ConfidenceModel:
    if len(rows) != len(labels) or len(rows) < 4:
        raise ValueError(f"need at least 4 labelled rows, got {len(rows)}")
    x = np.array([[float(r[f]) for f in features] for r in rows], dtype=np.float64)  # (n, d)
    y = np.array(labels, dtype=np.float64)  # (n,)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    standard = np.clip((x - mean) / scale, -Z_CLIP, Z_CLIP)  # as ConfidenceModel.predict
    z = np.hstack([np.ones((len(x), 1)), standard])  # (n, d+1)
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return ConfidenceModel(
        tuple(features),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in scale),
        tuple(float(v) for v in w[1:]),
        float(w[0]),
    )


def expected_calibration_error(
    probs: Sequence[float], labels: Sequence[bool], bins: int = 10
) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x share of rows."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def auroc(probs: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``probs`` for right (True) against wrong (False) answers:
    the chance that a right answer has a higher confidence than a wrong one, ties counted
    half (the Mann-Whitney form). 1.0 separates perfectly, 0.5 is chance, 0.0 is inverted.
    When only one class is present (or no rows) the area is undefined: 0.5 is reported, so
    the figure is never NaN."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} confidences for {len(y)} labels")
    right, wrong = p[y], p[~y]
    if len(right) == 0 or len(wrong) == 0:
        return 0.5
    # (n_right, n_wrong) comparisons: a few hundred test answers, so the pairs fit easily
    above = (right[:, None] > wrong[None, :]).sum()
    ties = (right[:, None] == wrong[None, :]).sum()
    return float((above + 0.5 * ties) / (len(right) * len(wrong)))


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and what it leaves on the rows it was chosen on: the share of answers
    shown (``coverage``) and the share of those that are right (``precision``); ``reached``
    is False when no threshold reaches the target (then the fallback 0.5)."""

    threshold: float
    precision: float
    coverage: float
    reached: bool


def threshold_for_precision(
    probs: Sequence[float], labels: Sequence[bool], precision: float
) -> ThresholdChoice:
    """The lowest threshold whose shown answers (confidence >= threshold) are right at least
    ``precision`` of the time, on the rows given (fit it on the tune split); 0.5, with
    ``reached`` False, when none does. Only whole groups of equal confidence are shown or
    withheld, as serving does."""
    pairs = sorted(zip(probs, labels, strict=True))
    n = len(pairs)
    right_from = [0] * (n + 1)  # right answers among pairs[i:]
    for i in range(n - 1, -1, -1):
        right_from[i] = right_from[i + 1] + int(pairs[i][1])
    for i, (p, _) in enumerate(pairs):
        if i and pairs[i - 1][0] == p:
            continue  # a threshold at p shows the whole group of equal confidence
        kept = n - i
        if right_from[i] >= precision * kept - 1e-9:
            return ThresholdChoice(float(p), right_from[i] / kept, kept / n, True)
    kept_labels = [y for p, y in pairs if p >= 0.5]
    return ThresholdChoice(
        0.5,
        sum(kept_labels) / len(kept_labels) if kept_labels else 0.0,
        len(kept_labels) / max(1, n),
        False,
    )


def choose_threshold(probs: Sequence[float], labels: Sequence[bool], max_wrong: float) -> float:
    """The lowest threshold at which at most ``max_wrong`` of the answers kept are wrong
    (fitted on the tune split): ``threshold_for_precision`` with precision 1 - ``max_wrong``.
    0.5 if none reaches it."""
    return threshold_for_precision(probs, labels, 1 - max_wrong).threshold


def wrong_above(
    probs: Sequence[float], labels: Sequence[bool], threshold: float
) -> dict[str, float]:
    """Of the answers at or above ``threshold``: how many, and what share of them are wrong;
    and what share of all wrong answers got through."""
    kept = [y for p, y in zip(probs, labels, strict=True) if p >= threshold]
    wrong_total = sum(1 for y in labels if not y)
    wrong_kept = sum(1 for y in kept if not y)
    return {
        "answered": len(kept) / max(1, len(labels)),
        "wrong_share_of_answered": wrong_kept / len(kept) if kept else 0.0,
        "wrong_let_through": wrong_kept / wrong_total if wrong_total else 0.0,
    }


def fit_calibration(
    rows: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    *,
    max_wrong: float = 0.25,
    l2: float = 1.0,
    meta: dict[str, Any] | None = None,
) -> Calibration:
    """Both models (with logprob signals when every row has them) and the threshold
    (``threshold_for_precision`` at 1 - ``max_wrong``); ``meta`` gains what the threshold
    leaves on these rows: ``threshold_target_precision``, ``threshold_precision``,
    ``threshold_coverage`` (share of answers shown) and ``threshold_reached``."""
    with_lp = None
    if rows and all(all(f in r for f in LOGPROB_FEATURES) for r in rows):
        with_lp = fit_logistic(
            rows, labels, BASE_FEATURES + LOGPROB_FEATURES, l2=l2, positive=POSITIVE_FEATURES
        )
    without = fit_logistic(rows, labels, BASE_FEATURES, l2=l2, positive=POSITIVE_FEATURES)
    model = with_lp or without
    probs = [model.predict(r) for r in rows]
    choice = threshold_for_precision(probs, labels, 1 - max_wrong)
    fitted = {
        "threshold_target_precision": round(1 - max_wrong, 4),
        "threshold_precision": round(choice.precision, 4),
        "threshold_coverage": round(choice.coverage, 4),
        "threshold_reached": choice.reached,
    }
    # Not rounded: rounding up would withhold the answers at the threshold that it counted.
    return Calibration(with_lp, without, choice.threshold, {**(meta or {}), **fitted})


def reliability_diagram(
    probs: Sequence[float],
    labels: Sequence[bool],
    path: Path,
    *,
    bins: int = 10,
    title: str = "RAG confidence: reliability",
    baseline: tuple[str, Sequence[float]] | None = None,
) -> Path:
    """Accuracy per confidence bin against the diagonal, with the ECE in the legend; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(values: Sequence[float]) -> tuple[list[float], list[float], list[int]]:
        p = np.asarray(values, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        idx = np.minimum((p * bins).astype(int), bins - 1)
        xs, ys, ns = [], [], []
        for b in range(bins):
            mask = idx == b
            if mask.any():
                xs.append(float(p[mask].mean()))
                ys.append(float(y[mask].mean()))
                ns.append(int(mask.sum()))
        return xs, ys, ns

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    series = [("calibrated", probs)] + ([baseline] if baseline else [])
    for name, values in series:
        xs, ys, ns = curve(values)
        ece = expected_calibration_error(values, labels, bins)
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
        if name == "calibrated":
            for x, y, n in zip(xs, ys, ns, strict=True):
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("confidence")
    ax.set_ylabel("share of answers correct")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} (n={len(labels)})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration_metrics(examples: Sequence[Any], split: str = "test") -> dict[str, float]:
    """ECE, AUROC (``auroc``: 0.5 when the split's answers are all right or all wrong) and
    answer accuracy of RAG examples of ``split`` (ExampleResult with scores ``confidence``
    and ``correct``); empty when there are none. Where the rows also carry
    ``answered_right`` and ``wrong_shown`` (``evaluation.automatic``): ``coverage``, the share
    of answers shown at the stored threshold, and ``shown_precision``, the share of those that
    are right (0 when nothing is shown, so withholding everything does not look precise)."""
    rows = [e for e in examples if e.kind == "rag" and e.split == split]
    if not rows:
        return {}
    probs = [e.scores["confidence"] for e in rows]
    labels = [bool(e.scores["correct"]) for e in rows]
    out = {
        f"rag_{split}_ece": expected_calibration_error(probs, labels),
        f"rag_{split}_auroc": auroc(probs, labels),
        f"rag_{split}_accuracy": sum(labels) / len(labels),
        f"rag_{split}_mean_confidence": float(np.mean(probs)),
        f"rag_{split}_examples": float(len(rows)),
    }
    if all("answered_right" in e.scores and "wrong_shown" in e.scores for e in rows):
        right = sum(e.scores["answered_right"] for e in rows)
        shown = right + sum(e.scores["wrong_shown"] for e in rows)
        out[f"rag_{split}_coverage"] = shown / len(rows)
        out[f"rag_{split}_shown_precision"] = right / shown if shown else 0.0
    return out


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
