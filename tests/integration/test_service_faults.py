"""The service under faults, on a home of its own (its own embedded Postgres, which the tests
stop and start): hammered from the moment it starts, Postgres going away and coming back
while it answers RAG, and SIGTERM to `refinery serve` stopping every process it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from refinery.core.processes import stop_tree
from refinery.core.settings import OFFLINE_ENV, Settings
from tests.conftest import SAMPLE_CORPUS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "faults-chat"
REFINERY = str(Path(sys.executable).parent / "refinery")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    get a JSON refusal with Retry-After, or an answer: none hangs until the models load."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(home, port)
    outcomes: list[tuple[str, str, float]] = []  # (path, outcome, seconds)
    ready = threading.Event()

    def hammer(path: str, body: dict | None) -> None:
        while not ready.is_set():
            t0 = time.monotonic()
            try:
                if body is None:
                    r = httpx.get(url + path, timeout=30)
                else:
                    r = httpx.post(url + path, json=body, timeout=30)
                outcome = str(r.status_code)
                # (counted, not asserted here: a failed assert would end this thread quietly)
                malformed = not _json_error(r) or (
                    r.status_code == 503 and not r.headers.get("retry-after")
                )
                if r.status_code >= 400 and path != "/readyz" and malformed:
                    outcome = f"bad {r.status_code}: {r.text[:200]}"
                if path == "/readyz" and r.status_code == 200:
                    ready.set()
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                outcome = "closed"
                time.sleep(0.1)
            except httpx.TimeoutException:
                outcome = "timeout"
            outcomes.append((path, outcome, time.monotonic() - t0))

    threads = [
        threading.Thread(target=hammer, args=("/readyz", None), daemon=True),
        threading.Thread(target=hammer, args=("/v1/chat/completions", CHAT), daemon=True),
        threading.Thread(target=hammer, args=("/v1/embeddings", {"input": "wax"}), daemon=True),
    ]
    try:
        for t in threads:
            t.start()
        assert ready.wait(300), "the service never became ready"
        for t in threads:
            t.join(60)
        answered = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert answered.status_code == 200
    finally:
        ready.set()
        stop_tree(proc, timeout=15)
    kinds = {o for _, o, _ in outcomes}
    assert "timeout" not in kinds, "a request hung while the service started"
    assert kinds <= {"closed", "200", "503"}, kinds
    assert any(o == "503" for _, o, _ in outcomes), "no request met the starting service"
    assert max(s for _, o, s in outcomes if o == "503") < 10  # refused at once, not after loading


def _json_error(r: httpx.Response) -> bool:
    try:
        return bool(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return False


@pytest.fixture(scope="module")
def running(home) -> Iterator[str]:
    port = free_port()
    proc = serve(home, port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        stop_tree(proc)
        pytest.fail("the service never became ready")
    yield url
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
    back_at = time.monotonic()
    while (r := rag(running)).status_code != 200 and time.monotonic() - back_at < 30:
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert time.monotonic() - back_at < 5 + 25  # within 5 s of its return, plus one RAG answer


def test_sigterm_stops_every_process_the_service_started(home):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(home, port)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
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
