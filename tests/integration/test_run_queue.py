"""Command-line runs go through the instance's run queue: a model job waits while another run
of the `refinery/pool=models` pool is in progress (whoever started it), goes on once it ends,
and Ctrl-C cancels a waiting run."""

import signal
import subprocess
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRunStatus

from refinery.core.settings import OFFLINE_ENV, Settings
from refinery.core.stores import prepare_dagster_home, stop_embedded_postgres
from tests.support import REFINERY, wait_for


@dg.op
def busy() -> None:
    pass


@dg.job
def elsewhere() -> None:
    busy()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    monkeypatch.setenv("REFINERY_HOME", str(home))
    settings = Settings.from_env()
    instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    yield home, instance
    instance.dispose()
    stop_embedded_postgres(settings)


def _start(home: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    import os

    out = home.parent / f"{args[0]}.out"
    env = {**os.environ, **OFFLINE_ENV, "REFINERY_HOME": str(home)}
    proc = subprocess.Popen(
        [REFINERY, *args], env=env, stdout=out.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return proc, out


def _wait(proc: subprocess.Popen, out: Path, timeout: float) -> int:
    """The command's exit status; its output in the failure when it does not end in time."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`refinery {proc.args[1]}` still running after {timeout:.0f} s:\n"
                    + out.read_text()[-3000:])  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    """The command and what it started (its own session: the code server, a run process)."""
    import os

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _queued(instance: dg.DagsterInstance, job: str) -> list:
    return [
        r
        for r in instance.get_runs(filters=dg.RunsFilter(job_name=job))
        if r.status == DagsterRunStatus.QUEUED
    ]


def test_a_model_run_waits_for_the_pool_then_runs(home):
    home, instance = home
    # A model run in progress, started by someone else (a sensor, the UI, another machine).
    blocker = instance.create_run_for_job(
        elsewhere, status=DagsterRunStatus.STARTED, tags={"refinery/pool": "models"}
    )
    proc, out = _start(home, "evaluate")
    try:
        wait_for(lambda: "queued: waiting" in out.read_text(), 120, "evaluate to wait")
        assert f"elsewhere {blocker.run_id[:8]}" in out.read_text()  # says what it waits for
        (waiting,) = _queued(instance, "evaluate")
        assert waiting.tags["refinery/pool"] == "models"
        assert proc.poll() is None
        instance.report_run_canceled(blocker)  # the other run ends: this one goes on
        code = _wait(proc, out, 300)
    finally:
        _stop(proc)
    text = out.read_text()
    # It ran (and failed as a fresh home's evaluate does: there is no candidate yet).
    assert code == 1, text[-3000:]
    assert "candidate_model has never been materialized" in text, text[-3000:]
    run = instance.get_run_by_id(waiting.run_id)
    assert run is not None and run.status == DagsterRunStatus.FAILURE


def test_ctrl_c_cancels_a_waiting_run(home):
    home, instance = home
    instance.create_run_for_job(
        elsewhere, status=DagsterRunStatus.STARTED, tags={"refinery/pool": "models"}
    )
    proc, out = _start(home, "train")
    try:
        wait_for(lambda: "queued: waiting" in out.read_text(), 120, "train to wait")
        (waiting,) = _queued(instance, "train")
        proc.send_signal(signal.SIGINT)
        code = _wait(proc, out, 120)
    finally:
        _stop(proc)
    text = out.read_text()
    assert code != 0 and "canceling run" in text, text[-3000:]
    run = instance.get_run_by_id(waiting.run_id)
    assert run is not None and run.status == DagsterRunStatus.CANCELED
    assert "CANCELED" in text


def test_a_run_left_by_a_killed_command_does_not_hold_the_queue(home):
    """A `refinery` command SIGKILLed mid-run leaves its run "in progress"; the next command
    on this machine sees that the command and its run process are gone, marks it failed and
    goes on (a run in progress elsewhere, or whose command lives, is left alone)."""
    import socket

    from orchestration.submit import CLI_TAG

    home, instance = home
    dead = subprocess.Popen(["true"])  # a process id that has exited
    dead.wait()
    orphan = instance.create_run_for_job(
        elsewhere, status=DagsterRunStatus.STARTED,
        tags={"refinery/pool": "models", CLI_TAG: f"{socket.gethostname()}:{dead.pid}"},
    )  # fmt: skip
    proc, out = _start(home, "evaluate")
    try:
        code = _wait(proc, out, 300)
    finally:
        _stop(proc)
    text = out.read_text()
    assert "left in progress by a killed command" in text, text[-3000:]
    assert code == 1 and "candidate_model has never been materialized" in text, text[-3000:]
    run = instance.get_run_by_id(orphan.run_id)
    assert run is not None and run.status == DagsterRunStatus.FAILURE
