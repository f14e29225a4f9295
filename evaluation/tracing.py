"""Every evaluated example becomes an MLflow trace (question in, answer and sources out, scores
as attributes), attached to the evaluation run, so people can read and rate it in the MLflow UI.
The trace names its model only by a keyed hash (``refinery.model_key``, as served traces do), so
a rating given on it in the MLflow UI is blind; the review queue in Postgres knows the version.

MLflow exports traces through its process-wide tracking URI, so ``log_traces`` points it at
the store for the duration of the call and flushes before returning.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

from evaluation.automatic import ExampleResult
from refinery.core.lineage import TAG_MODEL_KEY, model_key
from refinery.core.tracking import client_for

TAG_EXAMPLE = "refinery.example_id"


@contextlib.contextmanager
def exporting_to(tracking_uri: str) -> Iterator[None]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    # Trace ids come from OpenTelemetry's generator, which draws on Python's global `random`.
    # Training seeds it (the Trainer calls random.seed(42)), which would make every run in the
    # same process reuse the same trace ids: draw them from fresh entropy, then put the
    # seeded state back so that nothing else loses its reproducibility.
    state = random.getstate()
    random.seed()
    try:
        yield
    finally:
        random.setstate(state)
        mlflow.flush_trace_async_logging()
        mlflow.set_tracking_uri(previous)


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
