"""Stopping servers we started, children included."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_tree(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGINT (what Ctrl-C sends) to ``proc``'s process group, wait up to ``timeout``, then
    SIGKILL the group and every process that descended from ``proc``.

    The descendants are listed before the signal: BentoML starts its workers in sessions of
    their own, which a group signal misses and which outlive their parent when they hold a
    connection open. ``proc`` must have been started with ``start_new_session=True``.
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
