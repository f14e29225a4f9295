"""Where Refinery keeps its state, read from the environment once, explicitly.

Nothing here runs at import time: callers build a ``Settings`` with ``Settings.from_env()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS_DIR = REPO_ROOT / "data" / "corpus"

# Telemetry that cannot reach the network only slows things down; model hubs are not reachable
# (models load from pip packages or local folders); per-tensor loading bars drown the logs.
OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class Settings:
    """One home directory for every embedded store; one variable each to point elsewhere.

    REFINERY_HOME                 home of the embedded stores (default: .refinery/ in the checkout)
    REFINERY_DATABASE_URL         an external Postgres (with pgvector >= 0.7) instead of the embedded one
    REFINERY_MLFLOW_TRACKING_URI  an MLflow server instead of the local SQLite store
    REFINERY_CORPUS_DIR           the corpus folder (default: data/corpus in the checkout)
    REFINERY_MLFLOW_UI_URL        base URL of the MLflow UI, for links (default http://127.0.0.1:5000)
    REFINERY_DAGSTER_UI_URL       base URL of the Dagster UI, for links (default http://127.0.0.1:3100)
    """

    home: Path
    database_url: str | None = None
    mlflow_tracking_uri_override: str | None = None
    corpus_dir: Path = DEFAULT_CORPUS_DIR
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    dagster_ui_url: str = "http://127.0.0.1:3100"
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("REFINERY_HOME") or REPO_ROOT / ".refinery").expanduser().resolve()
        return cls(
            home=home,
            database_url=env.get("REFINERY_DATABASE_URL") or None,
            mlflow_tracking_uri_override=env.get("REFINERY_MLFLOW_TRACKING_URI") or None,
            corpus_dir=Path(env.get("REFINERY_CORPUS_DIR") or DEFAULT_CORPUS_DIR).expanduser(),
            mlflow_ui_url=(env.get("REFINERY_MLFLOW_UI_URL") or cls.mlflow_ui_url).rstrip("/"),
            dagster_ui_url=(env.get("REFINERY_DAGSTER_UI_URL") or cls.dagster_ui_url).rstrip("/"),
        )

    @property
    def pgdata(self) -> Path:
        return self.home / "postgres"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def mlflow_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri_override:
            return self.mlflow_tracking_uri_override
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_is_local(self) -> bool:
        return self.mlflow_tracking_uri_override is None

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
