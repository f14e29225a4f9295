"""The service under faults, on a home of its own (its own embedded Postgres, which the tests
stop and start): hammered from the moment it starts, Postgres going away and coming back
while it answers RAG, and SIGTERM to `refinery serve` stopping every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from refinery.core.processes import stop_tree
from refinery.core.settings import OFFLINE_ENV, Settings
from tests.conftest import SAMPLE_CORPUS
from tests.support import REFINERY, free_port, wait_for

# Its own home, corpus, Bento and services: minutes before the first test can start.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "faults-chat"


@dataclass
class Home:
    settings: Settings
    env: dict[str, str]


@pytest.fixture(scope="module")
def home(tmp_path_factory, embedder) -> Iterator[Home]:
    """A home with the sample corpus ingested and SmolLM2 (with its OpenVINO export, shared
    with the other serving tests through the session's models folder) as the champion Bento."""
    from refinery.core.stores import make_engine, prepare_mlflow, stop_embedded_postgres
    from refinery.corpus.chunking import ChunkingConfig
    from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
    from refinery.retrieval.vectorstore import VectorStore
    from serving.bento import build_bento
    from training.base_model import resolve_base_model
    from training.openvino_export import export_openvino
    from training.registry import register_folder

    shared = Settings.from_env()
    settings = Settings(home=tmp_path_factory.mktemp("faults") / "home")
    store = VectorStore(make_engine(settings=settings, create_schema=True))
    sync_documents(store, SAMPLE_CORPUS)
    sync_chunks(store, make_chunker(ChunkingConfig(), embedder))
    sync_embeddings(store, embedder, batch_size=32)
    store.engine.dispose()
    base = Path(resolve_base_model(None, shared.models_dir).path)
    openvino, _ = export_openvino(base, shared.models_dir / "openvino-int8")
    uri = prepare_mlflow(settings)
    register_folder(
        uri, MODEL, base, alias="champion", artifact_root=settings.mlflow_artifacts_dir,
        extra_artifacts={"openvino": openvino},
    )  # fmt: skip
    build_bento(settings, uri, MODEL, "champion")
    env = {**os.environ, **OFFLINE_ENV, "REFINERY_HOME": str(settings.home)}
    env.pop("REFINERY_DATABASE_URL", None)
    env.update(REFINERY_REQUEST_TIMEOUT_S="20", REFINERY_STOP_GRACE_S="10")
    yield Home(settings, env)
    stop_embedded_postgres(settings)


def serve(home: Home, port: int) -> subprocess.Popen:
    """`refinery serve` as a user starts it (its own session, like a terminal's job)."""
    return subprocess.Popen(
        [REFINERY, "serve", "--port", str(port), "--follow", ""],
        env=home.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


CHAT = {"messages": [{"role": "user", "content": "What is propolis?"}], "max_tokens": 8}


def test_hammered_from_the_start_every_request_ends_quickly_with_json(home):
    """From the moment the process starts, probes and API calls either find the port closed,
    get a JSON refusal with Retry-After, or an answer: none hangs until the models load (a
    refusal arrives while the service is still loading)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(home, port)
    ready = threading.Event()

    def hammer(path: str, body: dict | None) -> list[tuple[str, bool]]:
        """This client's outcomes, each with whether the service was ready when it came."""
        outcomes: list[tuple[str, bool]] = []
        while not ready.is_set():
            try:
                if body is None:
                    r = httpx.get(url + path, timeout=30)
                else:
                    r = httpx.post(url + path, json=body, timeout=30)
                outcome = str(r.status_code)
                malformed = not _json_error(r) or (
                    r.status_code == 503 and not r.headers.get("retry-after")
                )
                if r.status_code >= 400 and path != "/readyz" and malformed:
                    outcome = f"bad {r.status_code}: {r.text[:200]}"
                if path == "/readyz" and r.status_code == 200:
                    ready.set()
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                outcome = "closed"
                ready.wait(0.1)  # the port is not open yet: try again shortly
            except httpx.TimeoutException:
                outcome = "timeout"
            outcomes.append((outcome, ready.is_set()))
        return outcomes

    clients = {
        "/readyz": None,
        "/v1/chat/completions": CHAT,
        "/v1/embeddings": {"input": "wax"},
    }
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            futures = {path: pool.submit(hammer, path, body) for path, body in clients.items()}
            try:
                assert ready.wait(300), "the service never became ready"
            finally:
                ready.set()  # every client stops, whatever happened
            # A client that died raises here; each one must have made requests.
            outcomes = {path: f.result(timeout=120) for path, f in futures.items()}
        answered = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert answered.status_code == 200
    finally:
        stop_tree(proc, timeout=15)
    assert all(outcomes.values()), {p: len(o) for p, o in outcomes.items()}
    kinds = {o for mine in outcomes.values() for o, _ in mine}
    assert "timeout" not in kinds, "a request hung while the service started"
    assert kinds <= {"closed", "200", "503"}, kinds
    refusals = [after for mine in outcomes.values() for o, after in mine if o == "503"]
    assert refusals, "no request met the starting service"
    # Refused at once, not after loading: refusals came back while it was still loading.
    assert not all(refusals), "every 503 came only after the service was ready"


def _json_error(r: httpx.Response) -> bool:
    try:
        return bool(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return False


def wait_until_ready(url: str) -> None:
    wait_for(
        lambda: httpx.get(url + "/readyz", timeout=5).status_code == 200,
        300,
        "the service to become ready",
        interval=1,
    )


@pytest.fixture(scope="module")
def running(home) -> Iterator[str]:
    port = free_port()
    proc = serve(home, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url)
        yield url
    finally:
        stop_tree(proc, timeout=15)


def rag(url: str) -> httpx.Response:
    body = {"question": f"How do I count varroa mites? ({time.monotonic_ns()})", "k": 2}
    return httpx.post(url + "/rag", json=body, timeout=60)


def test_postgres_away_then_back_503_with_retry_after_then_answers(home, running):
    from refinery.core.stores import start_embedded_postgres, stop_embedded_postgres

    assert rag(running).status_code == 200
    assert stop_embedded_postgres(home.settings)
    try:
        away = rag(running)
        assert away.status_code == 503, away.text
        assert away.json()["error"]["code"] == "store_unavailable"
        assert int(away.headers["retry-after"]) > 0
        # Chat does not need the store: it keeps answering.
        assert httpx.post(running + "/v1/chat/completions", json=CHAT, timeout=60).is_success
    finally:
        start_embedded_postgres(home.settings, persistent=True)
    # It answers again once Postgres is back (each try a new question, so never from cache).
    answers: list[httpx.Response] = []

    def answered() -> bool:
        answers.append(rag(running))
        return answers[-1].status_code == 200

    try:
        wait_for(answered, 60, "RAG answers again after Postgres came back")
    except TimeoutError:
        pytest.fail(f"still failing: {answers[-1].status_code} {answers[-1].text[:500]}")
    assert {r.status_code for r in answers} <= {200, 503}, [r.text for r in answers]


def test_sigterm_stops_every_process_the_service_started(home):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(home, port)
    try:
        wait_until_ready(url)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2  # bentoml's arbiter and the services' workers
        # A request in flight when SIGTERM arrives finishes (graceful), then everything stops.
        body = {**CHAT, "max_tokens": 24, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            os.kill(proc.pid, signal.SIGTERM)
            events = [line for line in resp.iter_lines() if line.startswith("data:")]
        assert events and json.loads(events[1][5:])["choices"]  # it kept streaming
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        if proc.poll() is None:
            stop_tree(proc)
