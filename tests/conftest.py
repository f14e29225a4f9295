"""Shared fixtures. The whole session runs against its own REFINERY_HOME in a temporary folder,
so tests never touch a developer's stores; the embedded Postgres it starts stops at exit."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from refinery.core.settings import OFFLINE_ENV, REPO_ROOT

SAMPLE_CORPUS = REPO_ROOT / "data" / "corpus"

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="refinery-test-home-"))


def pytest_configure(config: pytest.Config) -> None:
    os.environ["REFINERY_HOME"] = str(_SESSION_HOME)
    os.environ.pop("REFINERY_DATABASE_URL", None)
    os.environ.pop("REFINERY_MLFLOW_TRACKING_URI", None)
    os.environ.pop("REFINERY_CORPUS_DIR", None)
    os.environ["DAGSTER_HOME"] = str(_SESSION_HOME / "dagster")
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


TESTS = Path(__file__).resolve().parent
TIER_TIMEOUTS = {"unit": 60, "integration": 600, "e2e": 1500}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets its tier's marker (from its folder) and the tier's time limit, unless it
    sets its own; every e2e test is ``slow`` (integration tests that take more than a minute
    say so themselves); a GPU test is skipped, saying why, where no CUDA device is present."""
    for item in items:
        tier = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        if tier in TIER_TIMEOUTS:
            item.add_marker(getattr(pytest.mark, tier))
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(TIER_TIMEOUTS[tier]))
        if tier == "e2e":  # each one runs the graph through Dagster: minutes on 2 cores
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") is not None and not _cuda():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is present here"))


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def pytest_unconfigure(config: pytest.Config) -> None:
    from refinery.core.settings import Settings
    from refinery.core.stores import stop_embedded_postgres

    try:
        stop_embedded_postgres(Settings.from_env())
    finally:
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def settings():
    from refinery.core.settings import Settings

    return Settings.from_env()


@pytest.fixture(scope="session")
def server_url(settings) -> str:
    """URL of the session's embedded Postgres (database "postgres")."""
    from refinery.core.stores import database_url

    return database_url(settings)


@pytest.fixture
def db_url(server_url: str) -> Iterator[str]:
    """A fresh, empty database on the embedded server for one test, dropped afterwards."""
    from tests.support import fresh_database

    with fresh_database(server_url) as url:
        yield url


@pytest.fixture
def store(db_url: str):
    import sqlalchemy as sa

    from refinery.retrieval.vectorstore import VectorStore

    engine = sa.create_engine(db_url)
    s = VectorStore(engine)
    s.create_schema()
    yield s
    engine.dispose()


@pytest.fixture(scope="session")
def embedder():
    from refinery.retrieval.embedding import Embedder

    return Embedder()


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A copy of six sample documents, one or two of each format, to edit freely."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in [
        "colony-castes-and-development.md",
        "varroa-mite-monitoring-and-treatment.md",
        "queen-mating-flight.txt",
        "waggle-and-round-dances.html",
        "siting-an-apiary.pdf",
        "splitting-colonies.pdf",
    ]:
        shutil.copy(SAMPLE_CORPUS / name, corpus / name)
    return corpus


# --- a tiny random Llama for the training library (unit and integration tiers) ---------------
@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from tests.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", SAMPLE_CORPUS)


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def dataset(tokenizer):
    from training.sft_data import SFTConfig, build_dataset

    return build_dataset(SFTConfig(max_tokens=512), tokenizer)
