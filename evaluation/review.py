"""Blind human review: reviewers with tokens, a queue of sampled examples, validated 1–5
ratings stored as MLflow feedback (source HUMAN, the reviewer's id), and their aggregate.

Why 1–5 ratings and not pairwise preference: the very first model has no champion to compare
with, and the promotion gate asks for an absolute quality bar (mean ≥ 4 of 5). Blindness: the
queue interleaves examples of the challenger and the champion in a random order and the page
never shows which model answered.

MLflow is the record: ratings given in the MLflow UI (feedback named "rating", an integer
1–5, on a queued trace) count the same as ratings from the review page. Postgres keeps the
queue, the reviewers' token hashes and the page's ratings (to refuse duplicates quickly).
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from evaluation.automatic import ExampleResult
from evaluation.gate import HumanSummary
from evaluation.metrics import bootstrap_ci
from refinery.core import schema
from refinery.core.lineage import TAG_MODEL_KEY, TAG_MODEL_VERSION

FEEDBACK_NAME = "rating"


class ReviewError(ValueError):
    """A rating that cannot be accepted; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_reviewer(engine: sa.Engine, reviewer_id: str, *, rotate: bool = False) -> str:
    """Create a reviewer (or give one a new token); return the token, which is never stored."""
    reviewer_id = reviewer_id.strip()
    if (
        not reviewer_id
        or len(reviewer_id) > 64
        or not reviewer_id.replace("-", "").replace("_", "").replace(".", "").isalnum()
    ):
        raise ReviewError(400, "reviewer id: 1–64 letters, digits, '-', '_' or '.'")
    token = secrets.token_urlsafe(24)
    r = schema.reviewers
    with engine.begin() as conn:
        exists = conn.execute(
            sa.select(r.c.reviewer_id).where(r.c.reviewer_id == reviewer_id)
        ).first()
        if exists and not rotate:
            raise ReviewError(409, f"reviewer {reviewer_id!r} exists; rotate to issue a new token")
        stmt = insert(r).values(reviewer_id=reviewer_id, token_sha256=_hash(token))
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[r.c.reviewer_id], set_={"token_sha256": _hash(token)}
            )
        )
    return token


def authenticate(engine: sa.Engine, token: str | None) -> str:
    """The reviewer a token belongs to, or a 401."""
    if not token:
        raise ReviewError(401, "missing reviewer token (Authorization: Bearer <token>)")
    r = schema.reviewers
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(r.c.reviewer_id).where(r.c.token_sha256 == _hash(token))
        ).first()
    if row is None:
        raise ReviewError(401, "unknown reviewer token")
    return str(row.reviewer_id)


def enqueue(
    engine: sa.Engine,
    model_label: str,
    examples: Sequence[ExampleResult],
    *,
    sample: int,
    seed: int = 0,
) -> int:
    """Put a random sample of a model's traced examples in the queue (idempotent by trace)."""
    traced = [e for e in examples if e.trace_id]
    rng = random.Random(f"{seed}:{model_label}")
    picked = rng.sample(traced, min(sample, len(traced)))
    if not picked:
        return 0
    t = schema.review_items
    rows = [
        {
            "item_id": hashlib.sha256(e.trace_id.encode()).hexdigest()[:32],
            "trace_id": e.trace_id,
            "model": model_label,
            "kind": e.kind,
            "question": e.question,
            "answer": e.answer,
            "sources": [{"source": s["source"], "title": s["title"]} for s in e.sources],
            "order_key": hashlib.sha256(f"{seed}:{e.trace_id}".encode()).hexdigest()[:32],
        }
        for e in picked
    ]
    with engine.begin() as conn:
        stmt = insert(t).values(rows).on_conflict_do_nothing(index_elements=[t.c.trace_id])
        return len(conn.execute(stmt.returning(t.c.item_id)).all())


def served_examples(
    tracking_uri: str, experiment: str, model_label: str, key: str, limit: int = 500
) -> list[ExampleResult]:
    """The served answers of ``model_label`` traced in ``experiment``: traces tagged with its
    blind ``key`` (``refinery.core.lineage.model_key``) or, when the service was not blind,
    its version. As examples to queue: question, answer and sources from the root span."""
    from refinery.core.tracking import client_for

    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found: dict[str, Any] = {}
    # The values are ours (hex digits, or a "name/version" label from the registry); quotes in a
    # label are refused rather than escaped.
    if "'" in model_label:
        raise ReviewError(400, f"model label {model_label!r} has a quote in it")
    for tag, value in ((TAG_MODEL_KEY, key), (TAG_MODEL_VERSION, model_label)):
        for trace in client.search_traces(
            [exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=limit
        ):
            found[trace.info.trace_id] = trace
    examples = []
    for trace_id, trace in sorted(found.items()):
        root = next((s for s in trace.data.spans if s.parent_id is None), None)
        if root is None:
            continue
        inputs, outputs = root.inputs or {}, root.outputs or {}
        question = inputs.get("question") or next(
            (m.get("content", "") for m in reversed(inputs.get("messages", []))
             if m.get("role") == "user"), "",
        )  # fmt: skip
        answer = outputs.get("answer", "")
        if not question or not answer:
            continue
        examples.append(
            ExampleResult(
                f"served_{trace.info.tags.get('refinery.endpoint', 'chat')}", trace_id, question,
                "", answer, {}, 0.0, 0,
                sources=[{"source": s.get("source"), "title": s.get("title")}
                         for s in outputs.get("sources", [])],
                trace_id=trace_id,
            )
        )  # fmt: skip
    return examples


def next_item(engine: sa.Engine, reviewer_id: str) -> dict[str, Any] | None:
    """The next queued example this reviewer has not rated, without the model's identity."""
    t, r = schema.review_items, schema.ratings
    rated = sa.select(r.c.item_id).where(r.c.reviewer_id == reviewer_id)
    stmt = (
        sa.select(t.c.item_id, t.c.question, t.c.answer, t.c.sources)
        .where(t.c.item_id.not_in(rated))
        .order_by(t.c.order_key)
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
        remaining = conn.execute(
            sa.select(sa.func.count()).select_from(t).where(t.c.item_id.not_in(rated))
        ).scalar_one()
    if row is None:
        return None
    return {
        "item_id": row.item_id,
        "question": row.question,
        "answer": row.answer,
        "sources": row.sources,
        "remaining": remaining,
    }


def rate(
    engine: sa.Engine,
    tracking_uri: str,
    reviewer_id: str,
    item_id: Any,
    rating: Any,
    comment: Any = "",
) -> dict[str, Any]:
    """Validate and record one rating: in Postgres and as MLflow feedback on the trace."""
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise ReviewError(422, f"rating must be an integer from 1 to 5, got {rating!r}")
    if not isinstance(item_id, str) or not item_id:
        raise ReviewError(422, "item_id must be a non-empty string")
    if not isinstance(comment, str) or len(comment) > 2000:
        raise ReviewError(422, "comment must be a string of at most 2000 characters")
    t, r = schema.review_items, schema.ratings
    with engine.begin() as conn:  # the row commits only once MLflow has the feedback
        item = conn.execute(sa.select(t.c.trace_id).where(t.c.item_id == item_id)).first()
        if item is None:
            raise ReviewError(404, f"unknown review item {item_id!r}")
        inserted = conn.execute(
            insert(r)
            .values(item_id=item_id, reviewer_id=reviewer_id, rating=rating, comment=comment)
            .on_conflict_do_nothing(index_elements=[r.c.item_id, r.c.reviewer_id])
            .returning(r.c.item_id)
        ).first()
        if inserted is None:
            raise ReviewError(409, f"{reviewer_id} has already rated item {item_id}")
        _log_feedback(tracking_uri, item.trace_id, reviewer_id, rating, comment)
    return {"item_id": item_id, "rating": rating, "reviewer": reviewer_id}


def _log_feedback(
    tracking_uri: str, trace_id: str, reviewer_id: str, rating: int, comment: str
) -> None:
    from mlflow.entities import AssessmentSource, Feedback
    from mlflow.tracing.client import TracingClient

    TracingClient(tracking_uri).log_assessment(
        trace_id,
        Feedback(
            name=FEEDBACK_NAME,
            value=rating,
            source=AssessmentSource(source_type="HUMAN", source_id=reviewer_id),
            rationale=comment or None,
        ),
    )


@dataclass
class ModelRatings:
    model: str
    ratings: list[int]
    ignored: int  # MLflow UI feedback that is not an integer 1–5

    def summary(self) -> HumanSummary:
        mean, low, high = bootstrap_ci(self.ratings) if self.ratings else (float("nan"),) * 3
        return HumanSummary(len(self.ratings), mean, low, high)


def collect_ratings(engine: sa.Engine, tracking_uri: str, model_label: str) -> ModelRatings:
    """Every human rating of a model's queued traces in MLflow: the latest per reviewer per trace."""
    from mlflow.tracing.client import TracingClient

    t = schema.review_items
    with engine.connect() as conn:
        trace_ids = list(
            conn.execute(sa.select(t.c.trace_id).where(t.c.model == model_label)).scalars()
        )
    client = TracingClient(tracking_uri)
    values, ignored = [], 0
    for trace_id in trace_ids:
        latest: dict[str, Any] = {}
        for a in client.get_trace(trace_id).info.assessments or []:
            if (
                a.name != FEEDBACK_NAME
                or a.source is None
                or str(a.source.source_type) not in ("HUMAN", "AssessmentSourceType.HUMAN")
            ):
                continue
            if getattr(a, "valid", True) is False:
                continue
            key = a.source.source_id or ""
            if key not in latest or a.create_time_ms >= latest[key].create_time_ms:
                latest[key] = a
        for a in latest.values():
            value = getattr(a, "value", None)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or value != int(value)
                or not 1 <= value <= 5
            ):
                ignored += 1
                continue
            values.append(int(value))
    return ModelRatings(model_label, values, ignored)


def count_ratings(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(schema.ratings)).scalar_one()
        )


@dataclass(frozen=True)
class RatingSummary:
    model: str  # "name/version"
    count: int
    mean: float
    ci_low: float
    ci_high: float
    ignored: int

    def human(self) -> HumanSummary:
        return HumanSummary(self.count, self.mean, self.ci_low, self.ci_high)


@dataclass(frozen=True)
class HumanEvaluation:
    """The hand-off of ``human_evaluation``: the ratings of the challenger (and champion)."""

    challenger: RatingSummary
    champion: RatingSummary | None
    queued_now: int


def review_round(
    engine: sa.Engine,
    tracking_uri: str,
    evaluation_run_id: str,
    *,
    sample: int,
    seed: int = 0,
) -> HumanEvaluation:
    """Queue a sample of the evaluated examples (``evaluation.json`` of the automatic
    evaluation's MLflow run) for blind review, aggregate every rating they have, and tag the
    challenger's model version with the aggregate."""
    import json
    import tempfile
    from pathlib import Path

    import mlflow.artifacts

    from refinery.core.tracking import client_for

    with tempfile.TemporaryDirectory(prefix="refinery-artifact-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=evaluation_run_id,
            artifact_path="evaluation.json",
            tracking_uri=tracking_uri,
            dst_path=tmp,
        )
        evaluation = json.loads(Path(local).read_text())
    queued, summaries = 0, {}
    for role in ("challenger", "champion"):
        if role not in evaluation:
            continue
        label = evaluation[role]["model"]
        examples = [ExampleResult(**e) for e in evaluation[role]["examples"]]
        queued += enqueue(engine, label, examples, sample=sample, seed=seed)
        ratings = collect_ratings(engine, tracking_uri, label)
        s = ratings.summary()
        summaries[role] = RatingSummary(
            label, s.count, s.mean, s.ci_low, s.ci_high, ratings.ignored
        )
    challenger = summaries["challenger"]
    name, version = challenger.model.rsplit("/", 1)
    client = client_for(tracking_uri)
    for key in ("count", "mean", "ci_low", "ci_high"):
        client.set_model_version_tag(
            name, version, f"refinery.human.{key}", f"{getattr(challenger, key):.4g}"
        )
    return HumanEvaluation(challenger, summaries.get("champion"), queued)
