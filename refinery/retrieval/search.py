"""Retrieval over the chunks: vector search (pgvector), full-text search (Postgres), and both
fused, with metadata filters, result diversity and an optional reranking stage.

Modes:
- ``vector``: top-k by cosine distance (HNSW). Filtered queries use pgvector 0.8's iterative
  index scans, so a selective filter still returns k rows.
- ``text``: Postgres full-text search on ``chunks.tsv`` (GIN index): the question's words,
  stemmed, any of them matching (OR), ranked by ``ts_rank_cd``.
- ``hybrid`` (the default): both candidate lists in one SQL statement (CTEs), fused by
  reciprocal rank: ``w_v / (rrf_k + vector rank) + w_t / (rrf_k + text rank)``.
- ``hybrid+rerank``: hybrid candidates re-ordered by a ``Reranker`` (any object that scores
  question/passage pairs; see refinery.generation.scoring.QueryLikelihoodReranker).
The same filters apply to every list; ``max_per_doc`` keeps at most n chunks of one document.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import REGCONFIG, TSQUERY

from refinery.core import schema
from refinery.retrieval.vectorstore import EmbeddingSpace, VectorStore

MAX_K = 100
MAX_QUESTION_CHARS = 4000
# hnsw.ef_search: candidates kept while searching. 100 gave recall@10 >= 0.98 at 100k chunks in
# benchmarks/retrieval (pgvector's default of 40 gave less); it costs well under a millisecond.
DEFAULT_EF_SEARCH = 100


@dataclass(frozen=True)
class Filters:
    """Restrict the search. Every field that is set must match (AND); lists match any (OR).

    sources: corpus-relative paths; ``*`` is a wildcard (``"varroa*"``, ``"guides/*.md"``)
    formats: "markdown", "text", "html", "pdf"
    doc_ids: document ids
    meta:    JSON containment on the chunk's metadata, e.g. ``{"pages": [2]}``
    """

    sources: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    doc_ids: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sources or self.formats or self.doc_ids or self.meta)


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    source: str
    title: str
    position: int
    text: str
    score: (
        float  # cosine similarity in [-1, 1] to the question, whatever the mode; higher is closer
    )
    meta: dict[str, Any]
    # Why it was returned (``--explain``): its rank in each list (None: not among the
    # candidates), the text rank value, the fused score, and the reranker's score.
    vector_rank: int | None = None
    text_rank: int | None = None
    text_score: float | None = None
    fused: float | None = None
    rerank_score: float | None = None
    context: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RetrievalError(ValueError):
    pass


class Mode(enum.StrEnum):
    VECTOR = "vector"
    TEXT = "text"
    HYBRID = "hybrid"
    RERANK = "hybrid+rerank"


DEFAULT_MODE = Mode.HYBRID


@dataclass(frozen=True)
class Fusion:
    """How the hybrid modes rank (defaults tuned on the tune splits, benchmarks/retrieval.py).

    rrf_k: the reciprocal-rank constant (larger: ranks matter less); the weights scale each
    list's share; ``candidates`` rows are taken from each list before fusing; ``normalization``
    is ts_rank_cd's length normalization flag (Postgres docs: 0 none, 1 log length, ...).
    """

    rrf_k: int = 10
    vector_weight: float = 1.0
    text_weight: float = 0.5
    candidates: int = 40
    normalization: int = 1
    max_df: float = 0.2  # leave out query words in more than this share of chunks (1: none)

    def __post_init__(self) -> None:
        if self.rrf_k < 0 or self.candidates < 1 or self.candidates > 1000:
            raise RetrievalError(f"bad fusion settings {self}")
        if self.vector_weight < 0 or self.text_weight < 0:
            raise RetrievalError("fusion weights must be >= 0")
        if not 0 < self.max_df <= 1.0:
            raise RetrievalError(f"max_df must be in (0, 1], got {self.max_df}")
        if not 0 <= self.normalization <= 63:
            raise RetrievalError(
                f"normalization must be a ts_rank flag in [0, 63], got {self.normalization}"
            )


DEFAULT_FUSION = Fusion()


class Reranker(Protocol):
    """Scores (question, passage) pairs; higher is more relevant."""

    name: str

    def score(self, question: str, passages: Sequence[str]) -> list[float]: ...


# How many hybrid candidates the reranker sees, and how its order and the hybrid order combine.
RERANK_CANDIDATES = 10


class Retriever:
    """Embeds a question with the same model that embedded the chunks and searches its space."""

    def __init__(
        self,
        store: VectorStore,
        embedder: Any,
        space: EmbeddingSpace | None = None,
        *,
        mode: Mode | str = DEFAULT_MODE,
        fusion: Fusion = DEFAULT_FUSION,
        reranker: Reranker | None = None,
    ):
        """``embedder``: anything with ``name`` and ``encode(list[str]) -> (n, dim)`` (the
        sentence-transformers ``Embedder`` or the ONNX ``OnnxEmbedder``)."""
        self.store = store
        self.embedder = embedder
        found = space or store.find_space(embedder.name)
        if found is None:
            raise RetrievalError(
                f"no embeddings for model {embedder.name!r} yet: run `refinery ingest` first"
            )
        self.space = found
        self.mode = parse_mode(mode)
        self.fusion = fusion
        self.reranker = reranker

    def search(
        self,
        question: str,
        k: int = 5,
        filters: Filters | None = None,
        *,
        mode: Mode | str | None = None,
        max_per_doc: int | None = None,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> list[Hit]:
        question = check_question(question)
        vector = self.embedder.encode([question])[0]  # (dim,)
        return search(
            self.store.engine,
            self.space,
            vector,
            question,
            k,
            filters,
            mode=self.mode if mode is None else mode,
            fusion=self.fusion,
            max_per_doc=max_per_doc,
            reranker=self.reranker,
            ef_search=ef_search,
        )


def check_question(question: str) -> str:
    question = (question or "").strip()
    if not question:
        raise RetrievalError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise RetrievalError(f"the question is longer than {MAX_QUESTION_CHARS} characters")
    return question


def parse_mode(mode: Mode | str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise RetrievalError(
            f"unknown retrieval mode {mode!r}; choose one of {', '.join(m.value for m in Mode)}"
        ) from None


MAX_QUERY_TERMS = 32


def _text_query_cte(question: str, max_df: float) -> Any:
    """A one-row CTE ``query(q)``: the question's lexemes OR-ed into a tsquery.

    The question is parsed by Postgres with the index's configuration (stemmed, stop words
    dropped; it is a bound value, never tsquery syntax). Lexemes found in more than ``max_df``
    of the chunks (``lexeme_stats``) are left out, the rarest one always kept: a word in half
    the corpus matches half the corpus, ranks nothing apart and makes the query slow.
    """
    stats = schema.lexeme_stats
    config = sa.cast(schema.TEXT_SEARCH_CONFIG, REGCONFIG)
    lexemes = (
        sa.func.unnest(sa.func.tsvector_to_array(sa.func.to_tsvector(config, question)))
        .table_valued("lexeme")
        .render_derived(name="lexemes")
    )
    df = sa.func.coalesce(stats.c.ndoc, 0)
    terms = (
        sa.select(
            lexemes.c.lexeme,
            df.label("df"),
            sa.func.row_number().over(order_by=(df, lexemes.c.lexeme)).label("r"),
        )
        .select_from(lexemes.outerjoin(stats, stats.c.lexeme == lexemes.c.lexeme))
        # tsquery syntax is built from these: leave out what its quoting cannot carry
        .where(sa.not_(lexemes.c.lexeme.op("~")(r"[\\']")))
        .cte("terms")
    )
    total = sa.select(stats.c.ndoc).where(stats.c.lexeme == "").scalar_subquery()
    cap = sa.func.coalesce(sa.cast(total, sa.Float) * max_df, sa.cast(1e18, sa.Float))
    keep = sa.or_(terms.c.r == 1, terms.c.df <= cap) if max_df < 1.0 else sa.true()
    return (
        sa.select(
            sa.cast(
                sa.func.string_agg(sa.func.quote_literal(terms.c.lexeme), " | "), TSQUERY
            ).label("q")
        )
        .where(keep, terms.c.r <= MAX_QUERY_TERMS)
        .cte("query")
    )


def rrf(ranks: Sequence[int | None], weights: Sequence[float], rrf_k: int) -> float:
    """Reciprocal rank fusion of one item's 1-based ranks in several lists (None: absent)."""
    return sum(
        w / (rrf_k + r) for r, w in zip(ranks, weights, strict=True) if r is not None and w > 0
    )


def search(
    engine: sa.Engine,
    space: EmbeddingSpace,
    vector: np.ndarray | None,
    question: str,
    k: int = 5,
    filters: Filters | None = None,
    *,
    mode: Mode | str = DEFAULT_MODE,
    fusion: Fusion = DEFAULT_FUSION,
    max_per_doc: int | None = None,
    reranker: Reranker | None = None,
    rerank_candidates: int = RERANK_CANDIDATES,
    ef_search: int = DEFAULT_EF_SEARCH,
    exact: bool = False,
) -> list[Hit]:
    """The k best chunks for ``question`` (and its vector, shape (dim,)) in one SQL round trip.

    ``vector`` may be None in text mode (scores are then 0). ``exact=True`` scans every vector
    instead of the HNSW index.
    """
    mode = parse_mode(mode)
    if max_per_doc is not None and max_per_doc < 1:
        raise RetrievalError(f"max_per_doc must be >= 1, got {max_per_doc}")
    if mode is not Mode.TEXT and vector is None:
        raise RetrievalError(f"mode {mode.value} needs the question's vector")
    if mode is Mode.RERANK and reranker is None:
        raise RetrievalError("mode hybrid+rerank needs a reranker")
    if mode is Mode.VECTOR and max_per_doc is None and vector is not None:
        found = search_vector(engine, space, vector, k, filters, ef_search=ef_search, exact=exact)
        return [
            replace(h, vector_rank=i, fused=rrf([i], [1.0], fusion.rrf_k))
            for i, h in enumerate(found, start=1)
        ]
    wanted = max(k, rerank_candidates) if mode is Mode.RERANK else k
    stmt, n = _hybrid_statement(space, vector, question, wanted, filters, mode, fusion, max_per_doc)
    with engine.begin() as conn:
        _plan_settings(conn, exact, max(ef_search, n), bool(filters))
        rows = conn.execute(stmt).all()
    hits = [_fused_hit(r) for r in rows]
    if mode is Mode.RERANK and reranker is not None and hits:
        hits = rerank(question, hits, reranker, fusion.rrf_k)
    # The statement keeps at most max_per_doc per document (tests/integration/
    # test_hybrid_search.py checks it against a reference); reranking only reorders its rows.
    return hits[:k]


def _fused_hit(r: Any) -> Hit:
    """A row of the hybrid statement as a Hit (score 0 when no vector was given)."""
    return Hit(
        chunk_id=r.chunk_id,
        doc_id=r.doc_id,
        source=r.source,
        title=r.title,
        position=r.position,
        text=r.text,
        score=0.0 if r.distance is None else 1.0 - float(r.distance),
        meta=r.meta,
        vector_rank=r.vector_rank,
        text_rank=r.text_rank,
        text_score=None if r.text_score is None else float(r.text_score),
        fused=float(r.fused),
        context=r.context,
    )


def rerank(question: str, hits: Sequence[Hit], reranker: Reranker, rrf_k: int) -> list[Hit]:
    """Re-order hybrid hits by the reranker's scores, fused with their hybrid order by
    reciprocal rank (a reranker that is sure of itself moves a hit up; one that is not cannot
    throw away what both lists agreed on)."""
    from refinery.corpus.chunking import embedding_text

    scores = reranker.score(question, [embedding_text(h.context, h.text) for h in hits])
    order = sorted(range(len(hits)), key=lambda i: -scores[i])
    rerank_rank = {i: r for r, i in enumerate(order, start=1)}
    fused = [rrf([i + 1, rerank_rank[i]], [1.0, 1.0], rrf_k) for i in range(len(hits))]
    ranked = sorted(range(len(hits)), key=lambda i: (-fused[i], rerank_rank[i]))
    return [replace(hits[i], rerank_score=float(scores[i]), fused=fused[i]) for i in ranked]


def search_vector(
    engine: sa.Engine,
    space: EmbeddingSpace,
    vector: np.ndarray,
    k: int = 5,
    filters: Filters | None = None,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
    exact: bool = False,
    iterative: bool = True,
) -> list[Hit]:
    """The k chunks nearest to ``vector`` (shape (dim,)) by cosine distance.

    ``exact=True`` scans every row instead of the HNSW index (the ground truth for recall);
    ``iterative=False`` turns pgvector's iterative scan off for filtered queries (a baseline).
    """
    stmt = _search_statement(space, vector, k, filters, ef_search)
    with engine.begin() as conn:
        _plan_settings(conn, exact, ef_search, bool(filters) and iterative)
        rows = conn.execute(stmt).all()
    return [
        Hit(
            chunk_id=r.chunk_id,
            doc_id=r.doc_id,
            source=r.source,
            title=r.title,
            position=r.position,
            text=r.text,
            score=1.0 - float(r.distance),
            meta=r.meta,
            context=r.context,
        )
        for r in rows
    ]


def explain_search(
    engine: sa.Engine,
    space: EmbeddingSpace,
    vector: np.ndarray,
    k: int = 5,
    filters: Filters | None = None,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
) -> str:
    """Postgres's plan for ``search_vector`` with the same settings (to see the index used)."""
    stmt = _search_statement(space, vector, k, filters, ef_search)
    compiled = stmt.compile(engine, compile_kwargs={"render_postcompile": True})
    with engine.begin() as conn:
        _plan_settings(conn, False, ef_search, bool(filters))
        params = {
            k: "[" + ",".join(map(str, v.tolist())) + "]" if isinstance(v, np.ndarray) else v
            for k, v in compiled.params.items()
        }
        rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), params).all()
    return "\n".join(r[0] for r in rows)


def _plan_settings(conn: sa.Connection, exact: bool, ef_search: int, filtered: bool) -> None:
    if exact:
        conn.execute(sa.text("SET LOCAL enable_indexscan = off"))
        return
    # SET cannot take bind parameters; ef_search is a validated int.
    conn.execute(sa.text(f"SET LOCAL hnsw.ef_search = {int(ef_search)}"))
    if filtered:
        conn.execute(sa.text("SET LOCAL hnsw.iterative_scan = relaxed_order"))


def _check_query(space: EmbeddingSpace, vector: np.ndarray | None, k: int, ef_search: int) -> None:
    if not 1 <= k <= MAX_K:
        raise RetrievalError(f"k must be between 1 and {MAX_K}, got {k}")
    if vector is not None and vector.shape != (space.dim,):
        raise RetrievalError(
            f"query vector has shape {vector.shape}, the space holds {space.dim}-d vectors"
        )
    if not 1 <= ef_search <= 1000:
        raise RetrievalError(f"ef_search must be between 1 and 1000, got {ef_search}")


def _filtered(stmt: sa.Select, filters: Filters | None) -> sa.Select:
    """``stmt`` (over chunks, joined to documents when formats are filtered) with the filters."""
    c, d = schema.chunks, schema.documents
    filters = filters or Filters()
    if filters.sources:
        stmt = stmt.where(sa.or_(*(_source_clause(c.c.source, s) for s in filters.sources)))
    if filters.formats:
        stmt = stmt.where(d.c.format.in_(list(filters.formats)))
    if filters.doc_ids:
        stmt = stmt.where(c.c.doc_id.in_(list(filters.doc_ids)))
    if filters.meta:
        stmt = stmt.where(c.c.meta.contains(filters.meta))
    return stmt


def _search_statement(
    space: EmbeddingSpace, vector: np.ndarray, k: int, filters: Filters | None, ef_search: int
) -> sa.Select:
    _check_query(space, vector, k, ef_search)
    c, d, e = schema.chunks, schema.documents, space.table
    distance = e.c.embedding.cosine_distance(vector).label("distance")
    inner = (
        sa.select(
            c.c.chunk_id,
            c.c.doc_id,
            c.c.source,
            d.c.title,
            c.c.position,
            c.c.text,
            c.c.meta,
            c.c.context,
            distance,
        )
        .select_from(e.join(c, c.c.chunk_id == e.c.chunk_id).join(d, d.c.doc_id == c.c.doc_id))
        .order_by(distance)
        .limit(k)
    )
    # relaxed_order may return the k rows slightly out of order: sort them again outside.
    sub = _filtered(inner, filters).subquery()
    return sa.select(sub).order_by(sub.c.distance)


def _hybrid_statement(
    space: EmbeddingSpace,
    vector: np.ndarray | None,
    question: str,
    k: int,
    filters: Filters | None,
    mode: Mode,
    fusion: Fusion,
    max_per_doc: int | None,
) -> tuple[sa.Select, int]:
    """One statement: the candidate list(s) as CTEs, fused by reciprocal rank, at most
    ``max_per_doc`` per document, the k best joined to their chunks. Returns it and the number
    of candidates taken from each list."""
    _check_query(space, vector, k, DEFAULT_EF_SEARCH)
    # More candidates when diversity may drop some; never fewer than k.
    n = max(fusion.candidates, k * (3 if max_per_doc else 1))
    vec = _vector_candidates(space, vector, filters, n) if mode is not Mode.TEXT else None
    txt = _text_candidates(question, filters, fusion, n) if mode is not Mode.VECTOR else None
    pool = _capped(_fused(vec, txt, fusion).cte("fused"), max_per_doc)
    return _best_chunks(pool, space, vector, k), n


def _candidate_source(filters: Filters | None) -> Any:
    """The chunks, joined to their documents when formats are filtered."""
    c, d = schema.chunks, schema.documents
    return c.join(d, d.c.doc_id == c.c.doc_id) if filters and filters.formats else c


def _vector_candidates(
    space: EmbeddingSpace, vector: np.ndarray | None, filters: Filters | None, n: int
) -> Any:
    """CTE ``vec(chunk_id, doc_id, rank)``: the n nearest chunks, ranked by cosine distance."""
    c, e = schema.chunks, space.table
    distance = e.c.embedding.cosine_distance(vector).label("distance")
    inner = (
        sa.select(c.c.chunk_id, c.c.doc_id, distance)
        .select_from(e.join(_candidate_source(filters), c.c.chunk_id == e.c.chunk_id))
        .order_by(distance)
        .limit(n)
    )
    sub = _filtered(inner, filters).subquery("vector_candidates")
    return sa.select(
        sub.c.chunk_id,
        sub.c.doc_id,
        sa.func.row_number().over(order_by=sub.c.distance).label("rank"),
    ).cte("vec")


def _text_candidates(question: str, filters: Filters | None, fusion: Fusion, n: int) -> Any:
    """CTE ``txt(chunk_id, doc_id, text_score, rank)``: the n chunks matching the question's
    text query, ranked by ``ts_rank_cd`` (ties by chunk id)."""
    c = schema.chunks
    query = _text_query_cte(question, fusion.max_df)
    rank = sa.func.ts_rank_cd(c.c.tsv, query.c.q, fusion.normalization).label("text_score")
    inner = (
        sa.select(c.c.chunk_id, c.c.doc_id, rank)
        .select_from(_candidate_source(filters).join(query, sa.true()))
        .where(c.c.tsv.op("@@")(query.c.q))
        .order_by(rank.desc(), c.c.chunk_id)
        .limit(n)
    )
    sub = _filtered(inner, filters).subquery("text_candidates")
    return sa.select(
        sub.c.chunk_id,
        sub.c.doc_id,
        sub.c.text_score,
        sa.func.row_number().over(order_by=(sub.c.text_score.desc(), sub.c.chunk_id)).label("rank"),
    ).cte("txt")


def _null_int() -> Any:
    return sa.null().cast(sa.BigInteger)


def _null_float() -> Any:
    return sa.null().cast(sa.Float)


def _fused(vec: Any, txt: Any, fusion: Fusion) -> sa.Select:
    """(chunk_id, doc_id, vector_rank, text_rank, text_score, fused) over the candidates:
    ``fused`` is the reciprocal-rank fusion, ``w / (rrf_k + rank)`` summed over the lists a
    chunk is in (a full outer join when there are two; weight 1 when there is one)."""

    def share(weight: float, rank: Any) -> Any:
        return sa.func.coalesce(
            sa.cast(weight, sa.Float) / (fusion.rrf_k + rank), sa.cast(0.0, sa.Float)
        )

    if vec is not None and txt is not None:
        fused = share(fusion.vector_weight, vec.c.rank) + share(fusion.text_weight, txt.c.rank)
        return sa.select(
            sa.func.coalesce(vec.c.chunk_id, txt.c.chunk_id).label("chunk_id"),
            sa.func.coalesce(vec.c.doc_id, txt.c.doc_id).label("doc_id"),
            vec.c.rank.label("vector_rank"),
            txt.c.rank.label("text_rank"),
            txt.c.text_score,
            fused.label("fused"),
        ).select_from(vec.join(txt, vec.c.chunk_id == txt.c.chunk_id, full=True))
    if vec is not None:
        return sa.select(
            vec.c.chunk_id,
            vec.c.doc_id,
            vec.c.rank.label("vector_rank"),
            _null_int().label("text_rank"),
            _null_float().label("text_score"),
            share(1.0, vec.c.rank).label("fused"),
        )
    assert txt is not None
    return sa.select(
        txt.c.chunk_id,
        txt.c.doc_id,
        _null_int().label("vector_rank"),
        txt.c.rank.label("text_rank"),
        txt.c.text_score,
        share(1.0, txt.c.rank).label("fused"),
    )


def _capped(fused: Any, max_per_doc: int | None) -> Any:
    """The fused rows, keeping each document's ``max_per_doc`` best (by fused score, ties by
    chunk id); all of them when there is no cap."""
    if max_per_doc is None:
        return fused.alias("pool")
    nth = sa.func.row_number().over(
        partition_by=fused.c.doc_id, order_by=(fused.c.fused.desc(), fused.c.chunk_id)
    )
    ranked = sa.select(fused, nth.label("nth")).subquery("per_document")
    return sa.select(ranked).where(ranked.c.nth <= max_per_doc).subquery("diverse")


def _best_chunks(pool: Any, space: EmbeddingSpace, vector: np.ndarray | None, k: int) -> sa.Select:
    """The k best rows of ``pool`` by fused score (ties by chunk id), joined to their chunks,
    documents and (with a vector) their cosine distance to it."""
    c, d, e = schema.chunks, schema.documents, space.table
    distance = (
        e.c.embedding.cosine_distance(vector) if vector is not None else _null_float()
    ).label("distance")
    source = pool.join(c, c.c.chunk_id == pool.c.chunk_id).join(d, d.c.doc_id == c.c.doc_id)
    if vector is not None:
        source = source.outerjoin(e, e.c.chunk_id == c.c.chunk_id)
    return (
        sa.select(
            c.c.chunk_id,
            c.c.doc_id,
            c.c.source,
            d.c.title,
            c.c.position,
            c.c.text,
            c.c.meta,
            c.c.context,
            distance,
            pool.c.vector_rank,
            pool.c.text_rank,
            pool.c.text_score,
            pool.c.fused,
        )
        .select_from(source)
        .order_by(pool.c.fused.desc(), c.c.chunk_id)
        .limit(k)
    )


def _source_clause(column: sa.ColumnElement[str], pattern: str) -> sa.ColumnElement[bool]:
    if "*" not in pattern:
        return column == pattern
    escaped = (
        pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
    )
    return column.like(escaped, escape="\\")
