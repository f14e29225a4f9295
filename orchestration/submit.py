"""Command-line runs through the instance's run queue, like runs from the UI and the sensors.

`refinery train` (and every other command that runs a job) loads the code location as the UI
does (a code server), creates the run and submits it to the instance's run coordinator. With
Refinery's dagster.yaml that is the queue: the run waits there until the concurrency limit and
the `refinery/pool` limits allow it, whoever started the other runs. The command then follows
the run to its end: it prints its progress from the event log, exits with its status, and
cancels it on Ctrl-C.

Who takes the run off the queue: a running `dagster-daemon` (`make ui`, the Helm chart's daemon)
when its heartbeat is fresh; otherwise the command itself, with the daemon's own dequeue step
(the same limits and priorities) applied to its run only. It starts no sensors or schedules.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)

from orchestration.logs import shown, step_line
from refinery.core.settings import REPO_ROOT

LOCATION = "refinery"
MODULE = "orchestration.definitions"
DAEMON_FRESH_S = 60.0  # a daemon heartbeat younger than this: the daemon dequeues
POLL_S = 0.5
CANCEL_WAIT_S = 120.0


class SubmitError(RuntimeError):
    """The run could not be created or submitted (the code location failed to load …)."""


@dataclass
class RunOutcome:
    run_id: str
    status: DagsterRunStatus
    events: list[DagsterEvent] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == DagsterRunStatus.SUCCESS

    def check_evaluations(self) -> list[Any]:
        return [
            e.event_specific_data
            for e in self.events
            if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION
        ]


class _OneRunDequeuer(QueuedRunCoordinatorDaemon):
    """The queue daemon's dequeue step (limits, pools, priorities) for one run only: what it
    would launch now, kept to ``run_id``."""

    def __init__(self, run_id: str) -> None:
        super().__init__(interval_seconds=POLL_S)
        self._mine = run_id

    def _get_runs_to_dequeue(self, instance, concurrency_config, fixed_iteration_time=None):  # type: ignore[no-untyped-def,override]
        runs = super()._get_runs_to_dequeue(
            instance, concurrency_config, fixed_iteration_time=fixed_iteration_time
        )
        return [r for r in runs if r.run_id == self._mine]


CLI_TAG = "refinery/cli"  # host:pid of the `refinery` command that submitted the run
_PID = re.compile(r"\(pid: (\d+)\)")


def _cli_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_runs(instance: dg.DagsterInstance, echo: Callable[[str], None]) -> list[str]:
    """Runs in progress that a `refinery` command on this machine submitted, whose command and
    run process are both gone (killed, the machine rebooted): marked failed, so that they no
    longer hold the queue's limits; their reruns carry on from what they committed. (With a
    daemon, its run monitoring does this.)"""
    host = socket.gethostname()
    failed = []
    runs = instance.get_runs(
        filters=dg.RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED])
    )
    for run in runs:
        run_host, _, pid = run.tags.get(CLI_TAG, "").rpartition(":")
        if run_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        workers = [
            int(m.group(1))
            for e in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
            if (m := _PID.search(e.message or ""))
        ]
        if any(_alive(w) for w in workers):
            continue
        instance.report_run_failed(
            run, f"the `refinery` command that ran it (pid {pid}) and its run process are gone"
        )
        echo(f"run {run.run_id} ({run.job_name}) was left in progress by a killed command: failed")
        failed.append(run.run_id)
    return failed


def daemon_dequeues(instance: dg.DagsterInstance) -> bool:
    """Whether a queue daemon is alive (a fresh heartbeat) on this instance."""
    beat = instance.get_daemon_heartbeats().get(QueuedRunCoordinatorDaemon.daemon_type())
    return beat is not None and time.time() - beat.timestamp < DAEMON_FRESH_S


def _workspace(instance: dg.DagsterInstance) -> Any:
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget

    target = ModuleTarget(
        module_name=MODULE, attribute=None, working_directory=str(REPO_ROOT),
        location_name=LOCATION,
    )  # fmt: skip
    return WorkspaceProcessContext(instance, target, code_server_log_level="WARNING")


def _create_run(
    instance: dg.DagsterInstance,
    request: Any,
    job_name: str,
    run_config: Mapping[str, Any],
    tags: Mapping[str, str],
) -> Any:
    from dagster._cli.job import _create_run as create

    error = request.get_code_location_error(LOCATION)
    if error is not None:
        raise SubmitError(f"the code location {MODULE} failed to load: {error.message}")
    location = request.get_code_location(LOCATION)
    (repo,) = location.get_repositories().values()
    return create(
        instance=instance, code_location=location, remote_repo=repo,
        remote_job=repo.get_full_job(job_name), run_config=run_config, tags=tags,
        op_selection=None, run_id=None,
    )  # fmt: skip


def line(entry: EventLogEntry, started: dict[str, float]) -> str | None:
    """The terminal line of one event, as the run's console logger writes it
    (``orchestration.logs``); None for what it leaves out."""
    event = entry.dagster_event
    if not shown(entry.level, event, logging.INFO):
        return None
    step = entry.step_key or entry.job_name or "run"
    message = entry.user_message if event is None else (event.message or entry.user_message)
    return step_line(entry.timestamp, step, (message or "").strip(), event, started)


def _events(instance: dg.DagsterInstance, run_id: str, cursor: str | None) -> Iterator[Any]:
    while True:
        page = instance.get_records_for_run(run_id, cursor=cursor, limit=500)
        yield page
        cursor = page.cursor
        if not page.has_more:
            return


def submit_and_follow(
    job_name: str,
    run_config: Mapping[str, Any],
    echo: Callable[[str], None],
    tags: Mapping[str, str] | None = None,
    instance: dg.DagsterInstance | None = None,
) -> RunOutcome:
    """Submit ``job_name`` to the instance's run queue, follow it to its end, printing its
    progress with ``echo``; Ctrl-C cancels it (then the outcome says CANCELED)."""
    instance = instance or dg.DagsterInstance.get()
    with _workspace(instance) as context:
        run = _create_run(
            instance, context.create_request_context(), job_name, run_config,
            {**(tags or {}), CLI_TAG: _cli_tag()},
        )  # fmt: skip
        instance.submit_run(run.run_id, context.create_request_context())
        echo(f"Dagster run {run.run_id} ({job_name}) submitted")
        return _follow(instance, context, run.run_id, echo)


class _Interrupts:
    """SIGINT and SIGTERM as a count the follow loop reads, rather than a KeyboardInterrupt
    raised wherever the main thread happens to be (library code may swallow it). A second
    signal stops waiting (KeyboardInterrupt). Only the main thread may install handlers; other
    threads follow without them."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _follow(
    instance: dg.DagsterInstance, context: Any, run_id: str, echo: Callable[[str], None]
) -> RunOutcome:
    cursor: str | None = None
    started: dict[str, float] = {}
    waiting_said = False
    canceled_at: float | None = None
    with _OneRunDequeuer(run_id) as dequeuer, _Interrupts() as interrupts:
        while True:
            try:
                if interrupts.count and canceled_at is None:
                    raise KeyboardInterrupt  # Ctrl-C (or SIGTERM) arrived: cancel, once
                for page in _events(instance, run_id, cursor):
                    cursor = page.cursor
                    for record in page.records:
                        if (text := line(record.event_log_entry, started)) is not None:
                            echo(text)
                run = instance.get_run_by_id(run_id)
                if run is None:
                    raise SubmitError(f"run {run_id} vanished from the instance")
                if run.is_finished:
                    break
                if run.status == DagsterRunStatus.QUEUED and not daemon_dequeues(instance):
                    fail_orphaned_runs(instance, echo)
                    for _ in dequeuer.run_iteration(context):
                        pass
                    run = instance.get_run_by_id(run_id) or run
                if run.status == DagsterRunStatus.QUEUED and not waiting_said:
                    echo(_waiting(instance, run_id))
                    waiting_said = True
                if canceled_at is not None and time.monotonic() - canceled_at > CANCEL_WAIT_S:
                    echo(f"run {run_id} did not stop within {CANCEL_WAIT_S:.0f} s of the cancel")
                    break
                time.sleep(POLL_S)
            except KeyboardInterrupt:
                if canceled_at is not None:
                    raise  # the second one: stop waiting
                echo(f"Ctrl-C: canceling run {run_id} (Ctrl-C again to stop waiting)")
                instance.run_coordinator.cancel_run(run_id)
                canceled_at = time.monotonic()
    run = instance.get_run_by_id(run_id)
    events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]
    return RunOutcome(run_id, run.status if run else DagsterRunStatus.FAILURE, events)


def _waiting(instance: dg.DagsterInstance, run_id: str) -> str:
    """Why a queued run waits: the runs in progress that hold the limits."""
    busy = instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[
                DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED,
                DagsterRunStatus.CANCELING,
            ]
        )
    )
    others = ", ".join(f"{r.job_name} {r.run_id[:8]}" for r in busy if r.run_id != run_id)
    return "queued: waiting for the run queue's limits" + (
        f" (in progress: {others})" if others else ""
    )


def step_failures(events: Sequence[DagsterEvent]) -> list[tuple[str, Any]]:
    """(step, error) of each failed step."""
    return [
        (str(e.step_key), e.event_specific_data.error)
        for e in events
        if e.event_type == DagsterEventType.STEP_FAILURE
    ]
