from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A brand-new REFINERY_HOME (its own Postgres, MLflow store and Dagster instance)."""
    from refinery.core.settings import Settings
    from refinery.core.stores import prepare_dagster_home, stop_embedded_postgres

    home = tmp_path / "home"
    monkeypatch.setenv("REFINERY_HOME", str(home))
    settings = Settings.from_env()
    monkeypatch.setenv("DAGSTER_HOME", str(prepare_dagster_home(settings)))
    yield home
    stop_embedded_postgres(settings)
