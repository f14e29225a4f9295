"""Settings from the environment, the environment printed for other CLIs, and Definitions."""

from __future__ import annotations

import dagster as dg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from refinery.core.settings import DEFAULT_CORPUS_DIR, REPO_ROOT, Settings
from refinery.core.stores import environment, prepare_dagster_home


def test_defaults_live_under_one_home():
    s = Settings.from_env({})
    assert s.home == REPO_ROOT / ".refinery"
    assert s.pgdata.parent == s.home and s.dagster_home.parent == s.home
    assert s.mlflow_tracking_uri == f"sqlite:///{s.home / 'mlflow' / 'mlflow.db'}"
    assert s.corpus_dir == DEFAULT_CORPUS_DIR
    assert s.database_url is None and s.mlflow_is_local


def test_one_variable_each_points_elsewhere(tmp_path):
    s = Settings.from_env(
        {
            "REFINERY_HOME": str(tmp_path),
            "REFINERY_DATABASE_URL": "postgresql+psycopg://u@db/x",
            "REFINERY_MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "REFINERY_MLFLOW_UI_URL": "http://mlflow.example/",
        }
    )
    assert s.home == tmp_path
    assert s.database_url == "postgresql+psycopg://u@db/x"
    assert s.mlflow_tracking_uri == "http://mlflow:5000" and not s.mlflow_is_local
    assert s.mlflow_ui_url == "http://mlflow.example"


def test_environment_for_standard_clis(tmp_path):
    s = Settings.from_env({"REFINERY_HOME": str(tmp_path)})
    env = environment(s, "postgresql+psycopg://postgres:@/postgres?host=/sock")
    assert env["DAGSTER_HOME"] == str(tmp_path / "dagster")
    assert env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    assert (
        env["DATABASE_URL"] == "postgresql://postgres:@/postgres?host=/sock"
    )  # libpq form for psql
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DAGSTER_DISABLE_TELEMETRY"] == "true"


def test_dagster_home_has_telemetry_off(tmp_path):
    home = prepare_dagster_home(Settings.from_env({"REFINERY_HOME": str(tmp_path)}))
    text = (home / "dagster.yaml").read_text()
    assert "telemetry:\n  enabled: false" in text


def test_definitions_load_with_the_ingestion_graph():
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"source_documents", "document_chunks", "chunk_embeddings"} <= keys
    assert graph.get(dg.AssetKey("chunk_embeddings")).parent_keys == {
        dg.AssetKey("document_chunks")
    }
    assert graph.get(dg.AssetKey("document_chunks")).parent_keys == {
        dg.AssetKey("source_documents")
    }
    checks = {k.name for k in graph.asset_check_keys}
    assert {
        "every_chunk_embedded",
        "no_orphan_embeddings",
        "no_nan_embeddings",
        "hnsw_index_exists",
    } <= checks
    assert defs.resolve_job_def("ingest") and defs.resolve_job_def("refinery")
    # What a code server does on load (job and asset names must not clash, for one).
    dg.Definitions.validate_loadable(defs)


def test_the_loop_is_wired_and_cannot_flood():
    from orchestration.definitions import defs
    from refinery.core.stores import DAGSTER_YAML

    sensors = {s.name: s for s in defs.sensors or []}
    assert {"corpus_sensor", "retraining_sensor", "human_ratings_sensor"} <= set(sensors)
    assert sensors["refinery_automation"].default_status == dg.DefaultSensorStatus.RUNNING
    schedules = {s.name: s.cron_schedule for s in defs.schedules or []}
    assert schedules == {
        "daily_drift_schedule": "0 6 * * *",
        "weekly_retraining_schedule": "0 3 * * 1",
    }
    for job in ("train", "evaluate", "retrain"):
        assert defs.resolve_job_def(job).tags["refinery/pool"] == "models"
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("bento")).automation_condition is not None
    assert graph.get(dg.AssetKey("drift_report")).parent_keys == {dg.AssetKey("traffic_log")}
    # `make run` does not try to report on traffic that a fresh install does not have.
    run_keys = defs.resolve_job_def("refinery").asset_layer.selected_asset_keys
    assert dg.AssetKey("drift_report") not in run_keys and dg.AssetKey("bento") in run_keys
    assert "max_catchup_runs: 1" in DAGSTER_YAML and "limit: 1" in DAGSTER_YAML


def test_importing_definitions_has_no_side_effects(tmp_path, monkeypatch):
    import importlib
    import sys

    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    for name in [m for m in sys.modules if m.split(".")[0] in ("orchestration", "assets")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.import_module("orchestration.definitions")
    assert not (tmp_path / "home").exists()


def test_source_filters_are_parameterized_and_escaped():
    from refinery.retrieval.search import _source_clause

    col = sa.column("source")
    exact = _source_clause(col, "a_b%.md").compile(dialect=postgresql.dialect())
    assert "=" in str(exact) and exact.params == {"source_1": "a_b%.md"}
    glob = _source_clause(col, "guides/*_v1%.md").compile(dialect=postgresql.dialect())
    assert "LIKE" in str(glob)
    assert glob.params["source_1"] == "guides/%\\_v1\\%.md"
