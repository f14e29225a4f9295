"""Served answers as MLflow traces, on a real `mlflow server`: the gateway's chat and RAG answers
become traces with retriever and LLM spans, tagged with the answer id and a blind model key; they
can be queued for blind rating in a real Postgres; and an MLflow that hangs or is gone never holds
up an answer.

The chat model is scripted here (the code under test is what happens around it); the service
test (`test_service.py`) traces answers of a real model through `bentoml serve`."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from evaluation import review
from refinery.core.lineage import model_key
from refinery.core.settings import TraceSettings, TrafficSettings
from refinery.core.tracking import client_for
from refinery.retrieval.search import Hit
from serving.cache import InProcessCache
from serving.gateway import ANSWER_ID_HEADER, Gateway
from serving.openai_schema import Limits
from serving.traces import ServedTraces
from serving.traffic import TrafficLog
from tests.support import mlflow_server

LABEL = "traced-chat/7"
SALT = "pepper"
HITS = [
    Hit("c1", "d1", "castes.md", "Castes", 0, "A worker bee develops in 21 days.", 0.8, {}, 1, 1),
    Hit("c2", "d2", "queens.md", "Queens", 3, "A queen develops in 16 days.", 0.6, {}, 2, 2),
]
ITEM = {"messages": [{"role": "user", "content": "What do bees make?"}], "max_tokens": 8,
        "temperature": 0.0, "top_p": 1.0}  # fmt: skip
RAG = {
    "question": "How long does a worker take to develop?",
    "k": 2,
    "filters": {},
    "max_tokens": 8,
}


class ScriptedChat:
    async def current_model(self) -> str:
        return LABEL

    async def generate(self, item):
        yield {"text": "It takes 21 days.", "finished": True, "finish_reason": "stop",
               "prompt_tokens": 30, "completion_tokens": 5, "compute_s": 0.1, "model": LABEL}  # fmt: skip


def _gateway(traces: ServedTraces) -> Gateway:
    return Gateway(
        chat=ScriptedChat(), encode=lambda texts: np.eye(len(texts), 4, dtype=np.float32),
        count_tokens=lambda texts: [len(t.split()) for t in texts], screen=None,
        cache=InProcessCache(), traffic=TrafficLog(lambda: None, TrafficSettings(sample_rate=0.0)),  # type: ignore[arg-type,return-value]
        limits=Limits(), hourly_price=1.0, model_id="traced-chat", model_label=LABEL,
        embedding_model="mini", follow=False, traces=traces,
    )  # fmt: skip


def _answer(gw: Gateway, n: int = 1) -> list[str]:
    """n RAG answers and n chat answers (each asked differently: no cache hits); their ids."""

    async def run():
        ids = []
        for i in range(n):
            _, headers = await gw.rag({**RAG, "question": f"{RAG['question']} ({i})"},
                                      lambda v, k, f: HITS, None, 0.0)  # fmt: skip
            ids.append(headers[ANSWER_ID_HEADER])
            item = {**ITEM, "messages": [{"role": "user", "content": f"What do bees make? {i}"}]}
            _, headers = await gw.chat_completion(item, 0.0)
            ids.append(headers[ANSWER_ID_HEADER])
        return ids

    return asyncio.run(run())


@pytest.fixture
def quick_mlflow_errors(monkeypatch: pytest.MonkeyPatch):
    """An unreachable MLflow fails at once instead of after minutes of retries; the writer
    points MLflow's process-wide tracking URI at its server, which is put back afterwards."""
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    previous = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(previous)


def test_answers_become_blind_traces_with_retriever_and_llm_spans_and_queue_for_rating(
    tmp_path: Path, db_url: str, quick_mlflow_errors
):
    settings = TraceSettings(sample_rate=1.0, experiment="served-test")
    with mlflow_server(tmp_path / "mlflow") as url:
        traces = ServedTraces(url, settings, salt=SALT)
        gw = _gateway(traces)
        rag_id, chat_id = _answer(gw)
        assert traces.flush(60) and traces.written == 2, traces.dropped
        client = client_for(url)
        exp = client.get_experiment_by_name("served-test").experiment_id
        found = {t.info.tags["refinery.answer_id"]: t for t in client.search_traces([exp])}
        assert set(found) == {rag_id, chat_id}
        rag = found[rag_id]
        # Blind: a keyed hash of the version, never the version itself.
        assert rag.info.tags["refinery.model_key"] == model_key(LABEL, SALT)
        assert LABEL not in str(rag.info.tags)
        spans = {s.name: s for s in rag.data.spans}
        assert set(spans) == {"rag", "retrieve", "generate"}
        assert spans["retrieve"].span_type == "RETRIEVER" and spans["generate"].span_type == "LLM"
        docs = spans["retrieve"].outputs
        assert [d["id"] for d in docs] == ["c1", "c2"]
        assert docs[0]["page_content"] == HITS[0].text
        assert spans["generate"].attributes["completion_tokens"] == 5
        assert spans["rag"].outputs["sources"][0]["chunk_id"] == "c1"
        assert spans["retrieve"].start_time_ns <= spans["generate"].start_time_ns
        chat_spans = {s.name for s in found[chat_id].data.spans}
        assert chat_spans == {"chat", "generate"}

        # Queued for blind rating beside the evaluation examples: the model stays in Postgres.
        served = review.served_examples(url, "served-test", LABEL, model_key(LABEL, SALT))
        assert {e.trace_id for e in served} == {t.info.trace_id for t in found.values()}
        assert {e.kind for e in served} == {"served_rag", "served_chat"}
        engine = sa.create_engine(db_url)
        from refinery.core.schema import create_schema

        create_schema(engine)
        assert review.enqueue(engine, LABEL, served, sample=10) == 2
        assert review.enqueue(engine, LABEL, served, sample=10) == 0  # idempotent by trace
        who = review.authenticate(engine, review.add_reviewer(engine, "rae"))
        item = review.next_item(engine, who)
        assert item is not None and LABEL not in str(item)
        review.rate(engine, url, who, item["item_id"], 4)
        assert review.collect_ratings(engine, url, LABEL).ratings == [4]
        engine.dispose()
        assert (
            review.served_examples(url, "served-test", "other/1", model_key("other/1", SALT)) == []
        )
    # MLflow is gone: answers go on, the traces are dropped and counted.
    more = _answer(gw, 2)
    assert len(set(more)) == 4
    assert traces.flush(60)
    assert traces.dropped["mlflow_error"] >= 1 and traces.written == 2
    gw.close()


def test_an_mlflow_that_never_answers_holds_up_no_request(tmp_path: Path, monkeypatch):
    """A server that accepts connections and never replies: the writer waits on it while the
    gateway answers every request, and drops what its queue cannot hold."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sink.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sink.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    traces = ServedTraces(
        f"http://127.0.0.1:{sink.getsockname()[1]}",
        TraceSettings(sample_rate=1.0, max_queue=3),
    )
    gw = _gateway(traces)
    try:
        ids = _answer(gw, 5)  # ten answers while the first trace waits for its reply
        assert len(set(ids)) == 10
        assert accepted, "the writer never reached the server"
        assert traces.written == 0 and traces._queue.unfinished_tasks >= 1  # still waiting
        assert traces.dropped["queue_full"] >= 10 - 3 - 1
    finally:
        gw.close()  # returns although the writer is still stuck on its request
        stop.set()
        for conn in accepted:
            conn.close()
        sink.close()
