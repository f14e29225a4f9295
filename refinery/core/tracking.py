"""MLflow runs through an explicit client: no global tracking URI, no import-time state.

``tracked_run`` opens a run in an experiment (created with its artifacts under REFINERY_HOME
when the store is local), yields a ``TrackedRun`` and ends it FINISHED, or FAILED on error.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value is 6000 characters

# Opens an MLflow run for a step, given its params and tags: what library code receives when it
# decides itself whether there is anything new to record (a reused result opens no run).
RunOpener = Callable[
    [Mapping[str, Any], Mapping[str, Any]], contextlib.AbstractContextManager["TrackedRun"]
]


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def process_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI pointed at ``tracking_uri`` for the
    duration of the block, then put back. For the MLflow calls that read them rather than a
    client's: trace export, ``mlflow.genai.evaluate``, and a local store resolving a
    ``models:/<model id>`` version source."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, created on first use (artifacts under ``artifact_root`` if given)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = (artifact_root / name).as_uri() if artifact_root is not None else None
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


@dataclass
class TrackedRun:
    client: MlflowClient
    run_id: str
    experiment_id: str
    ui_url: str

    @property
    def url(self) -> str:
        return f"{self.ui_url}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(
        self, metrics: Mapping[str, float], step: int = 0, *, model_id: str | None = None
    ) -> None:
        """``model_id``: a LoggedModel the metrics are also linked to (its page shows them)."""
        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step, model_id=model_id or None)
            for k, v in metrics.items()
            if math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextlib.contextmanager
def tracked_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    artifact_root: Path | None = None,
    ui_url: str = "http://127.0.0.1:5000",
) -> Iterator[TrackedRun]:
    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    run = client.create_run(
        experiment_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    tracked = TrackedRun(client, run.info.run_id, experiment_id, ui_url.rstrip("/"))
    try:
        yield tracked
    except BaseException:
        client.set_terminated(tracked.run_id, status="FAILED")
        raise
    client.set_terminated(tracked.run_id, status="FINISHED")
