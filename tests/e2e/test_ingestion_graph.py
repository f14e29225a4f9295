"""The ingestion slice of the graph through Dagster, into a fresh home, then queried."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import sqlalchemy as sa

from refinery.core import schema
from refinery.core.settings import Settings
from refinery.core.stores import database_url
from refinery.core.tracking import client_for
from refinery.corpus.chunking import ChunkingConfig
from refinery.corpus.documents import RejectReason
from refinery.ingestion.sync import sync_embeddings
from refinery.retrieval.embedding import Embedder
from refinery.retrieval.search import Retriever
from refinery.retrieval.vectorstore import VectorStore
from tests.conftest import SAMPLE_CORPUS
from tests.support import REFINERY, kill_embedded_postgres

pytestmark = pytest.mark.e2e

INGESTION = ["source_documents", "document_chunks", "chunk_embeddings"]


def run_ingest(corpus: Path, **config) -> dg.ExecuteInProcessResult:
    from orchestration.definitions import defs

    ops = {"source_documents": {"config": {"corpus_dir": str(corpus)}}}
    if config:
        ops["chunk_embeddings"] = {"config": config}
    return defs.resolve_job_def("ingest").execute_in_process(
        run_config={"ops": ops}, instance=dg.DagsterInstance.get(), raise_on_error=False
    )


def materializations(result) -> dict[str, dict]:
    return {
        e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }


def checks(result) -> dict[str, tuple[bool, str]]:
    return {
        e.check_name: (e.passed, e.severity.value) for e in result.get_asset_check_evaluations()
    }


def store_for_home() -> VectorStore:
    return VectorStore(sa.create_engine(database_url(Settings.from_env())))


def test_sample_corpus_through_dagster_with_mlflow_lineage(fresh_home):
    result = run_ingest(SAMPLE_CORPUS)
    assert result.success
    meta = materializations(result)
    assert set(meta) == set(INGESTION)
    assert all(v for v, _ in checks(result).values())
    assert meta["source_documents"]["documents"].value == 34
    assert (
        meta["chunk_embeddings"]["embedded_now"].value
        == meta["chunk_embeddings"]["chunks"].value
        > 100
    )

    # Every materialization links to its MLflow run, and every run links back to Dagster.
    client = client_for(Settings.from_env().mlflow_tracking_uri)
    corpus_hash = meta["source_documents"]["corpus_hash"].value
    for asset, m in meta.items():
        run = client.get_run(m["mlflow_run_id"].value)
        assert m["mlflow_run"].value.endswith(f"/runs/{run.info.run_id}")
        assert run.data.tags["dagster.run_id"] == result.run_id
        assert run.data.tags["dagster.asset_key"] == asset
        assert run.data.tags["dagster.run_url"].endswith(f"/runs/{result.run_id}")
        assert run.data.tags["refinery.corpus_hash"] == corpus_hash
        assert run.data.tags["refinery.code_version"]
        assert run.info.status == "FINISHED"
    embed_run = client.get_run(meta["chunk_embeddings"]["mlflow_run_id"].value)
    assert embed_run.data.params["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert embed_run.data.metrics["chunks_per_second"] > 0
    chunk_run = client.get_run(meta["document_chunks"]["mlflow_run_id"].value)
    defaults = ChunkingConfig()  # the tuned defaults (benchmarks/results/retrieval_tuning.md)
    assert chunk_run.data.params["max_tokens"] == str(defaults.max_tokens)
    assert chunk_run.data.params["overlap_tokens"] == str(defaults.overlap_tokens)
    assert chunk_run.data.params["contextual"] == "True"

    hits = Retriever(store_for_home(), Embedder()).search(
        "What is the threshold of mites per 100 bees?", k=3
    )
    assert hits[0].source == "varroa-mite-monitoring-and-treatment.md"

    # A second run with nothing changed embeds nothing and keeps the data version.
    again = run_ingest(SAMPLE_CORPUS)
    meta2 = materializations(again)
    assert again.success
    assert meta2["source_documents"]["unchanged"].value == 34
    assert meta2["document_chunks"]["documents_rechunked"].value == 0
    assert meta2["chunk_embeddings"]["embedded_now"].value == 0
    assert meta2["source_documents"]["corpus_hash"].value == corpus_hash


def test_salted_corpus_finishes_with_every_bad_file_in_the_ledger(fresh_home, small_corpus):
    bad = {
        "empty.md": (b"", RejectReason.EMPTY),
        "binary.txt": (bytes(range(256)) * 64, RejectReason.BINARY),
        "nul.txt": (b"Bees make honey.\x00More text.", RejectReason.NUL_BYTES),
        "latin1.txt": ("Crème brûlée honey".encode("latin-1"), RejectReason.INVALID_UTF8),
        "truncated.pdf": (
            (SAMPLE_CORPUS / "pollination-services.pdf").read_bytes()[:2000],
            RejectReason.CORRUPT_PDF,
        ),
    }
    for name, (content, _) in bad.items():
        (small_corpus / name).write_bytes(content)
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(SAMPLE_CORPUS / "pollination-services.pdf"))
    writer.encrypt(user_password="secret", algorithm="AES-256")
    writer.write(small_corpus / "encrypted.pdf")
    with open(small_corpus / "huge.txt", "wb") as fh:
        fh.write(b"x")
        fh.truncate(100 * 1024 * 1024)
    (small_corpus / "loop.md").symlink_to(small_corpus / "loop.md")
    (small_corpus / "private.md").write_text("# Private")
    (small_corpus / "private.md").chmod(0)
    expected = {name: reason for name, (_, reason) in bad.items()} | {
        "encrypted.pdf": RejectReason.ENCRYPTED_PDF,
        "huge.txt": RejectReason.TOO_LARGE,
        "loop.md": RejectReason.SYMLINK_LOOP,
        "private.md": RejectReason.UNREADABLE,
    }
    try:
        result = run_ingest(small_corpus)
    finally:
        (small_corpus / "private.md").chmod(0o644)
    assert result.success
    meta = materializations(result)
    assert meta["source_documents"]["documents"].value == 6  # every good document
    assert meta["source_documents"]["rejected"].value == len(expected)
    ledger = {r["path"]: r for r in store_for_home().rejections()}
    assert {k: RejectReason(v["reason"]) for k, v in ledger.items()} == expected
    assert all(r["detail"] for r in ledger.values())
    assert checks(result)["no_rejected_files"] == (False, "WARN")  # warns, does not block
    assert checks(result)["every_chunk_embedded"] == (True, "ERROR")

    # Fixed files (re-encoded; permission given back above) leave the ledger for the index.
    (small_corpus / "latin1.txt").write_text("Crème brûlée honey, now in UTF-8.")
    result = run_ingest(small_corpus)
    still_bad = {r["path"] for r in store_for_home().rejections()}
    assert still_bad == set(expected) - {"latin1.txt", "private.md"}
    assert materializations(result)["source_documents"]["documents"].value == 8


BATCH = 4
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def ingest_until_killed(store_holder: list, stop_at) -> tuple[int, set[str]]:
    """`refinery ingest` in a subprocess, SIGKILLed as soon as ``stop_at(integrity)`` holds;
    returns how many vectors were committed then, and which chunks had one."""
    cmd = [REFINERY, "ingest", "--corpus", str(SAMPLE_CORPUS), "--batch-size", str(BATCH)]
    proc = subprocess.Popen(
        cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            try:
                store = store_holder[0] if store_holder else None
                if store is None:
                    store_holder.append(store_for_home())
                    store = store_holder[0]
                space = store.find_space(MODEL)
                v = store.integrity(space) if space else None
            except sa.exc.SQLAlchemyError:
                continue  # the server or the tables are not there yet
            if v is not None and stop_at(v):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    store = store_holder[0]
    space = store.find_space(MODEL)
    with store.engine.connect() as conn:
        ids = set(conn.execute(sa.select(space.table.c.chunk_id)).scalars())
    return len(ids), ids


def test_sigkill_at_two_points_leaves_whole_batches_and_the_rerun_embeds_exactly_the_rest(
    fresh_home,
):
    """Killed (SIGKILL) after its first batches and again about half-way: what is committed
    is always whole batches of valid vectors, and the next run embeds exactly what is missing:
    nothing twice, nothing left out, earlier vectors untouched."""
    holder: list = []
    first, first_ids = ingest_until_killed(holder, lambda v: v.embedded >= BATCH)
    store = holder[0]
    space = store.find_space(MODEL)
    partial = store.integrity(space)
    assert 0 < first < partial.chunks and first % BATCH == 0  # whole batches only
    assert partial.wrong_dim == partial.nan == partial.stale == partial.orphans == 0

    second, second_ids = ingest_until_killed(
        holder, lambda v: v.embedded >= max(first + BATCH, v.chunks // 2)
    )
    assert first_ids < second_ids and second < partial.chunks and second % BATCH == 0
    with store.engine.connect() as conn:
        before = dict(
            conn.execute(sa.select(space.table.c.chunk_id, space.table.c.embedding)).all()
        )

    result = sync_embeddings(store, Embedder(), batch_size=BATCH)
    final = store.integrity(space)
    assert result.embedded == partial.chunks - second  # exactly the rest
    assert final.missing == final.orphans == final.stale == final.wrong_dim == 0
    assert final.embedded == final.chunks == partial.chunks
    with store.engine.connect() as conn:
        after = dict(conn.execute(sa.select(space.table.c.chunk_id, space.table.c.embedding)).all())
    assert all(np.array_equal(before[i], after[i]) for i in before)  # committed ones untouched
    store.engine.dispose()
    shutil.rmtree(fresh_home / "dagster" / "storage", ignore_errors=True)


def test_postgres_killed_mid_ingest_fails_clearly_and_the_rerun_completes(fresh_home, tmp_path):
    """The database crashes (postmaster SIGKILLed) while `refinery ingest` embeds: the command
    fails saying the database went away, and the rerun, which starts Postgres again, finishes
    the index with every document; running it once more changes nothing."""
    cmd = [REFINERY, "ingest", "--corpus", str(SAMPLE_CORPUS), "--batch-size", str(BATCH)]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    store = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            try:
                store = store or store_for_home()
                space = store.find_space(MODEL)
                if space is not None and store.integrity(space).embedded >= BATCH:
                    break
            except sa.exc.SQLAlchemyError:
                continue  # the server or the tables are not there yet
        assert proc.poll() is None, "the ingest ended before Postgres could be killed"
        kill_embedded_postgres(Settings.from_env())
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if store is not None:
            store.engine.dispose()
    first = log.read_text()
    assert "FAILED" in first and "the database connection was lost" in first, first[-3000:]
    assert "rerun the same command" in first

    def rerun() -> None:
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    rerun()
    store = store_for_home()
    try:
        space = store.find_space(MODEL)
        final = store.integrity(space)
        assert final.missing == final.orphans == final.stale == final.wrong_dim == final.nan == 0
        assert final.embedded == final.chunks > BATCH
        with store.engine.connect() as conn:
            sources = conn.execute(sa.select(schema.documents.c.source)).scalars().all()
        expected = sorted(p.name for p in SAMPLE_CORPUS.iterdir() if p.is_file())
        assert sorted(sources) == expected  # every document of the corpus
        assert store.rejections() == []
        # The index is complete: one more run finds nothing to add, rewrite or remove.
        before = index_rows(store, space)
        rerun()
        assert index_rows(store, space) == before
    finally:
        store.engine.dispose()
        shutil.rmtree(fresh_home / "dagster" / "storage", ignore_errors=True)


def index_rows(store: VectorStore, space) -> dict[str, dict]:
    """Every document, chunk and vector of the index with when it was last written."""
    d, c, v = schema.documents, schema.chunks, space.table
    with store.engine.connect() as conn:
        return {
            "documents": dict(conn.execute(sa.select(d.c.doc_id, d.c.updated_at)).all()),
            "chunks": dict(conn.execute(sa.select(c.c.chunk_id, c.c.updated_at)).all()),
            "vectors": dict(conn.execute(sa.select(v.c.chunk_id, v.c.created_at)).all()),
        }
