"""The hand-off I/O manager on real stores: values in Postgres, read from the same run, a pinned
run or the latest; artifacts (local folders in a value) published to a real MLflow tracking
server and fetched, checked by hash, into another home's cache; two runs at once."""

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from assets.handoff import PIN_TAG, HandoffIOManager
from assets.resources import HomeResource
from refinery.core import schema
from refinery.core.artifacts import (
    ARTIFACT,
    ArtifactError,
    ArtifactStore,
    artifact_paths,
    tree_sha256,
    with_paths,
)
from tests.support import mlflow_server


@dataclass(frozen=True)
class Made:
    value: int
    by_run: str


@dataclass(frozen=True)
class Model:
    path: str = field(metadata=ARTIFACT)
    variants: dict[str, str] = field(metadata=ARTIFACT)
    optional: str = field(default="", metadata=ARTIFACT)
    note: str = ""


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


def _io(home: Path, db_url: str, mlflow_uri: str) -> HandoffIOManager:
    return HandoffIOManager(
        home=HomeResource(path=str(home)), database_url=db_url, tracking_uri=mlflow_uri
    )


def _run(assets, io: HandoffIOManager, selection, value: int = 0, tags=None):
    return dg.materialize(
        assets,
        selection=selection,
        resources={"io_manager": io},
        run_config={"ops": {"upstream": {"config": {"value": value}}}}
        if "upstream" in selection
        else None,
        tags=tags,
        instance=dg.DagsterInstance.ephemeral(),
    )


def test_downstream_reads_same_run_then_pinned_then_latest(
    tmp_path: Path, db_url: str, mlflow_uri: str
):
    seen: list[tuple[int, str]] = []
    assets = _assets(seen)
    io = _io(tmp_path, db_url, mlflow_uri)
    first = _run(assets, io, ["upstream", "downstream"], value=1)
    assert seen[-1] == (1, first.run_id)  # the value of its own run
    second = _run(assets, io, ["upstream"], value=2)
    alone = _run(assets, io, ["downstream"])
    assert seen[-1] == (2, second.run_id)  # the latest, and the log says so
    loaded = [e for e in alone.all_events if e.event_type_value == "LOADED_INPUT"]
    assert loaded and "latest" in str(loaded[0].event_specific_data.metadata["chosen_by"].value)
    _run(assets, io, ["downstream"], tags={PIN_TAG + "upstream": first.run_id})
    assert seen[-1] == (1, first.run_id)  # pinned to the first run
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.handoffs.c.run_id, schema.handoffs.c.value)).all()
    engine.dispose()
    values = {r.run_id: json.loads(r.value)["value"] for r in rows}
    assert values == {first.run_id: 1, second.run_id: 2}


def test_missing_or_mismatched_handoffs_fail_with_what_to_do(
    tmp_path: Path, db_url: str, mlflow_uri: str
):
    seen: list[tuple[int, str]] = []
    assets = _assets(seen)
    io = _io(tmp_path, db_url, mlflow_uri)
    with pytest.raises(dg.Failure, match="has never been materialized"):
        _run(assets, io, ["downstream"])
    with pytest.raises(dg.Failure, match="no stored output of run nope"):
        _run(assets, io, ["downstream"], tags={PIN_TAG + "upstream": "nope"})
    _run(assets, io, ["upstream"], value=5)
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:  # e.g. written by an older version of the code
        wrong = json.dumps({"value": "five", "by_run": "r"})
        conn.execute(sa.update(schema.handoffs).values(value=wrong))
    engine.dispose()
    with pytest.raises(dg.Failure, match="does not fit Made"):
        _run(assets, io, ["downstream"])


def test_an_optional_step_that_hands_on_nothing_gives_none(
    tmp_path: Path, db_url: str, mlflow_uri: str
):
    seen: list[object] = []

    @dg.asset
    def maybe() -> dg.MaterializeResult[Made | None]:
        return dg.MaterializeResult(value=None)

    @dg.asset
    def after(maybe: Made | None) -> None:
        seen.append(maybe)

    dg.materialize(
        [maybe, after],
        resources={"io_manager": _io(tmp_path, db_url, mlflow_uri)},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert seen == [None]


def test_two_runs_writing_one_asset_at_once_keep_their_own_values(
    tmp_path: Path, db_url: str, mlflow_uri: str
):
    seen: list[tuple[int, str]] = []
    assets = _assets(seen)
    io = _io(tmp_path, db_url, mlflow_uri)
    results: dict[int, str] = {}

    def materialize(value: int) -> None:
        results[value] = _run(assets, io, ["upstream"], value=value).run_id

    threads = [threading.Thread(target=materialize, args=(v,)) for v in (10, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for value, run_id in results.items():
        _run(assets, io, ["downstream"], tags={PIN_TAG + "upstream": run_id})
        assert seen[-1] == (value, run_id)


def _model_folder(root: Path, name: str, payload: bytes) -> Path:
    folder = root / name
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "sub" / "config.json").write_text('{"layers": 2}')
    return folder


def test_artifact_fields_are_found_and_replaced():
    value = Model("/a/m", {"int8": "/a/q", "none": ""}, note="x")
    assert artifact_paths(value) == {"path": "/a/m", "variants.int8": "/a/q"}
    moved = with_paths(value, {"path": "/b/m", "variants.int8": "/b/q"})
    assert moved == Model("/b/m", {"int8": "/b/q", "none": ""}, note="x")


def test_tree_hash_is_content_not_place(tmp_path: Path):
    a = _model_folder(tmp_path / "a", "m", b"weights")
    b = _model_folder(tmp_path / "b", "other-name", b"weights")
    assert tree_sha256(a) == tree_sha256(b)
    (b / "sub" / "config.json").write_text('{"layers": 3}')
    assert tree_sha256(a) != tree_sha256(b)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def test_artifacts_travel_through_the_tracking_server_to_an_empty_home(
    tmp_path: Path, db_url: str, server: str
):
    """Home A makes a model folder and a file; home B (its own empty disk, the same Postgres
    and MLflow server) reads them after A's folders are gone: fetched into B's cache, checked,
    re-downloaded when damaged; a second publish of the same bytes uploads nothing."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    made = _model_folder(home_a / "work", "merged", b"\x00weights" * 1000)
    variant = home_a / "work" / "int8.onnx"
    variant.write_bytes(b"onnx bytes")
    want = {"merged": tree_sha256(made), "variant": tree_sha256(variant)}
    got: list[Model] = []

    @dg.asset
    def model() -> dg.MaterializeResult[Model]:
        return dg.MaterializeResult(value=Model(str(made), {"int8": str(variant)}))

    @dg.asset
    def user(model: Model) -> None:
        got.append(model)

    io_a = _io(home_a, db_url, server)
    dg.materialize([model], resources={"io_manager": io_a}, instance=dg.DagsterInstance.ephemeral())
    import shutil

    shutil.rmtree(home_a)  # nothing of A's disk is left for B
    io_b = _io(home_b, db_url, server)
    dg.materialize(
        [model, user], selection=["user"], resources={"io_manager": io_b},
        instance=dg.DagsterInstance.ephemeral(),
    )  # fmt: skip
    local = Path(got[-1].path)
    assert local.is_relative_to(home_b / "cache" / "artifacts")
    assert tree_sha256(local) == want["merged"]
    assert Path(got[-1].variants["int8"]).read_bytes() == b"onnx bytes"
    assert tree_sha256(Path(got[-1].variants["int8"])) == want["variant"]

    # A damaged cache entry is noticed by its hash and downloaded again.
    (local / "model.safetensors").write_bytes(b"bit rot")
    dg.materialize(
        [model, user], selection=["user"], resources={"io_manager": io_b},
        instance=dg.DagsterInstance.ephemeral(),
    )  # fmt: skip
    assert tree_sha256(Path(got[-1].path)) == want["merged"]

    # Published once per content: the same bytes elsewhere reuse the stored URI.
    engine = sa.create_engine(db_url)
    store = ArtifactStore(engine, server, tmp_path / "c" / "cache")
    again = _model_folder(tmp_path / "c", "copy", b"\x00weights" * 1000)
    with engine.connect() as conn:
        before = conn.execute(
            sa.select(sa.func.count()).select_from(schema.shared_artifacts)
        ).scalar()
    published = store.publish(again)
    with engine.connect() as conn:
        after = conn.execute(
            sa.select(sa.func.count()).select_from(schema.shared_artifacts)
        ).scalar()
    assert (before, published.sha256) == (after, want["merged"])
    engine.dispose()


def test_an_interrupted_download_leaves_nothing_that_is_used(
    tmp_path: Path, db_url: str, mlflow_uri: str
):
    from refinery.core.stores import make_engine

    engine = make_engine(db_url, create_schema=True)
    source = _model_folder(tmp_path / "src", "m", b"payload")
    published = ArtifactStore(engine, mlflow_uri, tmp_path / "a-cache", tmp_path / "arts").publish(
        source
    )

    def broken(tracking: str, uri: str, dst: Path) -> Path:
        (dst / "m").mkdir()
        (dst / "m" / "model.safetensors").write_bytes(b"pay")  # half a file, then the fault
        raise ArtifactError("connection reset")

    cache = tmp_path / "b-cache"
    with pytest.raises(ArtifactError, match="connection reset"):
        ArtifactStore(engine, mlflow_uri, cache, download=broken).fetch(published)
    assert not (cache / published.sha256).exists()
    assert not list(cache.glob(".*partial"))

    def corrupting(tracking: str, uri: str, dst: Path) -> Path:
        (dst / "m").mkdir()
        (dst / "m" / "model.safetensors").write_bytes(b"wrong")
        return dst / "m"

    with pytest.raises(ArtifactError, match="changed or damaged"):
        ArtifactStore(engine, mlflow_uri, cache, download=corrupting).fetch(published)
    assert not (cache / published.sha256).exists()
    fetched = ArtifactStore(engine, mlflow_uri, cache).fetch(published)
    assert tree_sha256(fetched) == published.sha256
    engine.dispose()


def test_values_that_json_cannot_spell_strictly_come_back(
    tmp_path: Path, db_url: str, mlflow_uri: str
):
    """A mean of no ratings is NaN: stored and read back as such (JSONB would refuse it)."""
    seen: list[float] = []

    @dataclass(frozen=True)
    class Mean:
        value: float

    @dg.asset
    def mean() -> dg.MaterializeResult[Mean]:
        return dg.MaterializeResult(value=Mean(float("nan")))

    @dg.asset
    def reader(mean: Mean) -> None:
        seen.append(mean.value)

    io = _io(tmp_path, db_url, mlflow_uri)
    dg.materialize(
        [mean, reader], resources={"io_manager": io}, instance=dg.DagsterInstance.ephemeral()
    )
    assert len(seen) == 1 and seen[0] != seen[0]  # NaN
