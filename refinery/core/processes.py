"""Processes we start: the environment they get, and stopping them, children included.

With ``refinery.core.settings``, the one library module that touches the environment: a child
process (bentoml, accelerate, the OpenVINO exporter) gets this process's environment passed
through (``child_environment``); an entry point or a worker process that must set a variable
for the libraries and programs it runs (DAGSTER_HOME, OMP_THREAD_LIMIT for Tesseract) does it
with ``set_process_environment``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this process's, with ``extra`` on top."""
    return {**os.environ, **(extra or {})}


def set_process_environment(values: Mapping[str, str], *, keep_existing: bool = False) -> None:
    """Set ``values`` in this process's environment, for the libraries that read it and the
    processes it starts from now on; ``keep_existing``: a variable already set is left alone.
    Only entry points (commands) and worker processes call this, never library code on import.
    """
    for key, value in values.items():
        if keep_existing:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value


def stop_tree(
    proc: subprocess.Popen, timeout: float = 20.0, first: signal.Signals = signal.SIGINT
) -> None:
    """``first`` (SIGINT, what Ctrl-C sends, or SIGTERM, what Kubernetes and systemd send) to
    ``proc``'s process group, up to ``timeout`` seconds for it to finish what it was doing,
    then SIGKILL to the group and to every process that descended from ``proc``.

    Descendants are listed before the signal and again after each kill: BentoML starts its
    workers in sessions of their own, which a group signal misses, and its arbiter may start
    one more while it shuts down. ``proc`` must have been started with
    ``start_new_session=True``.
    """
    import psutil

    known = _descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    for _ in range(5):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        known |= _descendants(proc.pid)
        alive = []
        for child in known:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
                alive.append(child)
        psutil.wait_procs(alive, timeout=2)
        if not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in alive):
            break
        time.sleep(0.2)
    proc.wait()


def _descendants(pid: int) -> set:
    import psutil

    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()
