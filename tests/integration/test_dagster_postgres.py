"""REFINERY_DAGSTER_DATABASE_URL: Dagster's runs, event logs, schedules and run queue in
Postgres, so two homes on two disks see one instance; unset, SQLite under the home."""

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

from refinery.core.settings import SettingError, Settings
from refinery.core.stores import DAGSTER_STORAGE_ENV, environment, prepare_dagster_home
from tests.support import fresh_database


@dg.op
def hello() -> int:
    return 1


@dg.job
def tiny() -> None:
    hello()


def _instance(home: Path, monkeypatch: pytest.MonkeyPatch) -> dg.DagsterInstance:
    """The instance a Refinery command in ``home`` uses (the variables `refinery env` gives)."""
    settings = Settings.from_env()
    assert settings.home == home
    if settings.dagster_database_url:
        monkeypatch.setenv(DAGSTER_STORAGE_ENV, environment(settings, None)[DAGSTER_STORAGE_ENV])
    return dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))


def test_two_homes_share_one_dagster_instance_in_postgres(
    tmp_path: Path, server_url: str, monkeypatch: pytest.MonkeyPatch
):
    with fresh_database(server_url) as url:
        # The same form as REFINERY_DATABASE_URL (SQLAlchemy's, with the psycopg driver).
        monkeypatch.setenv("REFINERY_DAGSTER_DATABASE_URL", url)
        monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "a"))
        a = _instance(tmp_path / "a", monkeypatch)
        config = yaml.safe_load((tmp_path / "a" / "dagster" / "dagster.yaml").read_text())
        # The URL is read from the variable, never written to the home.
        assert config["storage"] == {"postgres": {"postgres_url": {"env": DAGSTER_STORAGE_ENV}}}
        assert "password" not in (tmp_path / "a" / "dagster" / "dagster.yaml").read_text()
        assert type(a.run_storage).__name__ == "PostgresRunStorage"
        assert type(a.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(a.schedule_storage).__name__ == "PostgresScheduleStorage"
        done = tiny.execute_in_process(instance=a)

        monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "b"))
        b = _instance(tmp_path / "b", monkeypatch)  # another disk, the same instance
        seen = b.get_run_by_id(done.run_id)
        assert seen is not None and seen.status == DagsterRunStatus.SUCCESS
        assert any(e.step_key == "hello" for e in b.all_logs(done.run_id))
        # The run queue is the run storage: what one home's coordinator counts, the other's does.
        assert b.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.SUCCESS])) == 1
        a.dispose()
        b.dispose()

        monkeypatch.delenv("REFINERY_DAGSTER_DATABASE_URL")
        monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "a"))
        # Unset again: the embedded SQLite (the file is rewritten).
        local = _instance(tmp_path / "a", monkeypatch)
        assert type(local.run_storage).__name__ == "SqliteRunStorage"
        assert local.get_run_by_id(done.run_id) is None
        local.dispose()


def test_a_dagster_database_url_that_is_not_postgres_is_refused_naming_the_variable():
    with pytest.raises(SettingError, match=r"REFINERY_DAGSTER_DATABASE_URL: .*'mysql'") as err:
        Settings.from_env({"REFINERY_DAGSTER_DATABASE_URL": "mysql://u:secret@h/d"})
    assert "secret" not in str(err.value)
    for ok in ("postgresql://u@h/d", "postgres://u@h/d", "postgresql+psycopg://u@h/d"):
        assert Settings.from_env({"REFINERY_DAGSTER_DATABASE_URL": ok}).dagster_database_url
