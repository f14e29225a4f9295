"""Traffic log (its queue, sampling, privacy and drop accounting, with stand-in engines) and
the cost figures. The drift report (real Evidently, real MiniLM) is in the integration tier."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pandas as pd
import pytest

from evaluation.monitoring import (
    NotEnoughTraffic,
    cost_plot,
    cost_summary,
)
from serving.traffic import TrafficLog, TrafficSettings, text_hash


def _record(log: TrafficLog, i: int = 0) -> bool:
    return log.record(
        endpoint="chat",
        model="m/1",
        prompt=f"question {i}",
        answer="answer",
        latency_s=0.1,
        retrieval_scores=[0.5, 0.7],
    )


class BrokenEngine(Exception):
    pass


def _dead_engine():
    raise BrokenEngine("connection refused")


def test_dead_database_drops_rows_and_counts_them_without_blocking():
    drops: list[tuple[str, int]] = []
    log = TrafficLog(
        _dead_engine,
        TrafficSettings(flush_s=0.05, retry_s=60),
        on_drop=lambda reason, n: drops.append((reason, n)),
    )
    try:
        assert all(_record(log, i) for i in range(5))
        assert log.flush(5)
        for i in range(3):  # inside the back-off: dropped without another connect attempt
            _record(log, i)
        assert log.flush(5)
    finally:
        log.close()
    assert log.written == 0
    assert log.dropped["db_error"] == 8
    assert sum(n for reason, n in drops if reason == "db_error") == 8


def test_full_queue_drops_instead_of_blocking():
    gate = threading.Event()

    def slow_engine():
        gate.wait(5)
        raise BrokenEngine("still down")

    log = TrafficLog(slow_engine, TrafficSettings(max_queue=3, batch_size=1, flush_s=0.05))
    try:
        queued = [_record(log, i) for i in range(20)]  # the writer is stuck on its first batch
        assert queued.count(False) >= 15
        assert log.dropped["queue_full"] == queued.count(False)
    finally:
        gate.set()
        log.close()


class RecordingEngine:
    """Stands in for an engine: keeps what ``_write`` would insert."""

    def __init__(self) -> None:
        self.rows: list[dict] = []


def test_sampling_and_hash_privacy(monkeypatch: pytest.MonkeyPatch):
    sink = RecordingEngine()
    monkeypatch.setattr(
        TrafficLog, "_write", lambda self, rows: sink.rows.extend(self.finish(r) for r in rows)
    )
    settings = TrafficSettings(sample_rate=0.25, privacy="hash", salt="pepper", flush_s=0.05)
    log = TrafficLog(lambda: None, settings, rng=random.Random(7))
    try:
        for i in range(400):
            _record(log, i)
        assert log.flush(5)
    finally:
        log.close()
    assert 60 < len(sink.rows) < 140  # about a quarter
    row = sink.rows[0]
    assert row["prompt"] is None and row["answer"] is None
    keyed = {text_hash(f"question {i}", "pepper") for i in range(400)}
    plain = {text_hash(f"question {i}", "") for i in range(400)}
    assert {r["prompt_sha256"] for r in sink.rows} <= keyed
    assert not {r["prompt_sha256"] for r in sink.rows} & plain  # keyed, not a bare hash
    assert row["top_score"] == pytest.approx(0.7)
    assert log.written == len(sink.rows)


def test_settings_from_env_reject_bad_values():
    with pytest.raises(ValueError, match="REFINERY_TRAFFIC_SAMPLE"):
        TrafficSettings.from_env({"REFINERY_TRAFFIC_SAMPLE": "2"})
    with pytest.raises(ValueError, match="REFINERY_TRAFFIC_PRIVACY"):
        TrafficSettings.from_env({"REFINERY_TRAFFIC_PRIVACY": "none"})
    with pytest.raises(ValueError, match="must be a number"):
        TrafficSettings.from_env({"REFINERY_TRAFFIC_SAMPLE": "half"})
    assert TrafficSettings.from_env({}).privacy == "full"


# --- cost ----------------------------------------------------------------------------------


def test_cost_summary_figures_and_plot(tmp_path: Path):
    frame = pd.DataFrame(
        {
            "request_id": ["a", "b", "c", "d"],
            "ts": pd.to_datetime(
                ["2026-11-20T10:00Z", "2026-11-20T11:00Z", "2026-11-21T09:00Z", "2026-11-21T09:30Z"]
            ),
            "latency_ms": [100.0, 200.0, 300.0, 400.0],
            "cost_usd": [0.001, 0.003, 0.0, 0.002],
            "cache_hit": [False, False, True, False],
            "guard": ["passed", "passed", "cached", "blocked"],
            "status": [200, 200, 200, 400],
        }
    )
    s = cost_summary(frame)
    assert s.requests == 4
    assert s.total_cost_usd == pytest.approx(0.006)
    assert s.cost_per_request_usd == pytest.approx(0.0015)
    assert s.cache_hit_rate == pytest.approx(0.25)
    assert s.guard_blocks == 1
    assert s.error_rate == pytest.approx(0.25)
    assert s.p50_latency_ms == pytest.approx(250.0)
    assert list(s.per_day["requests"]) == [2, 2]
    assert list(s.per_day["cost_usd"]) == pytest.approx([0.004, 0.002])
    png = cost_plot(frame, tmp_path / "cost.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(NotEnoughTraffic):
        cost_summary(frame.head(0))
