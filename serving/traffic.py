"""The traffic log: what the service saw, written to Postgres without slowing or failing a request.

``TrafficLog.record`` is called on the request path; it samples, builds a row and puts it on a
bounded queue (never blocks). One background thread drains the queue in batches of up to
``batch_size`` rows, or every ``flush_s``, hashes what the privacy setting says, and COPYs them
in (parameters travel separately from the statement: no SQL is built from request text).
A full queue or a database error drops rows and counts them (``dropped``, and the ``on_drop``
callback the service turns into a Prometheus counter); the request has already been answered.
After a database error the writer waits ``retry_s`` before it tries again, dropping what
arrives meanwhile, so a dead database costs one failed connect per ``retry_s``, not one per row.

Privacy: ``privacy="hash"`` stores only keyed hashes (HMAC-SHA256 with ``REFINERY_TRAFFIC_SALT``)
and lengths of prompts and answers; ``"full"`` stores the texts too (the drift report embeds
them, and logged conversations can be proposed as training data).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from refinery.core.schema import create_schema, traffic_log

# Its settings (sample rate, privacy, salt, queue, batch, flush) are declared with their
# REFINERY_TRAFFIC_* variables in refinery.core.settings.
from refinery.core.settings import TrafficSettings

log = logging.getLogger("refinery.traffic")

COLUMNS = [c.name for c in traffic_log.columns]
COPY_SQL = f"COPY {traffic_log.name} ({', '.join(COLUMNS)}) FROM STDIN"
JSON_COLUMNS = ("retrieval_scores", "sources")


class DropCounter:
    """What a background writer dropped, by reason (``counts``), each drop also reported to
    ``on_drop`` (the service's Prometheus counter); a failing callback never stops the writer."""

    def __init__(
        self, reasons: tuple[str, ...], on_drop: Callable[[str, int], None] | None, what: str
    ) -> None:
        self.counts: dict[str, int] = dict.fromkeys(reasons, 0)
        self._on_drop, self._what = on_drop, what

    def __call__(self, reason: str, n: int) -> None:
        self.counts[reason] += n
        if self._on_drop is not None:
            try:
                self._on_drop(reason, n)
            except Exception:  # a metrics hiccup must not kill the writer
                log.exception("%s: drop callback failed", self._what)


def new_answer_id() -> str:
    """The id of one served answer: its traffic-log ``request_id``, the ``x-refinery-answer-id``
    header and (as ``chatcmpl-<id>``) a chat completion's id."""
    return uuid.uuid4().hex


def text_hash(text: str, salt: str = "") -> str:
    return hmac.new(salt.encode(), text.encode(), hashlib.sha256).hexdigest()


class TrafficLog:
    """A sampled, bounded, batched writer of ``traffic_log`` rows (see the module docstring)."""

    def __init__(
        self,
        engine_factory: Callable[[], sa.Engine],
        settings: TrafficSettings | None = None,
        *,
        on_drop: Callable[[str, int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or TrafficSettings()
        self._engine_factory = engine_factory
        self._engine: sa.Engine | None = None
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(self.settings.max_queue)
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self.written = 0
        self._drop = DropCounter(("queue_full", "db_error"), on_drop, "traffic log")
        self.dropped = self._drop.counts
        self._thread = threading.Thread(target=self._run, name="traffic-log", daemon=True)
        self._thread.start()

    # -- request path --
    def record(
        self,
        *,
        endpoint: str,
        model: str,
        prompt: str,
        answer: str | None,
        latency_s: float,
        status: int = 200,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
        cache_hit: bool = False,
        guard: str = "passed",
        retrieval_scores: list[float] | None = None,
        answer_id: str | None = None,
        sources: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Queue one row if this request is sampled; never blocks. True if it was queued.
        ``answer_id``: the id the response carries (None: a new one); ``sources``: the chunks
        a RAG answer was given ({chunk_id, source, score})."""
        s = self.settings
        if s.sample_rate < 1.0 and self._rng.random() >= s.sample_rate:
            return False
        # Only what the request knows; hashing and the rest happen in the writer thread.
        row = {
            "request_id": answer_id or new_answer_id(),
            "ts": datetime.now(UTC),
            "endpoint": endpoint,
            "model": model,
            "status": status,
            "prompt": prompt,
            "answer": answer,
            "retrieval_scores": retrieval_scores or [],
            "latency_ms": latency_s * 1000.0,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost_usd": cost_usd,
            "cache_hit": cache_hit,
            "guard": guard,
            "sources": sources or [],
        }
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._drop("queue_full", 1)
            return False
        return True

    # -- background writer --
    def _take_batch(self) -> list[dict[str, Any]]:
        """Rows for one transaction: from the first row, gather for up to ``flush_s`` (or until
        ``batch_size``). Without the wait, a steady trickle of requests would make a commit per
        row or two, and the commits, not the rows, would cost the CPU."""
        try:
            first = self._queue.get(timeout=self.settings.flush_s)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.flush_s
        while len(batch) < self.settings.batch_size:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or self._stop.is_set():
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        down_until = 0.0
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take_batch()
            if not batch:
                continue
            try:
                if time.monotonic() < down_until:
                    self._drop("db_error", len(batch))
                    continue
                try:
                    self._write(batch)
                    self.written += len(batch)
                except Exception as err:  # noqa: BLE001 - any write failure drops rows, never the writer
                    self._engine = None  # reconnect from scratch next time
                    down_until = time.monotonic() + self.settings.retry_s
                    self._drop("db_error", len(batch))
                    log.warning(
                        "traffic log: dropped %d rows, the database is unavailable (%s); "
                        "retrying in %.0f s",
                        len(batch),
                        str(err).splitlines()[0][:200],
                        self.settings.retry_s,
                    )
            finally:
                for _ in batch:
                    self._queue.task_done()

    def finish(self, row: dict[str, Any]) -> dict[str, Any]:
        """A queued row as the table stores it: ids, hashes, lengths, the privacy setting."""
        s = self.settings
        prompt, answer = row["prompt"], row["answer"]
        scores = [round(float(x), 6) for x in row["retrieval_scores"]]
        keep = s.privacy == "full"
        return {
            **row,
            "prompt": prompt if keep else None,
            "answer": answer if keep else None,
            "prompt_sha256": text_hash(prompt, s.salt),
            "answer_sha256": text_hash(answer, s.salt) if answer is not None else None,
            "prompt_chars": len(prompt),
            "answer_chars": len(answer or ""),
            "retrieval_scores": scores,
            "top_score": max(scores) if scores else None,
        }

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """COPY the batch in (psycopg 3): a fraction of the CPU of a multi-row INSERT, which
        matters because this thread shares the interpreter with the request handlers."""
        rows = [self.finish(r) for r in rows]
        if self._engine is None:
            engine = self._engine_factory()
            create_schema(engine)  # idempotent: a database from an older release gains the table
            self._engine = engine
        with self._engine.begin() as conn:
            raw = conn.connection.driver_connection
            cursor = raw.cursor() if raw is not None else None
            if cursor is None or not hasattr(cursor, "copy"):  # another driver: plain INSERT
                conn.execute(sa.insert(traffic_log), rows)
                return
            with cursor, cursor.copy(COPY_SQL) as copy:
                for r in rows:
                    copy.write_row(
                        [json.dumps(r[c]) if c in JSON_COLUMNS else r[c] for c in COLUMNS]
                    )

    # -- control --
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued row was written or dropped. True if that happened in time."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:  # rows queued, or taken but not yet written
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._engine is not None:
            self._engine.dispose()
