"""MLflow runs through the explicit client, against a real (SQLite) MLflow store."""

from __future__ import annotations

import pytest

from refinery.core.tracking import client_for, tracked_run

pytestmark = pytest.mark.integration


def test_run_records_tags_params_metrics_and_artifacts(mlflow_uri, tmp_path):
    with tracked_run(
        mlflow_uri,
        "exp",
        run_name="r1",
        tags={"dagster.run_id": "abc"},
        artifact_root=tmp_path / "art",
    ) as run:
        run.log_params({"chunk_size": 200, "long": "x" * 10000})
        run.log_metrics({"chunks": 12, "nan_is_dropped": float("nan")})
        run.log_dict({"a": 1}, "report.json")
    client = client_for(mlflow_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["dagster.run_id"] == "abc"
    assert got.data.params["chunk_size"] == "200" and len(got.data.params["long"]) == 6000
    assert got.data.metrics == {"chunks": 12.0}
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["report.json"]
    assert (tmp_path / "art" / "exp").is_dir()  # artifacts under the platform's home
    assert run.url.endswith(f"/#/experiments/{run.experiment_id}/runs/{run.run_id}")


def test_failed_work_ends_the_run_failed(mlflow_uri):
    with pytest.raises(RuntimeError), tracked_run(mlflow_uri, "exp", run_name="boom") as run:
        raise RuntimeError("boom")
    assert client_for(mlflow_uri).get_run(run.run_id).info.status == "FAILED"
