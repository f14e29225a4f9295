"""Hand-offs between assets: frozen dataclasses stored as JSON by the I/O manager, read back
typed, from the same run, a pinned run or the latest; and the rule that assets stay thin."""

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from assets.handoff import PIN_TAG, HandoffIOManager
from assets.resources import HomeResource
from refinery.core.records import RecordError, from_record, to_record
from refinery.core.settings import REPO_ROOT


@dataclass(frozen=True)
class Inner:
    name: str
    score: float


@dataclass(frozen=True)
class Outer:
    path: str
    steps: int
    tags: tuple[str, ...]
    metrics: dict[str, float]
    inner: Inner
    maybe: Inner | None = None


def test_records_round_trip_and_refuse_what_does_not_fit():
    value = Outer("/m", 3, ("a", "b"), {"loss": 0.5}, Inner("x", 1))
    data = json.loads(json.dumps(to_record(value)))
    assert from_record(Outer, data) == value  # tuples and nested classes come back as such
    assert from_record(Outer, {**data, "steps": 3, "metrics": {"loss": 1}}).metrics == {"loss": 1.0}
    with pytest.raises(RecordError, match=r"Outer.steps: expected int"):
        from_record(Outer, {**data, "steps": "3"})
    with pytest.raises(RecordError, match=r"unknown fields \['renamed'\]"):
        from_record(Outer, {**data, "renamed": 1})
    with pytest.raises(TypeError):  # a missing field
        from_record(Outer, {k: v for k, v in data.items() if k != "path"})
    with pytest.raises(RecordError, match="cannot store"):
        to_record(Outer("/m", 1, (), {}, Inner("x", 1), maybe=object()))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Made:
    value: int
    by_run: str


class UpstreamConfig(dg.Config):
    value: int = 0


def _assets(seen: list[tuple[int, str]]):
    @dg.asset
    def upstream(
        context: dg.AssetExecutionContext, config: UpstreamConfig
    ) -> dg.MaterializeResult[Made]:
        return dg.MaterializeResult(value=Made(config.value, context.run_id))

    @dg.asset
    def downstream(upstream: Made) -> None:
        seen.append((upstream.value, upstream.by_run))

    return upstream, downstream


def _run(assets, home: Path, selection, value: int = 0, tags=None):
    return dg.materialize(
        assets,
        selection=selection,
        resources={"io_manager": HandoffIOManager(home=HomeResource(path=str(home)))},
        run_config={"ops": {"upstream": {"config": {"value": value}}}}
        if "upstream" in selection
        else None,
        tags=tags,
        instance=dg.DagsterInstance.ephemeral(),
    )


def test_downstream_reads_same_run_then_pinned_then_latest(tmp_path: Path):
    seen: list[tuple[int, str]] = []
    assets = _assets(seen)
    first = _run(assets, tmp_path, ["upstream", "downstream"], value=1)
    assert seen[-1] == (1, first.run_id)  # the value of its own run
    second = _run(assets, tmp_path, ["upstream"], value=2)
    alone = _run(assets, tmp_path, ["downstream"])
    assert seen[-1] == (2, second.run_id)  # the latest, and the log says so
    loaded = [e for e in alone.all_events if e.event_type_value == "LOADED_INPUT"]
    assert loaded and "latest" in str(loaded[0].event_specific_data.metadata["chosen_by"].value)
    _run(assets, tmp_path, ["downstream"], tags={PIN_TAG + "upstream": first.run_id})
    assert seen[-1] == (1, first.run_id)  # pinned to the first run
    stored = tmp_path / "handoffs" / "upstream" / f"{first.run_id}.json"
    assert json.loads(stored.read_text())["value"] == {"value": 1, "by_run": first.run_id}


def test_missing_or_mismatched_handoffs_fail_with_what_to_do(tmp_path: Path):
    seen: list[tuple[int, str]] = []
    assets = _assets(seen)
    with pytest.raises(dg.Failure, match="has never been materialized"):
        _run(assets, tmp_path, ["downstream"])
    with pytest.raises(dg.Failure, match="no stored output of run nope"):
        _run(assets, tmp_path, ["downstream"], tags={PIN_TAG + "upstream": "nope"})
    _run(assets, tmp_path, ["upstream"], value=5)
    latest = tmp_path / "handoffs" / "upstream" / "latest.json"
    record = json.loads(latest.read_text())
    record["value"]["value"] = "five"  # e.g. written by an older version of the code
    latest.write_text(json.dumps(record))
    with pytest.raises(dg.Failure, match="does not fit Made"):
        _run(assets, tmp_path, ["downstream"])


def _asset_bodies() -> list[tuple[str, int, str]]:
    """(module:function, body lines, source) of every asset and asset check in assets/."""
    out = []
    for path in sorted((REPO_ROOT / "assets").glob("*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            if not any("asset" in ast.unparse(d) for d in node.decorator_list):
                continue
            body = node.body[1:] if ast.get_docstring(node) else node.body
            lines = (node.end_lineno or 0) - body[0].lineno + 1
            out.append(
                (f"{path.stem}:{node.name}", lines, ast.get_source_segment(source, node) or "")
            )
    return out


def test_assets_are_thin_and_read_values_not_metadata():
    bodies = _asset_bodies()
    assert len(bodies) >= 18
    too_long = [(name, n) for name, n, _ in bodies if n > 35]
    assert not too_long, f"asset bodies over 35 lines (move the logic to a library): {too_long}"
    for name, _, source in bodies:
        assert "get_latest_materialization_event" not in source, name
        assert "Settings.from_env" not in source, f"{name}: settings come through resources"


def test_an_optional_step_that_hands_on_nothing_gives_none(tmp_path: Path):
    seen: list[object] = []

    @dg.asset
    def maybe() -> dg.MaterializeResult[Made | None]:
        return dg.MaterializeResult(value=None)

    @dg.asset
    def after(maybe: Made | None) -> None:
        seen.append(maybe)

    dg.materialize(
        [maybe, after],
        resources={"io_manager": HandoffIOManager(home=HomeResource(path=str(tmp_path)))},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert seen == [None]
    stored = json.loads((tmp_path / "handoffs" / "maybe" / "latest.json").read_text())
    assert stored["value"] is None
