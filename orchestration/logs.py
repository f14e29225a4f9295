"""How runs talk on the terminal: a line per step and what the assets say, not every event.

The ``console`` logger of every job: steps starting and finishing (with their time), the
assets' own messages (progress, decisions), check results and errors; at DEBUG, the same full
event stream is written to ``<home>/logs/<run id>.log``. The Dagster UI keeps the whole log of
every run as before.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg

from refinery.core.settings import Settings

_STEP_EVENTS = {"STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED"}


def _meta(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "dagster_meta", None) or {}


def shown(level: int, event: Any, threshold: int) -> bool:
    """What a person follows: step boundaries (Dagster logs them at DEBUG), check results,
    failures, and the assets' own messages at ``threshold`` and above; not the engine's
    bookkeeping events."""
    if event is None:
        return level >= threshold
    kind = event.event_type_value
    return (
        kind in _STEP_EVENTS
        or kind in ("ASSET_CHECK_EVALUATION", "RUN_FAILURE")
        or level >= logging.ERROR
    )


def step_line(
    created: float, step: str, message: str, event: Any, started: dict[str, float]
) -> str:
    """One terminal line; ``started`` (step -> start time) gives a finished step its time."""
    stamp = time.strftime("%H:%M:%S", time.localtime(created))
    if event is None:
        return f"{stamp}   {step}: {message}"
    kind = event.event_type_value
    if kind == "STEP_START":
        started[step] = created
        return f"{stamp} ▶ {step}"
    if kind == "STEP_SUCCESS":
        took = created - started.get(step, created)
        return f"{stamp} ✓ {step} ({took:.1f} s)"
    if kind == "STEP_SKIPPED":
        return (
            f"{stamp} - {step} skipped (an upstream step failed or a blocking check did not pass)"
        )
    if kind == "ASSET_CHECK_EVALUATION":
        data = event.event_specific_data
        verdict = "passed" if getattr(data, "passed", False) else "FAILED"
        return f"{stamp}   check {getattr(data, 'check_name', '?')} {verdict}"
    return f"{stamp} ✗ {step}: {message}"


class StepLines(logging.Filter):
    """Keeps the records ``shown`` keeps."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return shown(record.levelno, _meta(record).get("dagster_event"), self.level)


class StepFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}

    def format(self, record: logging.LogRecord) -> str:
        meta = _meta(record)
        step = meta.get("step_key") or meta.get("job_name") or "run"
        message = meta.get("orig_message") or record.getMessage()
        return step_line(record.created, step, message, meta.get("dagster_event"), self.started)


class AppendToFile(logging.Handler):
    """Appends each record to a file it opens only while writing: a logger is made per run and
    never closed by Dagster, so a long-lived process must not keep a file open per run."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(self.format(record) + "\n")
        except OSError:
            self.handleError(record)


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, default_value="INFO", description="Terminal level."),
        "log_dir": dg.Field(
            str, default_value="", description="Folder of the full logs; empty: <home>/logs."
        ),
        "terminal": dg.Field(
            bool,
            default_value=True,
            description="Write the lines to the run process's stderr (off for `refinery …` "
            "commands, which print them from the run's event log wherever the run executes).",
        ),
    },
    description="A line per step and the assets' messages on the terminal; every event at "
    "DEBUG in <home>/logs/<run id>.log.",
)
def console(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    log = logging.Logger(f"refinery.run.{init_context.run_id or 'run'}", level=logging.DEBUG)
    if config["terminal"]:
        terminal = logging.StreamHandler(sys.stderr)
        terminal.addFilter(StepLines(logging.getLevelName(config["log_level"].upper())))
        terminal.setFormatter(StepFormatter())
        log.addHandler(terminal)
    folder = Path(config["log_dir"]) if config["log_dir"] else Settings.from_env().home / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    full = AppendToFile(folder / f"{init_context.run_id or 'run'}.log")
    full.setLevel(logging.DEBUG)
    full.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(full)
    return log
