"""Settings from the environment (every variable declared once, bad values named, secrets
masked in `refinery settings`), the environment printed for other CLIs, and Definitions."""

from __future__ import annotations

import json
import re

import dagster as dg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.dialects import postgresql

from refinery.core.settings import (
    DEFAULT_CORPUS_DIR,
    REPO_ROOT,
    RunSettings,
    ServingSettings,
    SettingError,
    Settings,
    describe,
    variables,
)
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


def test_links_name_the_mlflow_server_that_is_configured(tmp_path):
    home = {"REFINERY_HOME": str(tmp_path)}
    assert Settings.from_env(home).mlflow_ui_url == "http://127.0.0.1:5000"  # what `make ui` serves
    remote = {**home, "REFINERY_MLFLOW_TRACKING_URI": "https://bob:s3cret@mlflow.corp:8443/ml/"}
    assert Settings.from_env(remote).mlflow_ui_url == "https://mlflow.corp:8443/ml"  # no password
    databricks = {**home, "REFINERY_MLFLOW_TRACKING_URI": "databricks"}
    assert Settings.from_env(databricks).mlflow_ui_url == "http://127.0.0.1:5000"


def test_a_bentos_pinned_home_is_a_fallback_not_an_override(tmp_path):
    pinned = {"REFINERY_HOME": str(tmp_path / "pinned")}
    assert Settings.from_env({}, fallback=pinned).home == tmp_path / "pinned"
    env = {"REFINERY_HOME": str(tmp_path / "env")}
    assert Settings.from_env(env, fallback=pinned).home == tmp_path / "env"


# Every REFINERY_* name the code and the manifests use; `REFINERY_TRAFFIC_*` is not a name.
_NAME = re.compile(r"\bREFINERY_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def test_every_variable_is_declared_once_and_every_one_used_is_declared():
    declared = variables()
    assert len(declared) == len(set(declared)), "a variable is declared twice"
    used: dict[str, str] = {}
    for folder in ("refinery", "serving", "training", "evaluation", "assets", "orchestration"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            used.update(dict.fromkeys(_NAME.findall(path.read_text()), str(path)))
    for path in (REPO_ROOT / "deploy").rglob("*"):
        if path.is_file() and path.suffix in ("", ".yaml", ".yml", ".json", ".md", ".env"):
            used.update(dict.fromkeys(_NAME.findall(path.read_text(errors="ignore")), str(path)))
    undeclared = {name: where for name, where in used.items() if name not in declared}
    assert not undeclared, f"used but not declared in refinery/core/settings.py: {undeclared}"


def _deploy_values(doc: object, found: dict[str, set[str]]) -> None:
    """REFINERY_* values in a manifest: ConfigMap data (NAME: value) and container env."""
    if isinstance(doc, dict):
        name = doc.get("name")
        if isinstance(name, str) and name.startswith("REFINERY_") and "value" in doc:
            found.setdefault(name, set()).add(str(doc["value"]))
        for key, value in doc.items():
            if isinstance(key, str) and key.startswith("REFINERY_"):
                found.setdefault(key, set()).add(str(value))
            _deploy_values(value, found)
    elif isinstance(doc, list):
        for item in doc:
            _deploy_values(item, found)


def test_every_value_the_manifests_set_is_valid():
    import yaml

    found: dict[str, set[str]] = {}
    for path in sorted((REPO_ROOT / "deploy").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            _deploy_values(doc, found)
    for path in sorted((REPO_ROOT / "deploy").rglob("*.env")):  # configMapGenerator sources
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, value = line.partition("=")
                found.setdefault(name.strip(), set()).add(value.strip())
    assert {"REFINERY_ENGINE", "REFINERY_DEVICE", "REFINERY_RUN_ACCELERATOR"} <= set(found)
    for name, values in found.items():
        for value in values:
            for group in (Settings, ServingSettings, RunSettings):
                group.from_env({name: value})  # raises SettingError on a bad one


def test_only_the_settings_and_processes_modules_touch_the_environment():
    allowed = {"refinery/core/settings.py", "refinery/core/processes.py"}
    # Not a Refinery setting: LOCAL_RANK is what accelerate tells each training process.
    exempt = ("LOCAL_RANK",)
    found = []
    for folder in ("refinery", "serving", "training", "evaluation"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            for n, line in enumerate(path.read_text().splitlines(), 1):
                touches = re.search(r"os\.environ|getenv|os\.putenv", line)
                if touches and rel not in allowed and not any(e in line for e in exempt):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, (
        "read settings through refinery.core.settings, pass the environment "
        f"to children through refinery.core.processes: {found}"
    )


def test_a_bad_value_names_the_variable_and_what_is_wrong():
    with pytest.raises(SettingError) as err:
        ServingSettings.from_env(
            {
                "REFINERY_CHAT_MAX_BATCH": "lots",
                "REFINERY_GUARD": "maybe",
                "REFINERY_TRAFFIC_SAMPLE": "2",
                "REFINERY_ACCESS_LOG": "loud",
            }
        )
    message = str(err.value)  # every bad value at once, not the first one only
    assert "REFINERY_CHAT_MAX_BATCH must be a whole number, got 'lots'" in message
    assert "REFINERY_GUARD must be one of block, off, got 'maybe'" in message
    assert "REFINERY_TRAFFIC_SAMPLE must be in [0, 1], got 2.0" in message
    assert "REFINERY_ACCESS_LOG must be on or off, got 'loud'" in message
    with pytest.raises(SettingError, match="REFINERY_RUN_GPUS must be >= 1, got 0"):
        RunSettings.from_env({"REFINERY_RUN_GPUS": "0"})
    with pytest.raises(ValueError, match="REFINERY_REQUEST_TIMEOUT_S must be a number"):
        ServingSettings.from_env({"REFINERY_REQUEST_TIMEOUT_S": "2 min"})
    # A test that constructs a group gets the same checks.
    with pytest.raises(SettingError, match="REFINERY_ENTRY_WORKERS must be >= 1, got 0"):
        ServingSettings(entry_workers=0)
    # Empty is unset: the default.
    assert ServingSettings.from_env({"REFINERY_CHAT_MAX_BATCH": " "}).chat_max_batch == 32


def test_values_are_typed():
    s = ServingSettings.from_env(
        {
            "REFINERY_API_KEYS": " k1, k2 ,",
            "REFINERY_ACCESS_LOG": "off",
            "REFINERY_TORCH_THREADS": "2",
            "REFINERY_MAX_TOKENS": "64",
            "REFINERY_TRAFFIC_PRIVACY": "hash",
            "REFINERY_IMAGE_MAX_BATCH": "1",
        }
    )
    assert s.api_keys == ("k1", "k2") and s.access_log is False and s.torch_threads == 2
    assert s.limits.max_tokens == 64 and s.traffic.privacy == "hash" and s.images.max_batch == 1
    assert ServingSettings().torch_threads is None and ServingSettings().speculation == "none"


_SECRETS = {
    "REFINERY_API_KEYS": "key-one,key-two",
    "REFINERY_DATABASE_URL": "postgresql+psycopg://app:s3cret@db:5432/refinery",
    "REFINERY_REDIS_URL": "redis://:hunter2@redis:6379/0",
    "REFINERY_TRAFFIC_SALT": "pepper",
    "REFINERY_MLFLOW_TRACKING_URI": "http://mlflow:5000",
}


def test_the_listing_has_every_setting_with_its_doc_and_secrets_masked():
    env = _SECRETS
    groups = (Settings.from_env(env), ServingSettings.from_env(env), RunSettings.from_env(env))
    rows = {r.variable: r for r in describe(*groups)}
    assert list(rows) == variables() and all(r.doc for r in rows.values())
    assert rows["REFINERY_API_KEYS"].value == "****,****"
    assert rows["REFINERY_DATABASE_URL"].value == "postgresql+psycopg://app:****@db:5432/refinery"
    assert rows["REFINERY_REDIS_URL"].value == "redis://:****@redis:6379/0"
    assert rows["REFINERY_TRAFFIC_SALT"].value == "****"
    assert rows["REFINERY_MLFLOW_TRACKING_URI"].value == "http://mlflow:5000"  # no secret in it
    assert not rows["REFINERY_MLFLOW_TRACKING_URI"].default and rows["REFINERY_GUARD"].default
    shown = json.dumps([vars(r) for r in rows.values()])
    for secret in ("key-one", "key-two", "s3cret", "hunter2", "pepper"):
        assert secret not in shown


def test_refinery_settings_prints_every_setting_masked_and_refuses_bad_values(tmp_path):
    from orchestration.cli import main

    env = {**_SECRETS, "REFINERY_HOME": str(tmp_path / "home")}
    result = CliRunner().invoke(main, ["settings"], env=env)
    assert result.exit_code == 0, result.output
    for name in variables():
        assert name in result.output
    assert "* REFINERY_HOME" in result.output and str(tmp_path / "home") in result.output
    assert "Home of the embedded stores" in result.output
    for secret in ("key-one", "s3cret", "hunter2", "pepper"):
        assert secret not in result.output
    assert not (tmp_path / "home").exists()  # listing creates nothing
    listed = json.loads(CliRunner().invoke(main, ["settings", "--json"], env=env).output)
    assert {r["variable"] for r in listed} == set(variables())
    bad = CliRunner().invoke(main, ["settings"], env={"REFINERY_ENGINE": "vllm"})
    assert bad.exit_code == 1
    assert "REFINERY_ENGINE must be one of auto, openvino, hf, static, got 'vllm'" in bad.output


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
    # The home is set in one place: every resource that keeps files under it takes that one.
    home = defs.resources["home"]
    for key in ("io_manager", "postgres", "mlflow"):
        assert defs.resources[key].home == home, key


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


def test_isolated_env_drops_every_store_setting_and_adds_the_offline_ones(monkeypatch):
    from refinery.core.settings import OFFLINE_ENV, isolated_env

    monkeypatch.setenv("REFINERY_DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    monkeypatch.setenv("DAGSTER_HOME", "/elsewhere")
    monkeypatch.setenv("PATH_FOR_THE_TEST", "kept")
    env = isolated_env(REFINERY_HOME="/mine")
    assert env["REFINERY_HOME"] == "/mine" and env["PATH_FOR_THE_TEST"] == "kept"
    assert not {"REFINERY_DATABASE_URL", "MLFLOW_TRACKING_URI", "DAGSTER_HOME"} & set(env)
    assert all(env[k] == v for k, v in OFFLINE_ENV.items())
