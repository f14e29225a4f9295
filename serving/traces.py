"""Served answers as MLflow traces, written off the request's path.

``ServedTraces.record`` is called once an answer is made. It samples (``REFINERY_TRACE_SAMPLE``)
and puts the answer on a bounded queue without blocking; a full queue drops it and counts the
drop. One background thread writes each queued answer as a trace in the experiment
``REFINERY_TRACE_EXPERIMENT``:

- a root CHAIN span named after the endpoint, whose inputs are the question (or the messages)
  and whose outputs are the answer and its sources;
- for RAG, a RETRIEVER span with the chunks the model was given (MLflow's document format, so
  the UI shows them as documents);
- an LLM span with the prompt's messages, the generated text and the token counts.

Each span keeps the times measured on the request. Tags: ``refinery.answer_id`` (the id in the
response header and the traffic log, which ``refinery explain`` follows) and the model version
that answered. When blind (the default) the version is a keyed hash, ``refinery.model_key``, so
people rating traces in the MLflow UI cannot tell which model answered; ``refinery explain``
and the review queue know the version.

When MLflow is slow or down, only this thread waits. After a failure it drops what arrives for
``retry_s`` and then tries again, so requests never wait on MLflow.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from refinery.core.lineage import TAG_ANSWER_ID, TAG_MODEL_KEY, TAG_MODEL_VERSION, model_key
from refinery.core.settings import TraceSettings
from serving.traffic import DropCounter

log = logging.getLogger("refinery.traces")

TAG_ENDPOINT = "refinery.endpoint"


@dataclass
class ServedAnswer:
    """One generated answer and the times of its parts (``time.time_ns()``)."""

    endpoint: str  # "rag" or "chat"
    answer_id: str
    model: str  # "name/version" that answered
    question: str
    messages: list[dict[str, Any]]  # the prompt the model was given
    answer: str
    started_ns: int
    generate_ns: tuple[int, int]
    ended_ns: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retrieve_ns: tuple[int, int] | None = None  # RAG only
    chunks: list[dict[str, Any]] = field(
        default_factory=list
    )  # chunk_id, source, title, text, score
    extra: dict[str, Any] = field(default_factory=dict)  # kind, confidence: RAG's outputs


class ServedTraces:
    """A sampled, bounded writer of served answers as MLflow traces (see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        settings: TraceSettings | None = None,
        *,
        salt: str = "",
        on_drop: Callable[[str, int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or TraceSettings()
        self.tracking_uri, self.salt = tracking_uri, salt
        self._rng = rng or random.Random()
        self._queue: queue.Queue[ServedAnswer] = queue.Queue(self.settings.max_queue)
        self._stop = threading.Event()
        self._experiment_id: str | None = None
        self.written = 0
        self._drop = DropCounter(("queue_full", "mlflow_error"), on_drop, "served traces")
        self.dropped = self._drop.counts
        self._thread: threading.Thread | None = None
        if self.settings.sample_rate > 0:
            self._thread = threading.Thread(target=self._run, name="served-traces", daemon=True)
            self._thread.start()

    # -- request path --
    def record(self, answer: ServedAnswer) -> bool:
        """Queue the answer if it is sampled; never blocks. True if it was queued."""
        rate = self.settings.sample_rate
        if rate <= 0 or (rate < 1.0 and self._rng.random() >= rate):
            return False
        try:
            self._queue.put_nowait(answer)
        except queue.Full:
            self._drop("queue_full", 1)
            return False
        return True

    def tags(self, answer: ServedAnswer) -> dict[str, str]:
        who = (
            {TAG_MODEL_KEY: model_key(answer.model, self.salt)}
            if self.settings.blind
            else {TAG_MODEL_VERSION: answer.model}
        )
        return {TAG_ANSWER_ID: answer.answer_id, TAG_ENDPOINT: answer.endpoint, **who}

    # -- background writer --
    def _run(self) -> None:
        down_until = 0.0
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                answer = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if time.monotonic() < down_until:
                    self._drop("mlflow_error", 1)
                    continue
                try:
                    self._write(answer)
                    self.written += 1
                except Exception as err:  # noqa: BLE001 - any failure drops the trace, never the writer
                    down_until = time.monotonic() + self.settings.retry_s
                    self._experiment_id = None
                    self._drop("mlflow_error", 1)
                    log.warning(
                        "served traces: dropped a trace, MLflow is unavailable (%s); retrying "
                        "in %.0f s", str(err).splitlines()[0][:200] if str(err) else type(err).__name__,
                        self.settings.retry_s,
                    )  # fmt: skip
            finally:
                self._queue.task_done()

    def _experiment(self, client: Any) -> str:
        """The experiment's id, asked of the server for every trace: the exporter that writes
        the trace afterwards swallows its errors, so this is where an absent MLflow shows."""
        if self._experiment_id is None:
            from refinery.core.tracking import ensure_experiment

            self._experiment_id = ensure_experiment(client, self.settings.experiment, None)
        else:
            client.get_experiment(self._experiment_id)
        return self._experiment_id

    def _write(self, a: ServedAnswer) -> None:
        import mlflow

        from refinery.core.tracking import client_for

        client = client_for(self.tracking_uri)
        experiment_id = self._experiment(client)  # raises when MLflow is down: nothing half-written
        # MLflow exports finished traces through the process-wide tracking URI; in the service
        # that is this store (the service's other MLflow calls use explicit clients).
        if mlflow.get_tracking_uri() != self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        outputs: dict[str, Any] = {"answer": a.answer, **a.extra}
        if a.chunks:
            outputs["sources"] = [
                {k: c.get(k) for k in ("source", "title", "chunk_id", "score")} for c in a.chunks
            ]
        inputs = {"question": a.question} if a.endpoint == "rag" else {"messages": a.messages}
        root = client.start_trace(
            a.endpoint, span_type="CHAIN", inputs=inputs, tags=self.tags(a),
            experiment_id=experiment_id, start_time_ns=a.started_ns,
        )  # fmt: skip
        trace_id = root.trace_id
        if a.retrieve_ns is not None:
            span = client.start_span(
                "retrieve", trace_id, root.span_id, span_type="RETRIEVER",
                inputs={"query": a.question}, start_time_ns=a.retrieve_ns[0],
            )  # fmt: skip
            documents = [
                {
                    "id": c.get("chunk_id"),
                    "page_content": c.get("text", ""),
                    "metadata": {
                        "doc_uri": c.get("source"),
                        "title": c.get("title"),
                        "score": c.get("score"),
                        "chunk_id": c.get("chunk_id"),
                    },
                }
                for c in a.chunks
            ]
            client.end_span(trace_id, span.span_id, outputs=documents, end_time_ns=a.retrieve_ns[1])
        span = client.start_span(
            "generate", trace_id, root.span_id, span_type="LLM",
            inputs={"messages": a.messages}, start_time_ns=a.generate_ns[0],
        )  # fmt: skip
        client.end_span(
            trace_id, span.span_id, outputs={"text": a.answer},
            attributes={"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens},
            end_time_ns=a.generate_ns[1],
        )  # fmt: skip
        client.end_trace(trace_id, outputs=outputs, end_time_ns=a.ended_ns)

    # -- control --
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued answer was written or dropped. True if that happened in time."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        if self.written:
            import mlflow

            mlflow.flush_trace_async_logging()
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the writer: what is queued gets ``timeout`` seconds, the rest is dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
