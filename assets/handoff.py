"""The I/O manager that carries assets' values (small frozen dataclasses) from one asset to the
next, as JSON files under ``<home>/handoffs/<asset>/<run id>.json`` (nothing is pickled).

Which stored value a downstream asset reads, and the log line and input metadata say which:
1. the value its upstream wrote in the same run, when the upstream ran in it;
2. else the value of the run named by the run tag ``refinery/pin/<asset>`` (a pin);
3. else the latest value (what the upstream's last materialization wrote).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from assets.resources import HomeResource, home_of
from refinery.core.records import RecordError, from_record, to_record

PIN_TAG = "refinery/pin/"
LATEST = "latest.json"


class HandoffIOManager(dg.ConfigurableIOManager):
    home: HomeResource | None = None

    def _folder(self, key: dg.AssetKey) -> Path:
        return home_of(self.home).settings.home / "handoffs" / "__".join(key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None and not _optional(context.dagster_type.typing_type):
            return  # an asset that hands nothing on (its data lives in Postgres)
        if obj is not None and (not dataclasses.is_dataclass(obj) or isinstance(obj, type)):
            raise TypeError(
                f"{context.asset_key.to_user_string()} must return a dataclass instance to hand "
                f"on, got {type(obj).__name__}"
            )
        folder = self._folder(context.asset_key)
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {"run_id": context.run_id, "type": type(obj).__qualname__, "value": to_record(obj)},
            indent=2,
            sort_keys=True,
        )
        path = folder / f"{context.run_id}.json"
        for target in (path, folder / LATEST):  # written whole, then renamed: never half a file
            # Named by run: two runs handing on one asset at once never share a temporary file.
            tmp = target.with_name(f"{target.name}.{context.run_id}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        context.add_output_metadata({"handoff": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.asset_key
        name = key.to_user_string()
        folder = self._folder(key)
        step = context.step_context
        pinned = step.run_tags.get(PIN_TAG + name)
        own = folder / f"{step.run_id}.json"
        if own.exists():
            path, how = own, "this run"
        elif pinned:
            path, how = folder / f"{pinned}.json", f"pinned by tag {PIN_TAG}{name}"
            if not path.exists():
                raise dg.Failure(
                    description=f"{name} has no stored output of run {pinned} (pinned by the "
                    f"run tag {PIN_TAG}{name})",
                    allow_retries=False,
                )
        elif (folder / LATEST).exists():
            path, how = folder / LATEST, "its latest materialization"
        else:
            raise dg.Failure(
                description=f"{name} has never been materialized: materialize it first",
                allow_retries=False,
            )
        stored = json.loads(path.read_text())
        cls = context.dagster_type.typing_type
        try:
            value = from_record(cls, stored["value"])  # type: ignore[arg-type]
        except RecordError as err:
            raise dg.Failure(
                description=f"the stored output of {name} does not fit {cls.__name__} "
                f"({err}): materialize {name} again",
                allow_retries=False,
            ) from err
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
