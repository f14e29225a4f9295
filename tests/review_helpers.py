"""Helpers shared by the review tests: a queue of traced examples in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

from evaluation import review
from evaluation.automatic import ExampleResult
from evaluation.tracing import log_traces
from refinery.core.tracking import tracked_run


def make_queue(
    engine, mlflow_uri: str, tmp_path: Path, labels=("chat/1", "chat/2"), per_model: int = 3
) -> dict:
    with tracked_run(
        mlflow_uri, "evaluation", run_name="eval", artifact_root=tmp_path / "art"
    ) as run:
        pass
    examples = {
        label: [
            ExampleResult(
                "rag",
                f"{label}-{i}",
                f"Question {i} about bees?",
                "ref",
                f"Answer {i}: workers develop in 21 days.",
                {"token_f1": 0.5},
                0.1,
                5,
                [{"source": "a.md", "title": "A"}],
                ["a.md"],
            )
            for i in range(per_model)
        ]
        for label in labels
    }
    for label, exs in examples.items():
        log_traces(mlflow_uri, run.experiment_id, run.run_id, label, exs)
        assert review.enqueue(engine, label, exs, sample=per_model) == per_model
        assert review.enqueue(engine, label, exs, sample=per_model) == 0  # idempotent
    return examples
