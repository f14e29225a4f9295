"""Helpers that several test modules share: free ports, waiting for a condition, the
`refinery` command line in a subprocess, a fresh database, a crashed Postgres, /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")


def venv_bin(name: str) -> str:
    """A command installed in this virtualenv (``refinery``, ``bentoml``, ``st``)."""
    return str(Path(sys.executable).parent / name)


REFINERY = venv_bin("refinery")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.5,
    ignore: tuple[type[BaseException], ...] = (httpx.HTTPError, OSError),
) -> T:
    """Poll ``check`` until it returns something truthy and return that; errors in ``ignore``
    (a server not up yet) count as "not yet". Raises TimeoutError, naming ``what`` and the last
    error, when ``timeout`` seconds pass first: a deadline against hanging, not a measurement."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except ignore as err:
            last = err
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{what} did not happen in {timeout:.0f} s"
                + (f" (last error: {last})" if last else "")
            )
        time.sleep(interval)


def refinery(
    *args: str,
    home: Path | None = None,
    check: bool = True,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`refinery ARGS` as a user runs it (optionally with its own REFINERY_HOME, and ``env``
    over this process's environment); with ``check``, a non-zero exit fails the test and shows
    the end of its output."""
    env = {**os.environ, **(env or {})}
    if home is not None:
        env["REFINERY_HOME"] = str(home)
    proc = subprocess.run(
        [REFINERY, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the embedded server (its URL), dropped afterwards."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def kill_embedded_postgres(settings) -> None:
    """SIGKILL the embedded Postgres's postmaster (a crash, not a shutdown) and wait until it
    is gone; its backends notice and exit. The next Refinery process starts it again."""
    from refinery.core.stores import embedded_postgres_running

    pid = int((settings.pgdata / "postmaster.pid").read_text().splitlines()[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: not embedded_postgres_running(settings),
        30,
        f"postmaster {pid} to exit after SIGKILL",
        interval=0.1,
        ignore=(),
    )


def metric_values(url: str, name: str, **labels: str) -> list[float]:
    """The values of one metric's samples on a /metrics page (those with ``labels``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real MLflow tracking server on loopback (its own SQLite store, artifacts proxied to
    ``folder/artifacts``): the URL; stopped afterwards."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [
            venv_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120, "mlflow server"
        )
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
