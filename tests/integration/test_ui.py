"""`refinery ui` (what `make ui` runs): both UIs answer on loopback, and one SIGINT stops
every process they started, even when the command was started in the background."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

import psutil
import pytest

from refinery.core.processes import stop_tree
from tests.support import REFINERY, free_port, wait_for

pytestmark = pytest.mark.integration


def fetch(url: str, data: bytes | None = None) -> bytes:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def answer(url: str, timeout: float, data: bytes | None = None) -> bytes:
    """The first answer of ``url`` (POSTing ``data``) once it is up."""
    return wait_for(lambda: fetch(url, data), timeout, url, interval=1)


def test_ui_serves_both_and_stops_cleanly():
    dagster_port, mlflow_port = free_port(), free_port()
    cmd = [
        REFINERY,
        "ui",
        "--dagster-port",
        str(dagster_port),
        "--mlflow-port",
        str(mlflow_port),
    ]
    # start_new_session and SIGINT ignored: like `refinery ui &` from a script.
    proc = subprocess.Popen(
        cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    family: list[psutil.Process] = []
    try:
        assert answer(f"http://127.0.0.1:{mlflow_port}/health", 120) == b"OK"
        query = json.dumps(
            {"query": "{ assetNodes { assetKey { path } hasAssetChecks } }"}
        ).encode()
        body = json.loads(answer(f"http://127.0.0.1:{dagster_port}/graphql", 120, data=query))
        nodes = {n["assetKey"]["path"][0]: n["hasAssetChecks"] for n in body["data"]["assetNodes"]}
        assert {"source_documents", "document_chunks", "chunk_embeddings"} <= set(nodes)
        assert nodes["chunk_embeddings"] and nodes["source_documents"]
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 4  # dagster dev, its webserver/daemon/code server, mlflow, uvicorn
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, [p.cmdline()[:3] for p in alive]
    finally:
        stop_tree(proc, timeout=5)  # on a failure above: the UIs and all their children too
        for p in family:
            if p.is_running():
                p.kill()


def _graphql(port: int, query: str) -> dict:
    body = json.dumps({"query": query}).encode()
    return json.loads(answer(f"http://127.0.0.1:{port}/graphql", 60, data=body))["data"]


@pytest.mark.slow  # the daemon's sensor tick, then an ingest run: over a minute
def test_a_file_dropped_into_the_corpus_starts_an_ingest_run_on_its_own(tmp_path):
    """The daemon under `refinery ui` runs the corpus sensor: a new file leads to an ingest run
    of just that file, and its document lands in Postgres, with nobody pressing a button."""
    import sqlalchemy as sa

    from refinery.core.settings import Settings
    from refinery.core.stores import database_url

    home, corpus = tmp_path / "home", tmp_path / "corpus"
    corpus.mkdir()
    env = {**os.environ, "REFINERY_HOME": str(home), "REFINERY_CORPUS_DIR": str(corpus)}
    dagster_port, mlflow_port = free_port(), free_port()
    cmd = [
        REFINERY, "ui",
        "--dagster-port", str(dagster_port), "--mlflow-port", str(mlflow_port),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    engine = None
    try:
        _graphql(dagster_port, "{ version }")  # up
        (corpus / "swarms.md").write_text("# Swarms\n\nA colony swarms in late spring.\n")
        runs_query = """{ runsOrError(filter: {tags: [{key: "refinery/trigger",
            value: "corpus_sensor"}]}) { ... on Runs { results { runId jobName status
            tags { key value } } } } }"""

        def finished_runs() -> list[dict]:
            runs = _graphql(dagster_port, runs_query)["runsOrError"]["results"]
            done = runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED")
            return runs if done else []

        runs = wait_for(finished_runs, 420, "the sensor's ingest run to finish", interval=3)
        assert len(runs) == 1, runs
        run = runs[0]
        assert run["jobName"] == "ingest" and run["status"] == "SUCCESS", run
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert tags["refinery/changed_files"] == "1"
        engine = sa.create_engine(database_url(Settings.from_env(env)))
        with engine.connect() as conn:
            sources = conn.execute(sa.text("SELECT source FROM documents")).scalars().all()
            chunks = conn.execute(sa.text("SELECT count(*) FROM chunks")).scalar_one()
        assert sources == ["swarms.md"] and chunks == 1
    finally:
        if engine is not None:
            engine.dispose()
        stop_tree(proc, timeout=20)
