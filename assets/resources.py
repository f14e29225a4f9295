"""Dagster resources: each owns its client, built at execution time, never at import.

They live here rather than in ``orchestration/`` because assets type their parameters with
them and the import direction is orchestration → assets; ``orchestration/definitions.py``
instantiates and configures them in one place. Settings reach assets only through these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, PrivateAttr

from evaluation.gate import GatePolicy, HumanGate, policy_from
from refinery.core.lineage import (
    TAG_CODE_VERSION,
    TAG_DAGSTER_ASSET_KEY,
    TAG_DAGSTER_RUN_ID,
    TAG_DAGSTER_RUN_URL,
    code_version,
)
from refinery.core.settings import RunSettings, Settings
from refinery.core.stores import make_engine, prepare_mlflow
from refinery.core.tracking import RunOpener, TrackedRun, tracked_run
from refinery.retrieval.embedding import Embedder
from refinery.retrieval.vectorstore import VectorStore


class HomeResource(dg.ConfigurableResource):
    """The platform's settings (``refinery.core.settings``) and its home: the default corpus
    folder and the local folders where models, datasets and reports are written.

    The one place the home is set: ``path`` empty: REFINERY_HOME, else ``.refinery/``. The
    other resources take this one (``orchestration/definitions.py`` hands the same object to
    each); the settings are read from the environment once per resource instance."""

    path: str = ""

    _settings: Settings | None = PrivateAttr(default=None)
    _runs: RunSettings | None = PrivateAttr(default=None)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            settings = Settings.from_env()
            if self.path:
                settings = replace(settings, home=Path(self.path).expanduser().resolve())
            self._settings = settings
        return self._settings

    @property
    def runs(self) -> RunSettings:
        """What runs use: the OpenVINO exporter, the Pushgateway."""
        if self._runs is None:
            self._runs = RunSettings.from_env()
        return self._runs

    @property
    def corpus_dir(self) -> Path:
        return self.settings.corpus_dir

    @property
    def models_dir(self) -> Path:
        return self.settings.models_dir

    def folder(self, name: str) -> Path:
        """``<home>/<name>`` (datasets, reports …), created on first use."""
        folder = self.settings.home / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def home_of(home: HomeResource | None) -> HomeResource:
    """``home``, or the default home when a resource was made without one (tests)."""
    return home if home is not None else HomeResource()


class PostgresResource(dg.ConfigurableResource):
    """Postgres + pgvector through the one engine factory (``refinery.core.stores.make_engine``).

    ``url`` empty (the default): REFINERY_DATABASE_URL if set, else the embedded server under
    the home, started on first use. The schema is created when the resource starts.
    """

    url: str = ""
    home: HomeResource | None = None

    _engine: sa.Engine | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._engine = make_engine(
            self.url or None, settings=home_of(self.home).settings, create_schema=True
        )

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
    set, else the local store under the home."""

    tracking_uri: str = ""
    ui_url: str = ""
    dagster_ui_url: str = ""
    home: HomeResource | None = None

    def _resolved(self) -> tuple[str, str, str, Settings]:
        settings = home_of(self.home).settings
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

    @property
    def ui_base(self) -> str:
        return self._resolved()[1]

    @property
    def trace_salt(self) -> str:
        """The key of the blind model tag on traces people rate (REFINERY_TRAFFIC_SALT)."""
        from refinery.core.settings import TrafficSettings

        return TrafficSettings.from_env().salt

    def model_version_url(self, name: str, version: str) -> str:
        return f"{self.ui_base}/#/models/{name}/versions/{version}"

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

    def run_opener(self, context: dg.AssetExecutionContext, experiment: str) -> RunOpener:
        """``asset_run`` as a plain function, for library code that opens a run only when it
        has work to record (a reused result opens none)."""
        return lambda params, tags: self.asset_run(context, experiment, params=params, tags=tags)

    def existing_run(self, run_id: str) -> TrackedRun:
        """A handle on a run made earlier (the training run that later steps add to)."""
        from refinery.core.tracking import client_for

        uri, ui_url, _, _ = self._resolved()
        client = client_for(uri)
        return TrackedRun(client, run_id, client.get_run(run_id).info.experiment_id, ui_url)


class PromotionPolicy(dg.ConfigurableResource):
    """Promotion thresholds, in one place. ``tolerances`` overrides the default tolerance of
    a metric rule (``evaluation.gate.DEFAULT_RULES``); ``rules`` restricts the comparison with
    the champion to those metrics. ``floors`` moves the bound of an absolute floor that every
    model must meet, the first one included (``evaluation.gate.DEFAULT_FLOORS``: metric ->
    minimum, or maximum for ``rag_wrong_shown``); ``rules`` does not turn floors off. Waiving
    the human gate needs a reason, and is recorded with every decision. ``confidence``: how sure
    the paired bootstrap must be that a challenger is not worse than the champion beyond a
    rule's tolerance (one-sided; ``evaluation.gate``)."""

    human_gate: HumanGate = HumanGate.required
    waiver_reason: str = ""
    min_ratings: int = 10
    min_mean: float = 4.0
    min_ci_low: float = 3.8
    rules: list[str] = Field(default_factory=list)
    tolerances: dict[str, float] = Field(default_factory=dict)
    floors: dict[str, float] = Field(default_factory=dict)
    confidence: float = 0.95

    def policy(self) -> GatePolicy:
        """The policy as the gate takes it; ValueError names an unknown metric."""
        return policy_from(
            human_gate=self.human_gate,
            waiver_reason=self.waiver_reason,
            min_ratings=self.min_ratings,
            min_mean=self.min_mean,
            min_ci_low=self.min_ci_low,
            rules=self.rules,
            tolerances=self.tolerances,
            floors=self.floors,
            confidence=self.confidence,
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


# --- metadata for people looking at the UI ---------------------------------------------------
def mlflow_metadata(run: TrackedRun | None = None, *, run_id: str = "", url: str = "") -> dict:
    """Dagster metadata that links a materialization to its MLflow run."""
    if run is not None:
        run_id, url = run.run_id, run.url
    return {"mlflow_run_id": run_id, "mlflow_run": dg.MetadataValue.url(url)}


def as_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    """Plain values as Dagster metadata: URLs clickable, dicts and lists as JSON, Markdown
    tables as Markdown; None is dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            out[key] = dg.MetadataValue.url(value)
        elif isinstance(value, str) and value.lstrip().startswith("|"):
            out[key] = dg.MetadataValue.md(value)
        elif isinstance(value, dict | list | tuple):
            out[key] = dg.MetadataValue.json(value if not isinstance(value, tuple) else list(value))
        else:
            out[key] = value
    return out


def failure(err: Exception | str) -> dg.Failure:
    """Bad config or data: fail the step with the message that says what to fix, no retry."""
    return dg.Failure(description=str(err), allow_retries=False)


@contextlib.contextmanager
def fails_on(*errors: type[Exception]) -> Iterator[None]:
    """The library's "what to fix" errors become a Dagster failure that is not retried."""
    try:
        yield
    except errors as err:
        raise failure(err) from err
