"""The I/O manager that carries assets' values (small frozen dataclasses) from one asset to the
next, through Postgres (table ``handoffs``, one row per asset and run; nothing is pickled), so a
run on any machine reads what a run on another wrote.

A value's local paths to models and datasets (the fields marked ``ARTIFACT``) do not travel as
paths: they are published to MLflow by content hash and fetched, checked, into this home's cache
by the run that reads them (``refinery.core.artifacts``).

Which stored value a downstream asset reads, and the log line and input metadata say which:
1. the value its upstream wrote in the same run, when the upstream ran in it;
2. else the value of the run named by the run tag ``refinery/pin/<asset>`` (a pin);
3. else the latest value (what the upstream's last materialization wrote).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import PrivateAttr

from assets.resources import HomeResource, home_of
from refinery.core import schema
from refinery.core.artifacts import (
    ArtifactError,
    ArtifactStore,
    Published,
    artifact_paths,
    with_paths,
)
from refinery.core.records import RecordError, from_record, to_record
from refinery.core.stores import check_stores, make_engine, prepare_mlflow

PIN_TAG = "refinery/pin/"


class HandoffIOManager(dg.ConfigurableIOManager):
    """``database_url`` / ``tracking_uri`` empty: the home's (REFINERY_DATABASE_URL, else the
    embedded Postgres; REFINERY_MLFLOW_TRACKING_URI, else the local store)."""

    home: HomeResource | None = None
    database_url: str = ""
    tracking_uri: str = ""

    _engine: sa.Engine | None = PrivateAttr(default=None)
    _artifacts: ArtifactStore | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        settings = home_of(self.home).settings
        check_stores(settings)  # a configured store that is down fails the run here, by name
        self._engine = make_engine(self.database_url or None, settings=settings, create_schema=True)
        uri = self.tracking_uri or prepare_mlflow(settings)
        self._artifacts = ArtifactStore(
            self._engine,
            uri,
            settings.home / "cache" / "artifacts",
            # A tracking server keeps artifacts in its own store; a local one, under the home.
            artifact_root=None
            if uri.startswith(("http://", "https://"))
            else settings.mlflow_artifacts_dir,
        )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @property
    def _store(self) -> tuple[sa.Engine, ArtifactStore]:
        if self._engine is None or self._artifacts is None:
            raise RuntimeError("HandoffIOManager used outside of a Dagster execution")
        return self._engine, self._artifacts

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None and not _optional(context.dagster_type.typing_type):
            return  # an asset that hands nothing on (its data lives in Postgres)
        if obj is not None and (not dataclasses.is_dataclass(obj) or isinstance(obj, type)):
            raise TypeError(
                f"{context.asset_key.to_user_string()} must return a dataclass instance to hand "
                f"on, got {type(obj).__name__}"
            )
        engine, store = self._store
        name = context.asset_key.to_user_string()
        published = {}
        for key, path in artifact_paths(obj).items():
            try:
                published[key] = store.publish(Path(path)).to_dict()
            except ArtifactError as err:
                raise dg.Failure(description=f"{name}.{key}: {err}") from err
        if published:
            context.log.info(f"published {', '.join(sorted(published))} to MLflow")
        table = schema.handoffs
        row = {
            "asset": name,
            "run_id": context.run_id,
            "type": type(obj).__qualname__,
            "value": json.dumps(to_record(obj), sort_keys=True),
            "artifacts": published,
        }
        # One transaction per row, keyed by asset and run: two runs writing one asset at once
        # each write their own row; a retried step replaces its own (and becomes the latest).
        with engine.begin() as conn:
            conn.execute(
                table.delete().where(table.c.asset == name, table.c.run_id == context.run_id)
            )
            conn.execute(table.insert().values(**row))
        context.add_output_metadata(
            {"handoff": f"handoffs: {name} / {context.run_id}", "artifacts": len(published)}
        )

    def load_input(self, context: dg.InputContext) -> Any:
        engine, store = self._store
        name = context.asset_key.to_user_string()
        step = context.step_context
        pinned = step.run_tags.get(PIN_TAG + name)
        table = schema.handoffs
        query = table.select().where(table.c.asset == name)
        with engine.connect() as conn:
            stored = conn.execute(query.where(table.c.run_id == step.run_id)).mappings().first()
            how = "this run"
            if stored is None and pinned:
                how = f"pinned by tag {PIN_TAG}{name}"
                stored = conn.execute(query.where(table.c.run_id == pinned)).mappings().first()
                if stored is None:
                    raise dg.Failure(
                        description=f"{name} has no stored output of run {pinned} (pinned by "
                        f"the run tag {PIN_TAG}{name})",
                        allow_retries=False,
                    )
            elif stored is None:
                how = "its latest materialization"
                stored = conn.execute(
                    query.order_by(table.c.seq.desc()).limit(1)
                ).mappings().first()  # fmt: skip
        if stored is None:
            raise dg.Failure(
                description=f"{name} has never been materialized: materialize it first",
                allow_retries=False,
            )
        cls = context.dagster_type.typing_type
        try:
            value = from_record(cls, json.loads(stored["value"]))  # type: ignore[arg-type]
        except RecordError as err:
            raise dg.Failure(
                description=f"the stored output of {name} does not fit {cls.__name__} "
                f"({err}): materialize {name} again",
                allow_retries=False,
            ) from err
        local = {}
        for key, entry in (stored["artifacts"] or {}).items():
            try:
                local[key] = str(store.fetch(Published(**entry)))
            except ArtifactError as err:
                raise dg.Failure(description=f"{name}.{key}: {err}") from err
        value = with_paths(value, local)
        context.log.debug(f"{name}: the output of run {stored['run_id']} ({how})")
        context.add_input_metadata({"from_run": stored["run_id"], "chosen_by": how})
        return value


def _optional(tp: Any) -> bool:
    """``X | None``: an asset that may hand on nothing (a skipped optional step)."""
    import types
    import typing

    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)
