"""Retrieval quality and latency per mode and chunking, on two question sets, at the corpus's
own size and among 100k chunks; the simple baseline measured in the same run.

Question sets (each split into tune and test, fixed in the files; only test rows are reported
here, tuning used only tune rows: `python -m benchmarks.retrieval --tune`):
- beekeeping: data/eval/rag_questions.jsonl over data/corpus (34 documents, two of them images);
- sqlite: data/eval/sqlite/questions.jsonl over 93 pages of SQLite's documentation (public
  domain, Debian's sqlite3-doc, fetched by scripts/sqlite-docs.sh), questions written here.
A question counts as found at rank r when the r-th chunk comes from one of its gold documents:
hit@1, hit@5 and MRR@5 (reciprocal rank of the first such chunk in the top 5, else 0).
Latency: the whole `search` call (SQL, one round trip, and the reranker where there is one),
with the question's vector computed beforehand (query embedding excluded); p50/p99 over every
test question, each asked REPEATS times.
Baseline: plain 800-character windows of each document, the same MiniLM, exact search (numpy).
100k: the real chunks plus synthetic distractors up to 100,000 chunks: vectors from a Gaussian
with the real chunk vectors' mean and covariance, text of words drawn from both corpora's word
frequencies (~120 words each), so the HNSW graph and the GIN posting lists are 100k deep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from benchmarks.common import RESULTS, WORK, Timer, fresh_home, percentile, write_table
from evaluation.datasets import (
    DEFAULT_RAG_QUESTIONS,
    SQLITE_CORPUS,
    SQLITE_QUESTIONS,
    load_rag_questions,
)
from refinery.core import schema
from refinery.core.settings import DEFAULT_CORPUS_DIR, REPO_ROOT
from refinery.core.stores import database_url, make_engine
from refinery.corpus.chunking import ChunkingConfig
from refinery.corpus.documents import CorpusFile, parse_file, scan_corpus
from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
from refinery.retrieval.embedding import Embedder
from refinery.retrieval.search import DEFAULT_FUSION, Fusion, Mode, search
from refinery.retrieval.vectorstore import EmbeddingSpace, VectorStore

K = 5
REPEATS = 3
TOTAL_100K = 100_000
DISTRACTOR_WORDS = 120

# The chunking choices measured: today's (no context) and contextual ones of several sizes.
CHUNKINGS = {
    "200/32 plain (before)": ChunkingConfig(200, 32, contextual=False),
    "128/24 plain": ChunkingConfig(128, 24, contextual=False),
    "96/16 contextual": ChunkingConfig(96, 16),
    "128/24 contextual": ChunkingConfig(128, 24),
    "160/32 contextual": ChunkingConfig(160, 32),
    "200/32 contextual": ChunkingConfig(200, 32),
}
DEFAULT_CHUNKING = ChunkingConfig()


@dataclass
class QuestionSet:
    name: str
    corpus: Path
    rows: list[dict[str, Any]]
    vectors: np.ndarray | None = None  # (n_questions, dim), the question embeddings

    def split(self, split: str) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r["split"] == split]


def question_sets(embedder: Embedder) -> list[QuestionSet]:
    if not SQLITE_CORPUS.is_dir() or not any(SQLITE_CORPUS.glob("*.html")):
        subprocess.run([str(REPO_ROOT / "scripts" / "sqlite-docs.sh")], check=True)
    sets = [
        QuestionSet("beekeeping", DEFAULT_CORPUS_DIR, load_rag_questions(DEFAULT_RAG_QUESTIONS)[0]),
        QuestionSet("sqlite", SQLITE_CORPUS, load_rag_questions(SQLITE_QUESTIONS)[0]),
    ]
    for qs in sets:
        qs.vectors = embedder.encode([r["question"] for r in qs.rows])
    return sets


# ---- metrics ----------------------------------------------------------------------------------


def first_rank(sources: Sequence[str], gold: Sequence[str], k: int = K) -> int | None:
    for rank, source in enumerate(sources[:k], start=1):
        if source in gold:
            return rank
    return None


def summarize(ranks: list[int | None], ms: list[float]) -> dict[str, float]:
    n = max(1, len(ranks))
    return {
        "n": len(ranks),
        "hit1": sum(1 for r in ranks if r == 1) / n,
        "hit5": sum(1 for r in ranks if r is not None) / n,
        "mrr5": sum(1.0 / r for r in ranks if r is not None) / n,
        "p50": percentile(ms, 0.5) if ms else float("nan"),
        "p99": percentile(ms, 0.99) if ms else float("nan"),
    }


def run_questions(
    engine: sa.Engine,
    space: EmbeddingSpace,
    qs: QuestionSet,
    split: str,
    mode: Mode,
    *,
    fusion: Fusion = DEFAULT_FUSION,
    reranker: Any = None,
    repeats: int = REPEATS,
    max_per_doc: int | None = None,
) -> dict[str, float]:
    assert qs.vectors is not None
    ranks: list[int | None] = []
    ms: list[float] = []
    for i in qs.split(split):
        row = qs.rows[i]
        for rep in range(repeats):
            t0 = time.perf_counter()
            hits = search(
                engine, space, qs.vectors[i], row["question"], K,
                mode=mode, fusion=fusion, reranker=reranker, max_per_doc=max_per_doc,
            )  # fmt: skip
            ms.append((time.perf_counter() - t0) * 1000)
            if rep == 0:
                ranks.append(first_rank([h.source for h in hits], row["sources"]))
    return summarize(ranks, ms)


def baseline_windows(qs: QuestionSet, embedder: Embedder, split: str, width: int = 800) -> dict:
    """Plain fixed windows of ``width`` characters, embedded as they are, exact cosine search."""
    assert qs.vectors is not None
    sources, texts = [], []
    for item in scan_corpus(qs.corpus):
        if isinstance(item, CorpusFile):
            doc = parse_file(item)
            for start in range(0, len(doc.text), width):
                sources.append(doc.source)
                texts.append(doc.text[start : start + width])
    matrix = embedder.encode(texts, batch_size=32)  # (n_windows, dim)
    ranks: list[int | None] = []
    ms: list[float] = []
    for i in qs.split(split):
        t0 = time.perf_counter()
        top = np.argsort(-(matrix @ qs.vectors[i]))[:K]
        ms.append((time.perf_counter() - t0) * 1000)
        ranks.append(first_rank([sources[j] for j in top], qs.rows[i]["sources"]))
    out = summarize(ranks, ms)
    out["chunks"] = len(texts)
    return out


# ---- indexes ----------------------------------------------------------------------------------


@contextmanager
def database(server_url: str, template: str | None = None) -> Iterator[sa.Engine]:
    """A new database on the embedded server (a copy of ``template`` if given), dropped after."""
    name = f"b_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        copy = f' TEMPLATE "{template}"' if template else ""
        conn.execute(sa.text(f'CREATE DATABASE "{name}"{copy}'))
    engine = sa.create_engine(sa.make_url(server_url).set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def index_home() -> Iterator[str]:
    """The embedded server under benchmarks/.work/retrieval-indexes, kept between runs: each
    (question set, chunking) index is its own database there, brought up to date by the
    ingestion code itself (a rerun with nothing changed does nothing), so tuning, the benchmark
    and the confidence fit share them. Yields the server's URL; stops the server after."""
    import os
    from dataclasses import replace as dc_replace

    from refinery.core.settings import Settings
    from refinery.core.stores import stop_embedded_postgres

    home = WORK / "retrieval-indexes"
    home.mkdir(parents=True, exist_ok=True)
    settings = dc_replace(Settings.from_env(), home=home, database_url=None)
    old = os.environ.get("REFINERY_HOME")
    os.environ["REFINERY_HOME"] = str(home)
    try:
        yield database_url(settings)
    finally:
        stop_embedded_postgres(settings)
        if old is None:
            os.environ.pop("REFINERY_HOME", None)
        else:
            os.environ["REFINERY_HOME"] = old


def index_name(qs: QuestionSet, config: ChunkingConfig, embedder: Embedder) -> str:
    from refinery.core.lineage import sha256_hex

    return "idx_" + sha256_hex(f"{qs.name}\x00{config.fingerprint(embedder.name)}")[:16]


@contextmanager
def index(
    server_url: str, qs: QuestionSet, config: ChunkingConfig, embedder: Embedder
) -> Iterator[tuple[sa.Engine, EmbeddingSpace, int]]:
    """The (question set, chunking) index database, made or updated now; not dropped."""
    name = index_name(qs, config, embedder)
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
        ).first()
        if not exists:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = sa.create_engine(sa.make_url(server_url).set(database=name))
    try:
        _store, space, n_chunks = build_index(engine, qs.corpus, config, embedder)
        yield engine, space, n_chunks
    finally:
        engine.dispose()


def build_index(
    engine: sa.Engine, corpus: Path, config: ChunkingConfig, embedder: Embedder
) -> tuple[VectorStore, EmbeddingSpace, int]:
    store = VectorStore(engine)
    store.create_schema()
    # An index holds its one corpus: the same files read from another checkout (a worktree)
    # are another corpus folder to the ingestion, and would be indexed a second time.
    with engine.begin() as conn:
        conn.execute(
            sa.delete(schema.documents).where(schema.documents.c.corpus != str(corpus.resolve()))
        )
    sync_documents(store, corpus)
    chunks = sync_chunks(store, make_chunker(config, embedder))
    sync_embeddings(store, embedder, batch_size=32)
    space = store.find_space(embedder.name)
    assert space is not None
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return store, space, chunks.chunks_total


def reranker_for_benchmark() -> Any:
    """Query-likelihood reranking with the packaged SmolLM2-135M-Instruct (the base chat
    model; converted once into benchmarks/.work/models)."""
    from refinery.generation.generator import Generator
    from refinery.generation.scoring import QueryLikelihoodReranker
    from training.base_model import resolve_base_model

    info = resolve_base_model(None, WORK / "models")
    return QueryLikelihoodReranker(Generator(info.path), name=f"query-likelihood:{info.name}")


# ---- 100k -------------------------------------------------------------------------------------


def word_frequencies(sets: Sequence[QuestionSet]) -> tuple[list[str], np.ndarray]:
    counts: Counter[str] = Counter()
    for qs in sets:
        for item in scan_corpus(qs.corpus):
            if isinstance(item, CorpusFile):
                counts.update(re.findall(r"[a-z][a-z0-9']+", parse_file(item).text.lower()))
    words = sorted(counts)
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    return words, freq / freq.sum()


def add_distractors(
    engine: sa.Engine,
    space: EmbeddingSpace,
    n: int,
    rng: np.random.Generator,
    words: list[str],
    probs: np.ndarray,
) -> float:
    """Insert ``n`` synthetic chunks (vector + text) in 100 documents; rebuild the indexes.
    Returns the seconds the index builds took."""
    with engine.connect() as conn:
        real = np.array(
            [
                np.asarray(v, dtype=np.float32)
                for v in conn.execute(sa.select(space.table.c.embedding)).scalars()
            ]
        )  # (n_real, dim)
    mean = real.mean(axis=0)
    cov = np.cov(real, rowvar=False) + 1e-5 * np.eye(real.shape[1])
    chol = np.linalg.cholesky(cov).astype(np.float32)
    now = datetime.now(tz=UTC)
    n_docs = 100
    index_names = [space.index_name, "chunks_tsv_gin"]
    with engine.begin() as conn:
        for name in index_names:
            conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
        conn.execute(
            insert(schema.documents),
            [
                {
                    "doc_id": f"synthetic{d:03d}", "corpus": "/synthetic", "source": f"synthetic/{d:03d}.txt",
                    "title": f"Synthetic document {d}", "format": "text", "file_hash": str(d),
                    "content_hash": str(d), "text": "", "n_chars": 0, "size_bytes": 0, "meta": {},
                    "modified_at": now,
                }
                for d in range(n_docs)
            ],
        )  # fmt: skip
        for start in range(0, n, 5000):
            count = min(5000, n - start)
            vectors = mean + rng.normal(size=(count, real.shape[1])).astype(np.float32) @ chol.T
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            picks = rng.choice(len(words), size=(count, DISTRACTOR_WORDS), p=probs)
            rows, vec_rows = [], []
            for j in range(count):
                i = start + j
                cid = f"s{i:07d}"
                rows.append(
                    {
                        "chunk_id": cid, "doc_id": f"synthetic{i % n_docs:03d}",
                        "source": f"synthetic/{i % n_docs:03d}.txt", "position": i // n_docs,
                        "text": " ".join(words[w] for w in picks[j]), "context": f"Synthetic document {i % n_docs}",
                        "content_hash": cid, "token_count": DISTRACTOR_WORDS, "char_start": 0,
                        "char_end": 1, "meta": {},
                    }
                )  # fmt: skip
                vec_rows.append({"chunk_id": cid, "embedding": vectors[j], "content_hash": cid})
            conn.execute(insert(schema.chunks), rows)
            conn.execute(insert(space.table), vec_rows)
    with Timer() as build, engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL maintenance_work_mem = '1GB'"))
        for index in space.table.indexes:
            index.create(conn)
        conn.execute(sa.text("CREATE INDEX chunks_tsv_gin ON chunks USING gin (tsv)"))
        conn.execute(sa.text("ANALYZE"))
    return build.seconds


# ---- `refinery query` from a cold start -------------------------------------------------------

COLD_RUNS = 3
PHASES = """
import time, sys
t0 = time.perf_counter()
marks = {}
def mark(name):
    marks[name] = time.perf_counter() - t0
import sqlalchemy as sa
from refinery.core.settings import Settings
from refinery.core.stores import database_url, make_engine
from refinery.retrieval.query import query_embedder
from refinery.retrieval.search import Retriever
from refinery.retrieval.vectorstore import VectorStore
mark("imports")
settings = Settings.from_env()
engine = make_engine(settings=settings)
mark("postgres start")
store = VectorStore(engine)
store.create_schema()
space = store.find_space("sentence-transformers/all-MiniLM-L6-v2")
mark("schema check")
embedder = query_embedder(settings, None, print, onnx=sys.argv[1] == "onnx")
vector = embedder.encode(["How long does a worker bee take to develop?"])
mark("embedder load + embed")
Retriever(store, embedder, space).search("How long does a worker bee take to develop?", k=5)
mark("search (embed + SQL)")
engine.dispose()
import json
print(json.dumps(marks))
"""


def cold_start(settings: Any, embedder: Embedder) -> list[list[Any]]:
    """Wall time of `refinery query` with the embedded Postgres stopped before each run, ONNX
    query embedder (default) against the sentence-transformers one, alternating; and where
    the time of one cold run goes (phases, in a subprocess)."""
    import os
    import sys

    from refinery.core.stores import stop_embedded_postgres

    engine = make_engine(settings=settings)
    store = VectorStore(engine)
    store.create_schema()
    sync_documents(store, DEFAULT_CORPUS_DIR)
    sync_chunks(store, make_chunker(DEFAULT_CHUNKING, embedder))
    sync_embeddings(store, embedder, query_export_dir=settings.models_dir)
    engine.dispose()
    env = {**os.environ, "REFINERY_HOME": str(settings.home)}
    cli = str(Path(sys.executable).parent / "refinery")
    question = "How long does a worker bee take to develop?"
    times: dict[str, list[float]] = {"onnx": [], "sentence-transformers": []}
    phases: dict[str, list[dict[str, float]]] = {"onnx": [], "sentence-transformers": []}
    for _ in range(COLD_RUNS):
        for kind in times:
            stop_embedded_postgres(settings)
            t0 = time.perf_counter()
            subprocess.run(
                [cli, "query", question, "--embedder", kind],
                env=env,
                check=True,
                capture_output=True,
            )
            times[kind].append(time.perf_counter() - t0)
            stop_embedded_postgres(settings)
            out = (
                subprocess.run(
                    [sys.executable, "-c", PHASES, kind],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            phases[kind].append(json.loads(out))
    rows = []
    for kind, values in times.items():
        label = "ONNX export (default)" if kind == "onnx" else "sentence-transformers (before)"
        marks = {k: float(np.median([p[k] for p in phases[kind]])) for k in phases[kind][0]}
        steps, last = [], 0.0
        for name, at in marks.items():
            steps.append(f"{name} {at - last:.2f}")
            last = at
        rows.append(
            [
                label,
                f"{np.median(values):.2f}",
                f"{min(values):.2f}",
                f"{max(values):.2f}",
                "; ".join(steps),
            ]
        )
    return rows


# ---- tables -----------------------------------------------------------------------------------


def fmt_row(set_name: str, size: str, chunking: str, mode: str, m: dict[str, float]) -> list[Any]:
    return [
        set_name, size, chunking, mode, m["n"],
        f"{m['hit1']:.3f}", f"{m['hit5']:.3f}", f"{m['mrr5']:.3f}",
        f"{m['p50']:.1f}", f"{m['p99']:.1f}",
    ]  # fmt: skip


HEADER = ["set", "chunks", "chunking", "mode", "questions", "hit@1", "hit@5", "MRR@5", "p50 ms", "p99 ms"]  # fmt: skip


FUSION_GRID = {
    "rrf_k": [10, 60],
    "text_weight": [0.5, 1.0, 2.0],
    "normalization": [0, 1],
    "max_df": [1.0, 0.2, 0.05],
}


def tune() -> None:
    """Tune split only: every chunking with every mode, then a grid of fusion settings for the
    hybrid mode (mean MRR@5 of the two sets), then the reranker's candidate count."""
    embedder = Embedder()
    sets = question_sets(embedder)
    rows: list[list[Any]] = []
    grid_rows: list[list[Any]] = []
    combos = [
        Fusion(rrf_k=k, text_weight=w, normalization=z, max_df=df)
        for k, w, z, df in itertools.product(*FUSION_GRID.values())
    ]
    scores: dict[tuple[str, Fusion], list[float]] = {}
    with index_home() as server:
        for qs in sets:
            base = baseline_windows(qs, embedder, "tune")
            rows.append(
                fmt_row(
                    qs.name,
                    f"{base['chunks']}",
                    "800-char windows",
                    "vector, exact (baseline)",
                    base,
                )
            )
            for label, config in CHUNKINGS.items():
                with index(server, qs, config, embedder) as (engine, space, n_chunks):
                    for mode in [Mode.VECTOR, Mode.TEXT, Mode.HYBRID]:
                        m = run_questions(engine, space, qs, "tune", mode, repeats=1)
                        rows.append(fmt_row(qs.name, str(n_chunks), label, mode.value, m))
                    for fusion in combos:
                        m = run_questions(
                            engine, space, qs, "tune", Mode.HYBRID, fusion=fusion, repeats=1
                        )
                        scores.setdefault((label, fusion), []).append(m["mrr5"])
    ranked = sorted(scores.items(), key=lambda kv: -float(np.mean(kv[1])))
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "retrieval_tuning.json").write_text(
        json.dumps(
            [{"chunking": k[0], "fusion": asdict(k[1]), "mrr5": v} for k, v in ranked], indent=1
        )
    )
    for (label, fusion), mrrs in ranked[:25]:
        grid_rows.append(
            [label, fusion.rrf_k, fusion.text_weight, fusion.normalization, fusion.max_df,
             " / ".join(f"{x:.3f}" for x in mrrs), f"{np.mean(mrrs):.3f}"]
        )  # fmt: skip
    write_table(
        "retrieval_tuning",
        "Retrieval tuning (TUNE split only: what the defaults were chosen on)",
        "Every chunking and mode on the tune split of both question sets, then the 25 best "
        "hybrid fusion settings by mean MRR@5 (grid: " + json.dumps(FUSION_GRID) + ").",
        HEADER,
        rows,
        notes="Best fusion settings (tune split):\n\n| chunking | rrf_k | text weight | "
        "ts_rank_cd normalization | max_df | MRR@5 beekeeping / sqlite | mean |\n|---|---|---|---|---|---|---|\n"
        + "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in grid_rows),
    )


def kept_rows(other_sets: set[str]) -> list[list[str]]:
    """Rows of the committed table for the sets not re-run now."""
    path = RESULTS / "retrieval.md"
    if not other_sets or not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in other_sets:
            rows.append(cells)
    return rows


def main(tune_only: bool = False, only: Sequence[str] = ()) -> None:
    if tune_only:
        tune()
        return
    split = "test"
    embedder = Embedder()
    sets = question_sets(embedder)
    others = {qs.name for qs in sets if only and qs.name not in only}
    previous = kept_rows(others)
    sets = [qs for qs in sets if qs.name not in others]
    reranker = reranker_for_benchmark()
    rows: list[list[Any]] = []
    notes: list[str] = []
    with index_home() as server:
        for qs in sets:
            base = baseline_windows(qs, embedder, split)
            rows.append(
                fmt_row(
                    qs.name,
                    f"{base['chunks']}",
                    "800-char windows",
                    "vector, exact (baseline)",
                    base,
                )
            )
            for label, config in CHUNKINGS.items():
                with index(server, qs, config, embedder) as (engine, space, n_chunks):
                    default = config == DEFAULT_CHUNKING
                    # the reranker (~0.5 s a question) only on the default chunking
                    modes = [Mode.VECTOR, Mode.TEXT, Mode.HYBRID] + (
                        [Mode.RERANK] if default else []
                    )
                    for mode in modes:
                        m = run_questions(
                            engine, space, qs, split, mode, reranker=reranker,
                            repeats=1 if mode is Mode.RERANK else REPEATS,
                        )  # fmt: skip
                        tag = " (default)" if default else ""
                        rows.append(fmt_row(qs.name, str(n_chunks), label + tag, mode.value, m))
        # 100k: a copy of the default index with synthetic distractors added.
        words, probs = word_frequencies(sets)
        rng = np.random.default_rng(13)
        for qs in sets:
            with index(server, qs, DEFAULT_CHUNKING, embedder) as (_engine, _space, n_chunks):
                pass
            with database(server, template=index_name(qs, DEFAULT_CHUNKING, embedder)) as engine:
                store = VectorStore(engine)
                space = store.find_space(embedder.name)
                assert space is not None
                build_s = add_distractors(engine, space, TOTAL_100K - n_chunks, rng, words, probs)
                with Timer() as stats:
                    store.refresh_text_stats()
                notes.append(
                    f"{qs.name} at 100k: HNSW and GIN indexes rebuilt in {build_s:.0f} s, "
                    f"lexeme counts in {stats.seconds:.1f} s"
                )
                for mode in [Mode.VECTOR, Mode.TEXT, Mode.HYBRID, Mode.RERANK]:
                    m = run_questions(
                        engine, space, qs, split, mode, reranker=reranker,
                        repeats=1 if mode is Mode.RERANK else REPEATS,
                    )  # fmt: skip
                    rows.append(fmt_row(qs.name, "100k", "default", mode.value, m))
    with fresh_home("retrieval-cold") as settings:
        cold = cold_start(settings, embedder)
    cold_table = "\n".join(
        [
            "| query embedder | median s | min s | max s | where one cold run goes (s, medians) |",
            "|---|---|---|---|---|",
        ]
        + ["| " + " | ".join(str(c) for c in r) + " |" for r in cold]
    )
    if previous:
        order = ["beekeeping", "sqlite"]  # the table's order: each size, then each set
        rows = sorted(rows + previous, key=lambda r: (r[1] == "100k", order.index(r[0])))
        notes.append(
            f"Rows of {', '.join(sorted(others))} are from the previous run of this table "
            "(not re-run: `--only` named the other sets)."
        )
    notes.append(
        f"`refinery query` from a cold start (Postgres stopped before each of {COLD_RUNS} runs, "
        "process start to exit, including starting and stopping the embedded Postgres):\n\n"
        + cold_table
    )
    write_table(
        "retrieval",
        "Retrieval: quality and latency by mode and chunking (test split)",
        __doc__ or "",
        HEADER,
        rows,
        notes=f"Split reported: {split}. Reranker: {reranker.name} over the top 10 hybrid "
        f"candidates. Fusion: {DEFAULT_FUSION}.\n\n" + "\n\n".join(notes),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true", help="tune on the tune split instead")
    parser.add_argument("--only", nargs="*", default=[], help="re-run these question sets only")
    args = parser.parse_args()
    main(tune_only=args.tune, only=args.only)
