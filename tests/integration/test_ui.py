"""`refinery ui` (what `make ui` runs): both UIs answer on loopback, and one SIGINT stops
every process they started, even when the command was started in the background."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from refinery.processes import stop_tree

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float, data: bytes | None = None) -> bytes:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(
                url, data=data, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.read()
        except OSError as err:
            last = err
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout}s: {last}")


def test_ui_serves_both_and_stops_cleanly():
    dagster_port, mlflow_port = free_port(), free_port()
    cmd = [
        str(Path(sys.executable).parent / "refinery"),
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
        assert wait_for(f"http://127.0.0.1:{mlflow_port}/health", 120) == b"OK"
        query = json.dumps(
            {"query": "{ assetNodes { assetKey { path } hasAssetChecks } }"}
        ).encode()
        body = json.loads(wait_for(f"http://127.0.0.1:{dagster_port}/graphql", 120, data=query))
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
