"""Large artifacts (model folders, dataset files) that one run hands to another, on any machine.

A run that makes one publishes it: its content hash (``tree_sha256``) is looked up in the
``shared_artifacts`` table, and only a hash not seen before is uploaded, as an artifact of an
MLflow run in the ``refinery-artifacts`` experiment (the tracking server's artifact store, or the
local store under the home). What travels between runs is then (hash, artifact URI), never a
local path.

A run that needs one fetches it into a local cache keyed by that hash
(``<home>/cache/artifacts/<sha256>/<name>``). The download goes to a temporary folder, is
checked against the hash and renamed into place: an interrupted download never leaves a half
model that is used. A cache entry is checked by its hash before use (once per process while its
files keep their sizes and times), and one that does not match is downloaded again.

The producer's own files are hard-linked into the cache when the file system allows, so the
run that made an artifact (or a later one on the same disk) does not download it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlalchemy as sa

log = logging.getLogger(__name__)

EXPERIMENT = "refinery-artifacts"
# Field metadata of a handoff dataclass field that holds a local path (or a dict of them) to an
# artifact that must travel: ``path: str = field(metadata=ARTIFACT)``.
ARTIFACT = {"refinery.artifact": True}


class ArtifactError(RuntimeError):
    """An artifact could not be published or fetched (says which, and why)."""


def _files(path: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix name, file) under ``path``, in name order; a file is itself ("")."""
    if path.is_file():
        yield "", path
        return
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        yield f.relative_to(path).as_posix(), f


def tree_sha256(path: Path) -> str:
    """sha256 over every file's relative name and bytes: equal content hashes equal wherever
    it lies, and the top folder's own name does not count."""
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    h = hashlib.sha256()
    for name, f in _files(path):
        with f.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((n, f.stat().st_size, f.stat().st_mtime_ns) for n, f in _files(path))


@dataclass(frozen=True)
class Published:
    sha256: str
    uri: str  # runs:/<run id>/<name>, resolved by the tracking server
    name: str  # the file or folder name it was published under

    def to_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256, "uri": self.uri, "name": self.name}


class ArtifactStore:
    """Publish and fetch artifacts through one Postgres database and one MLflow tracking URI.

    ``artifact_root``: where a newly created experiment keeps its artifacts (the local store
    under the home), None for a tracking server (its own artifact store)."""

    def __init__(
        self,
        engine: sa.Engine,
        tracking_uri: str,
        cache_dir: Path,
        artifact_root: Path | None = None,
        download: Callable[[str, str, Path], Path] | None = None,
    ) -> None:
        self.engine = engine
        self.tracking_uri = tracking_uri
        self.cache_dir = cache_dir
        self.artifact_root = artifact_root
        self._download = download or _mlflow_download
        self._checked: dict[Path, tuple[tuple[str, int, int], ...]] = {}

    # -- publish ---------------------------------------------------------------------------
    def publish(self, path: Path) -> Published:
        """The artifact's hash and URI: uploaded once per content, whoever asks."""
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        from refinery.core import schema

        path = Path(path)
        sha = tree_sha256(path)
        table = schema.shared_artifacts
        with self.engine.connect() as conn:
            row = conn.execute(
                table.select().where(table.c.sha256 == sha)
            ).mappings().first()  # fmt: skip
        if row is None:
            uri = self._upload(path, sha)
            with self.engine.begin() as conn:
                conn.execute(
                    pg_insert(table)
                    .values(sha256=sha, uri=uri, name=path.name, size_bytes=_size(path))
                    .on_conflict_do_nothing(index_elements=["sha256"])
                )
                row = conn.execute(table.select().where(table.c.sha256 == sha)).mappings().one()
        self._link_into_cache(path, sha)
        return Published(sha, str(row["uri"]), str(row["name"]))

    def _upload(self, path: Path, sha: str) -> str:
        from refinery.core.tracking import client_for, ensure_experiment

        client = client_for(self.tracking_uri)
        try:
            experiment = ensure_experiment(client, EXPERIMENT, self.artifact_root)
            run = client.create_run(experiment, run_name=sha[:16], tags={"refinery.sha256": sha})
            run_id = run.info.run_id
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            else:
                client.log_artifact(run_id, str(path), artifact_path="file")
            client.set_terminated(run_id)
        except Exception as err:
            raise ArtifactError(
                f"could not upload {path} to MLflow at {self.tracking_uri}: {err}"
            ) from err
        log.info("published %s as %s (%s)", path, sha[:12], run_id)
        return f"runs:/{run_id}/{path.name if path.is_dir() else 'file/' + path.name}"

    def _link_into_cache(self, path: Path, sha: str) -> None:
        """Hard links of the producer's files in the cache (no copy, no download later);
        nothing where the file system refuses (the cache then fills on first fetch)."""
        entry = self.cache_dir / sha
        if entry.exists():
            return
        partial = self.cache_dir / f".{sha}.{uuid.uuid4().hex}.partial"
        target = partial / path.name
        try:
            for name, f in _files(path):
                dst = target / name if name else target
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, dst)
            os.rename(partial, entry)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            return
        # Hashed just now: a fetch in this process need not hash the same bytes again.
        linked = entry / path.name
        self._checked[linked] = _signature(linked)

    # -- fetch -----------------------------------------------------------------------------
    def fetch(self, published: Published) -> Path:
        """A local copy of the artifact, checked against its hash (downloaded when the cache
        has none, or one that does not match)."""
        entry = self.cache_dir / published.sha256
        local = entry / published.name
        if local.exists():
            if self._verified(local, published.sha256):
                return local
            log.warning("cache entry %s does not match its hash: downloading again", entry)
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir / f".{published.sha256}.{uuid.uuid4().hex}.partial"
        try:
            partial.mkdir()
            got = self._download(self.tracking_uri, published.uri, partial)
            if got.name != published.name:
                got = got.rename(partial / published.name)
            sha = tree_sha256(got)
            if sha != published.sha256:
                raise ArtifactError(
                    f"{published.uri} downloaded with sha256 {sha[:12]}, not the published "
                    f"{published.sha256[:12]}: the stored artifact was changed or damaged"
                )
            try:
                os.rename(partial, entry)
            except OSError:  # another process put it in place first: use theirs
                if not (entry / published.name).exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self._checked[local] = _signature(local)
        return local

    def _verified(self, local: Path, sha: str) -> bool:
        signature = _signature(local)
        if self._checked.get(local) == signature:
            return True
        if tree_sha256(local) != sha:
            return False
        self._checked[local] = signature
        return True


def _size(path: Path) -> int:
    return sum(f.stat().st_size for _, f in _files(path))


def _mlflow_download(tracking_uri: str, uri: str, dst: Path) -> Path:
    import mlflow.artifacts

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, tracking_uri=tracking_uri, dst_path=str(dst)
            )
        )
    except Exception as err:
        raise ArtifactError(
            f"could not download {uri} from MLflow at {tracking_uri}: {err}"
        ) from err


def artifact_paths(obj: object) -> dict[str, str]:
    """The local paths in a handoff dataclass's ``ARTIFACT`` fields: ``field`` for a path,
    ``field.key`` for each path of a dict; empty ones (an optional artifact) left out."""
    import dataclasses

    out: dict[str, str] = {}
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return out
    for f in dataclasses.fields(obj):
        if not f.metadata.get("refinery.artifact"):
            continue
        value = getattr(obj, f.name)
        if isinstance(value, dict):
            out.update({f"{f.name}.{k}": str(v) for k, v in value.items() if v})
        elif value:
            out[f.name] = str(value)
    return out


def with_paths(obj: object, paths: dict[str, str]) -> object:
    """``obj`` with the artifact fields named as in ``artifact_paths`` set to ``paths``."""
    import dataclasses

    changes: dict[str, object] = {}
    for key, path in paths.items():
        name, _, item = key.partition(".")
        if item:
            current = changes.get(name, getattr(obj, name))
            changes[name] = {**current, item: path}  # type: ignore[dict-item]
        else:
            changes[name] = path
    return dataclasses.replace(obj, **changes) if changes else obj  # type: ignore[type-var]
