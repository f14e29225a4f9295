"""Dagster resources: each owns its client, built at execution time, never at import.

They live here rather than in ``orchestration/`` because assets type their parameters with
them and the import direction is orchestration → assets; ``orchestration/definitions.py``
instantiates and configures them in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, PrivateAttr

from refinery.lineage import (
    TAG_CODE_VERSION,
    TAG_DAGSTER_ASSET_KEY,
    TAG_DAGSTER_RUN_ID,
    TAG_DAGSTER_RUN_URL,
    code_version,
)
from refinery.settings import Settings
from refinery.stores import database_url, prepare_mlflow
from refinery.tracking import TrackedRun, tracked_run
from serving.corpus.embedding import Embedder
from serving.corpus.vectorstore import VectorStore


def _settings(home: str) -> Settings:
    settings = Settings.from_env()
    if home:
        from dataclasses import replace
        from pathlib import Path

        settings = replace(settings, home=Path(home).expanduser().resolve())
    return settings


class PostgresResource(dg.ConfigurableResource):
    """Postgres + pgvector through a SQLAlchemy 2 engine.

    ``url`` empty (the default): REFINERY_DATABASE_URL if set, else the embedded server under
    REFINERY_HOME, started on first use.
    """

    url: str = ""
    home: str = ""

    _engine: sa.Engine | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        settings = _settings(self.home)
        url = self.url or database_url(settings)
        self._engine = sa.create_engine(url, pool_pre_ping=True)
        VectorStore(self._engine).create_schema()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            raise RuntimeError("PostgresResource used outside of a Dagster execution")
        return self._engine

    def store(self) -> VectorStore:
        return VectorStore(self.engine)


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry. Empty ``tracking_uri``: REFINERY_MLFLOW_TRACKING_URI if
    set, else the local store under REFINERY_HOME."""

    tracking_uri: str = ""
    ui_url: str = ""
    dagster_ui_url: str = ""
    home: str = ""

    def _resolved(self) -> tuple[str, str, str, Settings]:
        settings = _settings(self.home)
        uri = self.tracking_uri or prepare_mlflow(settings)
        return (
            uri,
            self.ui_url or settings.mlflow_ui_url,
            self.dagster_ui_url or settings.dagster_ui_url,
            settings,
        )

    @property
    def resolved_tracking_uri(self) -> str:
        return self._resolved()[0]

    @property
    def store_settings(self) -> Settings:
        """The settings of the home this resource's local stores live in."""
        return self._resolved()[3]

    def lineage_tags(self, context: dg.AssetExecutionContext) -> dict[str, str]:
        """Tags that say exactly which Dagster run, asset and code made an MLflow object."""
        _, _, dagster_ui, _ = self._resolved()
        return {
            TAG_DAGSTER_RUN_ID: context.run_id,
            TAG_DAGSTER_RUN_URL: f"{dagster_ui}/runs/{context.run_id}",
            TAG_DAGSTER_ASSET_KEY: context.asset_key.to_user_string(),
            TAG_CODE_VERSION: code_version(),
        }

    @contextlib.contextmanager
    def asset_run(
        self,
        context: dg.AssetExecutionContext,
        experiment: str,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Iterator[TrackedRun]:
        """An MLflow run for one asset materialization, tagged with its Dagster lineage."""
        uri, ui_url, _, settings = self._resolved()
        asset = context.asset_key.to_user_string()
        all_tags = {**self.lineage_tags(context), **(tags or {})}
        with tracked_run(
            uri,
            experiment,
            run_name=f"{asset}-{context.run_id[:8]}",
            tags=all_tags,
            artifact_root=settings.mlflow_artifacts_dir
            if not self.tracking_uri and settings.mlflow_is_local
            else None,
            ui_url=ui_url,
        ) as run:
            if params:
                run.log_params(params)
            yield run

    @property
    def ui_base(self) -> str:
        return self._resolved()[1]

    def existing_run(self, run_id: str) -> TrackedRun:
        """A handle on a run made earlier (the training run that later steps add to)."""
        from refinery.tracking import client_for

        uri, ui_url, _, _ = self._resolved()
        client = client_for(uri)
        return TrackedRun(client, run_id, client.get_run(run_id).info.experiment_id, ui_url)


def upstream_metadata(context: dg.AssetExecutionContext, asset: str) -> dict[str, Any]:
    """Metadata values of an upstream asset's latest materialization (paths, ids, hashes)."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        raise dg.Failure(
            description=f"{asset} has never been materialized: materialize it first",
            allow_retries=False,
        )
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def mlflow_metadata(run: TrackedRun) -> dict[str, Any]:
    """Dagster metadata that links a materialization to its MLflow run."""
    return {
        "mlflow_run_id": run.run_id,
        "mlflow_run": dg.MetadataValue.url(run.url),
    }


class PromotionPolicy(dg.ConfigurableResource):
    """Promotion thresholds, in one place. ``tolerances`` overrides the default tolerance of
    a metric rule (``evaluation.gate.DEFAULT_RULES``); ``rules`` restricts the gate to those
    metrics. Waiving the human gate needs a reason, and is recorded with every decision."""

    human_gate: str = "required"  # "required" or "waived"
    waiver_reason: str = ""
    min_ratings: int = 10
    min_mean: float = 4.0
    min_ci_low: float = 3.8
    rules: list[str] = Field(default_factory=list)
    tolerances: dict[str, float] = Field(default_factory=dict)

    def policy(self) -> Any:
        from dataclasses import replace

        from evaluation.gate import DEFAULT_RULES, GatePolicy, HumanRule

        if self.human_gate not in ("required", "waived"):
            raise ValueError(f"human_gate must be 'required' or 'waived', got {self.human_gate!r}")
        known = {r.metric for r in DEFAULT_RULES}
        unknown = sorted((set(self.rules) | set(self.tolerances)) - known)
        if unknown:
            raise ValueError(f"unknown gate metrics {unknown}; known: {sorted(known)}")
        rules = tuple(
            replace(r, tolerance=self.tolerances.get(r.metric, r.tolerance))
            for r in DEFAULT_RULES
            if not self.rules or r.metric in self.rules
        )
        return GatePolicy(
            rules=rules,
            human=HumanRule(self.min_ratings, self.min_mean, self.min_ci_low),
            human_gate=self.human_gate,
            waiver_reason=self.waiver_reason,
        )


class EmbeddingModelResource(dg.ConfigurableResource):
    """The sentence-transformers model that chunking (its tokenizer) and embedding share.

    ``model``: a hub id or a local folder; empty: all-MiniLM-L6-v2 from its pip package.
    The model loads on first use, so a run with nothing to embed never loads it.
    """

    model: str = ""
    device: str = "cpu"

    _embedder: Embedder | None = PrivateAttr(default=None)

    def get(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.model or None, device=self.device)
        return self._embedder
