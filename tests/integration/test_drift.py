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
    assert result.embedding_auc is not None and result.embedding_auc < 0.75
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
        ref, cur, tmp_path / "b.html", thresholds=DriftThresholds(1.0, 1.0, False)
    )
    assert lenient.passed
    with pytest.raises(NotEnoughTraffic, match="holds 5 requests"):
        drift_report(ref, cur.head(5), tmp_path / "c.html")
