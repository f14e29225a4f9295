"""Blind human review against the real Postgres and a real MLflow store with real traces:
tokens, validation, MLflow feedback, the aggregate, and the sensor that reacts to ratings."""

from __future__ import annotations

import uuid

import dagster as dg
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from evaluation import review
from evaluation.review_app import create_app
from tests.review_helpers import make_queue

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(store, mlflow_uri, tmp_path):
    """Six traced examples of two models, queued for review."""
    return make_queue(store.engine, mlflow_uri, tmp_path)


def test_review_api_validates_everything_and_records_mlflow_feedback(store, mlflow_uri, queue):
    token = review.add_reviewer(store.engine, "alice")
    with pytest.raises(review.ReviewError, match="exists"):
        review.add_reviewer(store.engine, "alice")
    client = TestClient(create_app(store.engine, mlflow_uri))
    auth = {"Authorization": f"Bearer {token}"}

    assert client.get("/api/next").status_code == 401
    assert client.get("/api/next", headers={"Authorization": "Bearer nope"}).json() == {
        "error": "unknown reviewer token"
    }
    page = client.get("/")
    assert page.status_code == 200 and "Reviewer token" in page.text

    first = client.get("/api/next", headers=auth).json()
    item = first["item"]
    assert first["remaining"] == 6
    assert set(item) == {"item_id", "question", "answer", "sources"}  # blind: no model identity

    bad = [
        ({"item_id": item["item_id"], "rating": 0}, 422),
        ({"item_id": item["item_id"], "rating": 6}, 422),
        ({"item_id": item["item_id"], "rating": "5"}, 422),
        ({"item_id": item["item_id"], "rating": True}, 422),
        ({"item_id": item["item_id"], "rating": 4.5}, 422),
        ({"item_id": "no-such-item", "rating": 4}, 404),
        ([1, 2], 422),
    ]
    for body, status in bad:
        r = client.post("/api/ratings", json=body, headers=auth)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()
    assert client.post("/api/ratings", content=b"{not json", headers=auth).status_code == 400
    assert client.post("/api/ratings", content=b"x" * 20000, headers=auth).status_code == 413
    assert (
        client.post("/api/ratings", json={"item_id": item["item_id"], "rating": 4}).status_code
        == 401
    )

    ok = client.post(
        "/api/ratings",
        json={"item_id": item["item_id"], "rating": 4, "comment": "good"},
        headers=auth,
    )
    assert ok.status_code == 201
    dup = client.post("/api/ratings", json={"item_id": item["item_id"], "rating": 5}, headers=auth)
    assert dup.status_code == 409 and "already rated" in dup.json()["error"]
    assert client.get("/api/next", headers=auth).json()["item"]["item_id"] != item["item_id"]

    # The rating is MLflow feedback on that trace, from a HUMAN source, with the reviewer's id.
    from mlflow.tracing.client import TracingClient

    with store.engine.connect() as conn:
        trace_id = conn.execute(
            sa.text("SELECT trace_id FROM review_items WHERE item_id = :i"), {"i": item["item_id"]}
        ).scalar_one()
    (fb,) = [
        a
        for a in TracingClient(mlflow_uri).get_trace(trace_id).info.assessments
        if a.name == "rating"
    ]
    assert (fb.value, fb.source.source_type, fb.source.source_id, fb.rationale) == (
        4,
        "HUMAN",
        "alice",
        "good",
    )


def test_aggregate_counts_page_and_mlflow_ui_ratings(store, mlflow_uri, queue):
    from mlflow.entities import AssessmentSource, Feedback
    from mlflow.tracing.client import TracingClient

    tokens = {name: review.add_reviewer(store.engine, name) for name in ("ann", "ben")}
    t = sa.table("review_items", sa.column("item_id"), sa.column("trace_id"), sa.column("model"))
    with store.engine.connect() as conn:
        items = conn.execute(
            sa.select(t.c.item_id, t.c.trace_id).where(t.c.model == "chat/2")
        ).all()
    for name, token in tokens.items():
        who = review.authenticate(store.engine, token)
        for row in items:
            review.rate(store.engine, mlflow_uri, who, row.item_id, 5 if name == "ann" else 4)
    tc = TracingClient(mlflow_uri)
    # Ratings given in the MLflow UI count too; feedback that is not an integer 1-5 is ignored.
    tc.log_assessment(
        items[0].trace_id,
        Feedback(
            name="rating", value=3, source=AssessmentSource(source_type="HUMAN", source_id="carol")
        ),
    )
    tc.log_assessment(
        items[1].trace_id,
        Feedback(
            name="rating",
            value="great",
            source=AssessmentSource(source_type="HUMAN", source_id="carol"),
        ),
    )
    tc.log_assessment(
        items[2].trace_id,
        Feedback(
            name="rating",
            value=1,
            source=AssessmentSource(source_type="LLM_JUDGE", source_id="judge"),
        ),
    )
    ratings = review.collect_ratings(store.engine, mlflow_uri, "chat/2")
    assert sorted(ratings.ratings) == [3, 4, 4, 4, 5, 5, 5]
    assert ratings.ignored == 1
    summary = ratings.summary()
    assert summary.count == 7 and summary.mean == pytest.approx(30 / 7)
    assert summary.ci_low <= summary.mean <= summary.ci_high
    assert review.collect_ratings(store.engine, mlflow_uri, "chat/1").summary().count == 0


def test_sensor_starts_promotion_after_enough_new_ratings(store, mlflow_uri, queue, db_url):
    from assets.resources import PostgresResource
    from orchestration.automation import MIN_NEW_RATINGS, human_ratings_sensor

    resources = {"postgres": PostgresResource(url=db_url)}
    instance = dg.DagsterInstance.ephemeral()
    token = review.add_reviewer(store.engine, "dora")
    with dg.build_sensor_context(cursor="0", resources=resources, instance=instance) as ctx:
        first = human_ratings_sensor(ctx)
    assert not first.run_requests and "0 new ratings" in first.skip_reason.skip_message
    item_ids = [
        r
        for r in store.engine.connect()
        .execute(sa.text("SELECT item_id FROM review_items ORDER BY order_key"))
        .scalars()
    ]
    for item_id in item_ids[:MIN_NEW_RATINGS]:
        review.rate(store.engine, mlflow_uri, review.authenticate(store.engine, token), item_id, 4)
    # A promote run in progress: the sensor waits and keeps its cursor (the ratings stay new).
    busy = dg.DagsterRun(
        job_name="promote", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED
    )
    instance.add_run(busy)
    with dg.build_sensor_context(cursor="0", resources=resources, instance=instance) as ctx:
        waiting = human_ratings_sensor(ctx)
    assert not waiting.run_requests and waiting.cursor == "0"
    assert "in progress" in waiting.skip_reason.skip_message
    instance.report_run_canceled(busy)  # the running promotion ends
    with dg.build_sensor_context(cursor="0", resources=resources, instance=instance) as ctx:
        second = human_ratings_sensor(ctx)
    assert [r.run_key for r in second.run_requests] == [f"ratings-{MIN_NEW_RATINGS}"]
    assert second.cursor == str(MIN_NEW_RATINGS)
    with dg.build_sensor_context(
        cursor=second.cursor, resources=resources, instance=instance
    ) as ctx:
        third = human_ratings_sensor(ctx)  # nothing new since: no flood of runs
    assert not third.run_requests


def test_trace_ids_stay_unique_when_training_seeded_random(store, mlflow_uri, tmp_path):
    """The Trainer seeds Python's `random`; trace ids must not repeat because of it."""
    import random

    random.seed(42)
    first = make_queue(store.engine, mlflow_uri, tmp_path, labels=("m/1",), per_model=2)
    random.seed(42)
    second = make_queue(store.engine, mlflow_uri, tmp_path / "again", labels=("m/2",), per_model=2)
    ids = [e.trace_id for e in first["m/1"] + second["m/2"]]
    assert len(set(ids)) == 4
