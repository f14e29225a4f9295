"""Every evaluated example becomes an MLflow trace (question in, answer and sources out, scores
as attributes), attached to the evaluation run, so people can read and rate it in the MLflow UI.
The trace names its model only by a keyed hash (``refinery.model_key``, as served traces do), so
a rating given on it in the MLflow UI is blind; the review queue in Postgres knows the version.

``evaluate_in_mlflow`` then runs ``mlflow.genai.evaluate`` over those traces with the project's
metrics as scorers (``evaluation.scorers``): the scores become assessments in the Evaluations UI,
and the model's metrics are linked to its LoggedModel.

MLflow exports traces (and ``mlflow.genai.evaluate`` logs) through its process-wide tracking
URI, so both point it at the store for the duration of the call; ``log_traces`` flushes before
returning.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

from evaluation.automatic import ExampleResult
from refinery.core.lineage import TAG_MODEL_KEY, model_key
from refinery.core.tracking import client_for, process_tracking_uri

TAG_EXAMPLE = "refinery.example_id"


@contextlib.contextmanager
def exporting_to(tracking_uri: str) -> Iterator[None]:
    import mlflow

    # Trace ids come from OpenTelemetry's generator, which draws on Python's global `random`.
    # Training seeds it (the Trainer calls random.seed(42)), which would make every run in the
    # same process reuse the same trace ids: draw them from fresh entropy, then put the
    # seeded state back so that nothing else loses its reproducibility.
    state = random.getstate()
    random.seed()
    with process_tracking_uri(tracking_uri):
        try:
            yield
        finally:
            random.setstate(state)
            mlflow.flush_trace_async_logging()


def log_traces(
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    model_label: str,
    examples: Sequence[ExampleResult],
    salt: str = "",
) -> list[str]:
    """One trace per example, attached to the run; ``salt`` keys the model's blind name
    (REFINERY_TRAFFIC_SALT)."""
    client = client_for(tracking_uri)
    ids: list[str] = []
    with exporting_to(tracking_uri):
        for ex in examples:
            span = client.start_trace(
                f"{ex.kind}-evaluation",
                span_type="CHAIN",
                inputs={"question": ex.question},
                tags={
                    TAG_MODEL_KEY: model_key(model_label, salt),
                    TAG_EXAMPLE: ex.example_id,
                    "refinery.kind": ex.kind,
                },
                experiment_id=experiment_id,
                run_id=run_id,
            )
            outputs: dict[str, Any] = {"answer": ex.answer, "reference": ex.reference}
            if ex.sources:
                outputs["sources"] = ex.sources
            client.end_trace(
                span.trace_id,
                outputs=outputs,
                attributes={f"score.{k}": v for k, v in ex.scores.items()},
            )
            ex.trace_id = span.trace_id
            ids.append(span.trace_id)
    return ids


def evaluate_in_mlflow(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    model_label: str,
    examples: Sequence[ExampleResult],
    metrics: dict[str, float],
    *,
    model_id: str = "",
    k: int = 3,
    salt: str = "",
) -> str:
    """``mlflow.genai.evaluate`` over one model's traced examples (``log_traces`` first), in a
    child run of the evaluation run: the project's scorers (``evaluation.scorers``) become
    assessments on each trace beside its expectations, and their means metrics of the child run.
    The model's whole metric set (``metrics``) is logged there too. With ``model_id`` (the
    version's LoggedModel) all of it is linked to the model, so the Models tab shows its scores.
    The child run is named by the model's blind key, as the traces are. Its id."""
    import mlflow
    import pandas as pd
    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from evaluation.scorers import expectations, scorers_for

    client = client_for(tracking_uri)
    key = model_key(model_label, salt)
    linked = model_id or None
    with (
        process_tracking_uri(tracking_uri),
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"genai-evaluate {key}",
            tags={MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_MODEL_KEY: key},
            nested=mlflow.active_run() is not None,
        ) as child,
    ):
        for kind in ("heldout", "rag"):
            mine = [e for e in examples if e.kind == kind and e.trace_id]
            if not mine:
                continue
            data = pd.DataFrame(
                {
                    "trace": [client.get_trace(e.trace_id) for e in mine],
                    "expectations": [expectations(kind, e.reference, e.gold_sources) for e in mine],
                }
            )
            mlflow.genai.evaluate(data=data, scorers=scorers_for(kind, k), model_id=linked)
        ts = int(time.time() * 1000)
        client.log_batch(
            child.info.run_id,
            metrics=[
                Metric(name, float(value), ts, 0, model_id=linked)
                for name, value in metrics.items()
                if math.isfinite(float(value))
            ],
        )
    return str(child.info.run_id)
