"""Ingestion throughput against the bare embedding model, and a no-change rerun against a full run.

Corpus: the sample corpus copied COPIES times into one folder (each copy is its own set of
documents, so every chunk is embedded).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import sqlalchemy as sa

from benchmarks.common import WORK, Timer, fresh_home, median, write_table
from refinery.core.settings import DEFAULT_CORPUS_DIR
from refinery.core.stores import make_engine
from refinery.corpus.chunking import ChunkingConfig
from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
from refinery.retrieval.embedding import Embedder
from refinery.retrieval.vectorstore import VectorStore

COPIES = 5
BATCH = 64
ROUNDS = 2


def build_corpus(dst: Path, copies: int) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    for i in range(copies):
        shutil.copytree(DEFAULT_CORPUS_DIR, dst / f"copy{i}")
    return dst


def full_sync(store: VectorStore, corpus: Path, embedder: Embedder) -> dict[str, float]:
    with Timer() as t_docs:
        sync_documents(store, corpus)
    with Timer() as t_chunks:
        sync_chunks(store, make_chunker(ChunkingConfig(), embedder))
    with Timer() as t_embed:
        result = sync_embeddings(store, embedder, batch_size=BATCH)
    return {
        "docs": t_docs.seconds,
        "chunks": t_chunks.seconds,
        "embed": t_embed.seconds,
        "total": t_docs.seconds + t_chunks.seconds + t_embed.seconds,
        "embedded": result.embedded,
    }


def dagster_ingest(corpus: Path) -> float:
    import dagster as dg

    from orchestration.definitions import defs

    with Timer() as t:
        result = defs.resolve_job_def("ingest").execute_in_process(
            run_config={"ops": {"source_documents": {"config": {"corpus_dir": str(corpus)}}}},
            instance=dg.DagsterInstance.ephemeral(),
        )
    assert result.success
    return t.seconds


def main() -> None:
    corpus = build_corpus(WORK / "ingestion-corpus", COPIES)
    rows: list[list[object]] = []
    with fresh_home("ingestion") as settings:
        engine = make_engine(settings=settings)
        store = VectorStore(engine)
        store.create_schema()
        with Timer() as t_load:
            embedder = Embedder()
            embedder.encode(["warm up"])  # first call pays lazy initialisation
        first = full_sync(store, corpus, embedder)
        n = int(first["embedded"])
        space = store.find_space(embedder.name)
        assert space is not None
        with engine.connect() as conn:
            texts = list(
                conn.execute(sa.text("SELECT text FROM chunks ORDER BY chunk_id")).scalars()
            )
        bare, pipe = [], []
        for _ in range(ROUNDS):
            with Timer() as t:
                embedder.encode(texts, batch_size=BATCH)
            bare.append(t.seconds)
            with engine.begin() as conn:
                conn.execute(sa.text(f"TRUNCATE {space.table_name}"))
            with Timer() as t:
                sync_embeddings(store, embedder, batch_size=BATCH)
            pipe.append(t.seconds)
        no_change = []
        for _ in range(3):
            with Timer() as t:
                r = full_sync(store, corpus, embedder)
            assert r["embedded"] == 0
            no_change.append(t.seconds)
        engine.dispose()
        bare_rate, pipe_rate = n / median(bare), n / median(pipe)
        full_total = first["total"] + t_load.seconds
        rows += [
            ["bare model: `SentenceTransformer.encode` of the same chunk texts", f"{bare_rate:.1f} chunks/s", "baseline"],
            ["Refinery: fetch missing → encode → upsert into pgvector (HNSW)", f"{pipe_rate:.1f} chunks/s", f"**{pipe_rate / bare_rate:.2f}×** bare (target ≥ 0.9×)"],
            ["full run from an empty database (parse, chunk, embed; model load included)", f"{full_total:.1f} s", f"parse {first['docs']:.1f} s, chunk {first['chunks']:.1f} s, model load {t_load.seconds:.1f} s, embed {first['embed']:.1f} s"],
            ["no-change rerun (library)", f"{median(no_change):.2f} s", f"**{median(no_change) / full_total:.1%}** of the full run (target ≤ 5%)"],
        ]  # fmt: skip
    with fresh_home("ingestion-dagster"):
        full_dagster = dagster_ingest(corpus)
        reruns = [dagster_ingest(corpus) for _ in range(3)]
        rows += [
            ["full run through Dagster (`ingest` job, with MLflow runs and checks)", f"{full_dagster:.1f} s", "fresh home, new process state"],
            ["no-change rerun through Dagster", f"{median(reruns):.2f} s", f"**{median(reruns) / full_dagster:.1%}** of the Dagster full run"],
        ]  # fmt: skip
    write_table(
        "ingestion",
        "Ingestion throughput",
        f"Corpus: the sample corpus × {COPIES} ({COPIES * 32} documents, {n} chunks of ≤ 200 tokens); "
        f"all-MiniLM-L6-v2 on CPU, batch {BATCH}. Throughput is the median of {ROUNDS} interleaved "
        "rounds; reruns are the median of 3.",
        ["what", "result", "comparison"],
        rows,
        notes="The no-change rerun hashes every file's bytes, compares them with the documents "
        "table and finds no chunk without a vector, so it never loads the embedding model.",
    )
    shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
