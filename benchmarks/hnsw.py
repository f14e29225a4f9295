"""HNSW recall@10 against exact search, and query latency, at 10k and 100k synthetic chunks.

Two synthetic sets of 384-d, L2-normalized vectors, both derived from real all-MiniLM-L6-v2
embeddings of the sample corpus's ~1,200 sentences: "manifold" (mixes of a real embedding and
one of its nearest neighbours, plus noise: the clustered structure of real embeddings) and
"gaussian" (a Gaussian with the real embeddings' mean and covariance: the worst case, with no
clusters). Queries are new points drawn the same way.
Latency is the whole `search_vector` call: SQLAlchemy, psycopg, the join to chunks
and documents, on the embedded Postgres over its Unix socket.
"""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from benchmarks.common import Timer, fresh_home, median, percentile, write_table
from refinery.core import schema
from refinery.core.settings import DEFAULT_CORPUS_DIR
from refinery.core.stores import database_url
from refinery.retrieval.search import DEFAULT_EF_SEARCH, Filters, explain_search, search_vector
from refinery.retrieval.vectorstore import VectorStore

DIM = 384
CHUNKS_PER_DOC = 100
QUERIES = 200
K = 10
# Per-dimension noise; 0.02 * sqrt(384) = 0.39 of a unit vector's length.
NOISE = 0.02
SIZES = [10_000, 100_000]


def corpus_sentences() -> list[str]:
    from refinery.corpus.documents import CorpusFile, parse_file, scan_corpus

    sentences: set[str] = set()
    for item in scan_corpus(DEFAULT_CORPUS_DIR):
        if isinstance(item, CorpusFile):
            text = parse_file(item).text
            sentences.update(
                s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.strip()) > 30
            )
    return sorted(sentences)


def synthetic(n: int, rng: np.random.Generator, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points along the manifold of real embeddings: each is a random mix of a real sentence
    embedding and one of its 10 nearest real neighbours, plus a little noise, L2-normalized."""
    sims = real @ real.T  # (m, m) cosine similarities of the real sentence embeddings
    np.fill_diagonal(sims, -1.0)
    neighbours = np.argsort(-sims, axis=1)[:, :10]  # (m, 10)

    def points(count: int) -> np.ndarray:
        a = rng.integers(0, len(real), size=count)
        b = neighbours[a, rng.integers(0, neighbours.shape[1], size=count)]
        t = rng.uniform(0, 1, size=(count, 1)).astype(np.float32)
        x = (
            t * real[a]
            + (1 - t) * real[b]
            + NOISE * rng.normal(size=(count, DIM)).astype(np.float32)
        )
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return points(n), points(QUERIES)


def gaussian(n: int, rng: np.random.Generator, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Worst case: a Gaussian with the mean and covariance of the real embeddings. Same spread
    of variance over directions, none of the clustering that makes real neighbours easy."""
    mean = real.mean(axis=0)
    chol = np.linalg.cholesky(np.cov(real, rowvar=False) + 1e-6 * np.eye(DIM)).astype(np.float32)

    def points(count: int) -> np.ndarray:
        x = mean + rng.normal(size=(count, DIM)).astype(np.float32) @ chol.T
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return points(n), points(QUERIES)


DATASETS = {"manifold": synthetic, "gaussian": gaussian}


def real_embeddings() -> np.ndarray:
    from refinery.retrieval.embedding import Embedder

    return Embedder().encode(corpus_sentences(), batch_size=64)  # (n_sentences, 384)


def load(engine: sa.Engine, store: VectorStore, vectors: np.ndarray) -> tuple[object, float]:
    """Bulk-load documents, chunks and vectors; build the HNSW index afterwards (timed)."""
    space = store.ensure_space("synthetic-384", DIM)
    now = datetime.now(tz=UTC)
    n_docs = len(vectors) // CHUNKS_PER_DOC
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {space.index_name}"))
        conn.execute(
            insert(schema.documents),
            [
                {
                    "doc_id": f"d{d:05d}", "corpus": "/synthetic", "source": f"doc{d:05d}.txt",
                    "title": f"doc {d}", "format": "pdf" if d % 10 == 0 else "text",  # 10% are "pdf"
                    "file_hash": str(d), "content_hash": str(d), "text": "", "n_chars": 0,
                    "size_bytes": 0, "meta": {}, "modified_at": now,
                }
                for d in range(n_docs)
            ],
        )  # fmt: skip
        for start in range(0, len(vectors), 5000):
            idx = range(start, min(start + 5000, len(vectors)))
            conn.execute(
                insert(schema.chunks),
                [
                    {
                        "chunk_id": f"c{i:07d}", "doc_id": f"d{i // CHUNKS_PER_DOC:05d}",
                        "source": f"doc{i // CHUNKS_PER_DOC:05d}.txt", "position": i % CHUNKS_PER_DOC,
                        "text": f"synthetic chunk {i}", "content_hash": str(i), "token_count": 3,
                        "char_start": 0, "char_end": 1, "meta": {},
                    }
                    for i in idx
                ],
            )  # fmt: skip
            conn.execute(
                insert(space.table),
                [
                    {"chunk_id": f"c{i:07d}", "embedding": vectors[i], "content_hash": str(i)}
                    for i in idx
                ],
            )
    with Timer() as build, engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL maintenance_work_mem = '1GB'"))
        for index in space.table.indexes:
            index.create(conn)
        conn.execute(sa.text("ANALYZE"))
    return space, build.seconds


def measure(
    engine,
    space,
    queries,
    *,
    filters=None,
    exact=False,
    ef_search=DEFAULT_EF_SEARCH,
    iterative=True,
):
    ids, times = [], []
    for q in queries:
        with Timer() as t:
            hits = search_vector(
                engine, space, q, K, filters, exact=exact, ef_search=ef_search, iterative=iterative
            )
        times.append(t.seconds * 1000)
        ids.append([h.chunk_id for h in hits])
    return ids, times


def recall(got: list[list[str]], truth: list[list[str]]) -> float:
    return float(
        np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True) if t])
    )


def main() -> None:
    rng = np.random.default_rng(7)
    real = real_embeddings()
    rows: list[list[object]] = []
    pdf = Filters(formats=("pdf",))
    for (dataset, generate), n in itertools.product(DATASETS.items(), SIZES):
        vectors, queries = generate(n, rng, real)
        size = f"{n // 1000}k {dataset}"

        def row(
            label: str,
            got: list[list[str]],
            truth: list[list[str]],
            ms: list[float],
            size: str = size,
        ) -> None:
            rows.append([size, label, f"{recall(got, truth):.3f}", f"{median(ms):.1f}", f"{percentile(ms, 0.99):.1f}", min(map(len, got))])  # fmt: skip

        with fresh_home(f"retrieval-{dataset}-{n}") as settings:
            engine = sa.create_engine(database_url(settings))
            store = VectorStore(engine)
            store.create_schema()
            space, build_s = load(engine, store, vectors)
            uses_index = space.index_name in explain_search(engine, space, queries[0], K, pdf)
            plan = "HNSW index" if uses_index else "the planner chose a scan"
            measure(engine, space, queries[:20])  # warm the caches
            truth, ms = measure(engine, space, queries, exact=True)
            row("exact scan (baseline)", truth, truth, ms)
            for ef in (40, DEFAULT_EF_SEARCH):
                got, ms = measure(engine, space, queries, ef_search=ef)
                row(f"HNSW, ef_search={ef}" + (" (Refinery's default)" if ef == DEFAULT_EF_SEARCH else " (pgvector's default)"), got, truth, ms)  # fmt: skip
            truth_f, ms = measure(engine, space, queries, exact=True, filters=pdf)
            row("10% filter: exact scan (baseline)", truth_f, truth_f, ms)
            got, ms = measure(engine, space, queries, filters=pdf, iterative=False)
            row(
                f"10% filter: HNSW, ef_search={DEFAULT_EF_SEARCH}, no iterative scan",
                got,
                truth_f,
                ms,
            )
            for ef in (DEFAULT_EF_SEARCH, 200):
                got, ms = measure(engine, space, queries, filters=pdf, ef_search=ef)
                row(f"10% filter: HNSW + iterative scan, ef_search={ef} ({plan})", got, truth_f, ms)
            rows.append([size, f"HNSW build, m=16, ef_construction=64 ({n} vectors)", "", f"{build_s:.1f} s", "", ""])  # fmt: skip
            engine.dispose()
    write_table(
        "hnsw",
        "Retrieval: HNSW recall and latency",
        __doc__ or "",
        ["chunks", "search", "recall@10", "p50 ms", "p99 ms", "fewest rows returned (k=10)"],
        rows,
        notes=f"{QUERIES} queries per row; recall is against the exact scan with the same filter. "
        "The 10% filter keeps chunks of documents whose format is pdf (a join to documents).",
    )


if __name__ == "__main__":
    main()
