"""Hand-off records: frozen dataclasses to JSON and back, typed; and the rule that assets stay
thin. The I/O manager itself (Postgres, MLflow) is tested in tests/integration/test_handoff.py."""

import ast
import json
from dataclasses import dataclass

import pytest

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
