"""The drift report on synthetic traffic: real Evidently, real MiniLM (tens of seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.monitoring import DriftThresholds, NotEnoughTraffic, drift_report

pytestmark = pytest.mark.integration

# --- drift ----------------------------------------------------------------------------

TOPICS = [
    "How long does a {} bee take to develop?",
    "When should I check the {} hive for varroa mites?",
    "What does the {} dance tell other bees?",
    "Where is the best place to site a {} apiary?",
    "How does a {} queen mate?",
]
WORDS = ["worker", "young", "strong", "spring", "new", "small", "healthy", "busy"]
SHIFTED = [
    "Compare interest rates for a {} mortgage refinance",
    "Write SQL that joins the {} orders table with customers",
    "What is the {} exchange rate of the euro to the yen?",
]


def traffic(n: int, templates: list[str], score: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    prompts = [
        templates[i % len(templates)].format(WORDS[rng.integers(len(WORDS))]) for i in range(n)
    ]
    return pd.DataFrame(
        {
            "request_id": [f"{seed}-{i}" for i in range(n)],
            "ts": pd.date_range("2026-11-20", periods=n, freq="13min", tz="UTC"),
            "prompt": prompts,
            "answer": ["About three weeks, depending on the season."] * n,
            "top_score": rng.normal(score, 0.04, n),
            "latency_ms": rng.normal(800, 80, n),
            "cost_usd": rng.normal(2e-5, 2e-6, n),
            "cache_hit": rng.random(n) < 0.3,
            "guard": np.where(rng.random(n) < 0.05, "blocked", "passed"),
            "status": 200,
        }
    )


def test_drift_not_raised_on_unshifted_traffic(tmp_path: Path, embedder):
    result = drift_report(
        traffic(80, TOPICS, 0.62, seed=1),
        traffic(80, TOPICS, 0.62, seed=2),
        tmp_path / "same.html",
        embed=embedder.encode,
    )
    assert result.passed, result.failed_because
    assert result.embedding_auc is not None and not result.embedding_drifted
    assert "top_score" not in result.drifted_columns
    assert (tmp_path / "same.html").stat().st_size > 10_000


def test_drift_caught_on_shifted_traffic(tmp_path: Path, embedder):
    result = drift_report(
        traffic(80, TOPICS, 0.62, seed=1),
        traffic(80, SHIFTED, 0.35, seed=3),  # off-topic prompts, poor retrieval
        tmp_path / "shifted.html",
        embed=embedder.encode,
    )
    assert not result.passed
    assert result.embedding_auc is not None and result.embedding_auc > 0.9
    assert "top_score" in result.drifted_columns
    assert any("embeddings" in r for r in result.failed_because)
    assert result.metrics()["prompt_embedding_auc"] == result.embedding_auc


def test_drift_thresholds_decide_and_small_windows_are_refused(tmp_path: Path):
    ref = traffic(40, TOPICS, 0.62, seed=1)
    cur = traffic(40, TOPICS, 0.30, seed=4)  # only retrieval scores move
    strict = drift_report(ref, cur, tmp_path / "a.html")
    assert "retrieval scores drifted" in strict.failed_because
    lenient = drift_report(
        ref, cur, tmp_path / "b.html", thresholds=DriftThresholds(1.0, None, False)
    )
    assert lenient.passed
    with pytest.raises(NotEnoughTraffic, match="holds 5 requests"):
        drift_report(ref, cur.head(5), tmp_path / "c.html")


def busy(n: int, seed: int, shifted: bool = False) -> pd.DataFrame:
    """A day of traffic: on-topic prompts; shifted, prompts three times as long, three times
    the latency and lower retrieval scores (a change a person would call drift)."""
    frame = traffic(n, TOPICS, 0.45 if shifted else 0.62, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    frame["latency_ms"] = rng.lognormal(np.log(2400 if shifted else 800), 0.3, n)
    frame["cost_usd"] = rng.lognormal(np.log(2e-5), 0.2, n)
    if shifted:
        frame["prompt"] = frame["prompt"] + " " + frame["prompt"] + " " + frame["prompt"]
    return frame


@pytest.mark.parametrize("rows", [200, 1_500, 10_000])
def test_the_verdict_holds_at_every_volume(tmp_path: Path, rows: int):
    """Two windows of one distribution pass and a shifted window fails, at 200 rows (K-S
    p-values), 1,500 and 10,000 (normed Wasserstein distances): each column is judged by the
    method Evidently used for it, against that method's threshold."""
    same = drift_report(busy(rows, 1), busy(rows, 2), tmp_path / "same.html")
    assert same.passed, same.failed_because
    assert same.drifted_share <= 0.25, same.scores()
    method = same.column_drift["latency_ms"].method
    assert ("K-S" in method) == (rows <= 1000), method
    moved = drift_report(busy(rows, 1), busy(rows, 3, shifted=True), tmp_path / "moved.html")
    assert not moved.passed
    assert {"top_score", "latency_ms", "prompt_length"} <= set(moved.drifted_columns)
    assert "retrieval scores drifted" in moved.failed_because
    for col, d in moved.column_drift.items():  # a verdict always agrees with its method
        if "p_value" in d.method:
            assert d.drifted == (d.score < d.threshold), (col, d)
        elif d.drifted:
            assert d.score >= d.threshold, (col, d)


def test_embedding_drift_uses_its_methods_own_decision_at_volume(tmp_path: Path, embedder):
    """1,500 rows (each distinct prompt embedded once): the same topics do not drift; other
    topics do, by the classifier's AUC above 0.55 (Evidently's threshold at this size)."""
    same = drift_report(busy(1500, 1), busy(1500, 2), tmp_path / "s.html", embed=embedder.encode)
    assert not same.embedding_drifted and same.passed, (same.embedding_auc, same.failed_because)
    other = traffic(1500, SHIFTED, 0.62, seed=5)
    moved = drift_report(busy(1500, 1), other, tmp_path / "m.html", embed=embedder.encode)
    assert moved.embedding_drifted and moved.embedding_auc is not None
    assert moved.embedding_auc > 0.55
    assert any("embeddings" in r for r in moved.failed_because)
