"""Top-k retrieval by cosine similarity over pgvector, with metadata filters.

Filtered queries use pgvector 0.8's iterative index scans, so a selective filter still returns
k rows instead of the few that happened to be among the index's first candidates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from refinery import schema
from serving.corpus.embedding import Embedder
from serving.corpus.vectorstore import EmbeddingSpace, VectorStore

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
    score: float  # cosine similarity in [-1, 1]; higher is closer
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RetrievalError(ValueError):
    pass


class Retriever:
    """Embeds a question with the same model that embedded the chunks and searches its space."""

    def __init__(self, store: VectorStore, embedder: Embedder, space: EmbeddingSpace | None = None):
        self.store = store
        self.embedder = embedder
        found = space or store.find_space(embedder.name)
        if found is None:
            raise RetrievalError(
                f"no embeddings for model {embedder.name!r} yet: run `refinery ingest` first"
            )
        self.space = found

    def search(
        self,
        question: str,
        k: int = 5,
        filters: Filters | None = None,
        *,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> list[Hit]:
        question = (question or "").strip()
        if not question:
            raise RetrievalError("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise RetrievalError(f"the question is longer than {MAX_QUESTION_CHARS} characters")
        vector = self.embedder.encode([question])[0]  # (dim,)
        return search_vector(self.store.engine, self.space, vector, k, filters, ef_search=ef_search)


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


def _search_statement(
    space: EmbeddingSpace, vector: np.ndarray, k: int, filters: Filters | None, ef_search: int
) -> sa.Select:
    if not 1 <= k <= MAX_K:
        raise RetrievalError(f"k must be between 1 and {MAX_K}, got {k}")
    if vector.shape != (space.dim,):
        raise RetrievalError(
            f"query vector has shape {vector.shape}, the space holds {space.dim}-d vectors"
        )
    if not 1 <= ef_search <= 1000:
        raise RetrievalError(f"ef_search must be between 1 and 1000, got {ef_search}")
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
            distance,
        )
        .select_from(e.join(c, c.c.chunk_id == e.c.chunk_id).join(d, d.c.doc_id == c.c.doc_id))
        .order_by(distance)
        .limit(k)
    )
    filters = filters or Filters()
    if filters.sources:
        inner = inner.where(sa.or_(*(_source_clause(c.c.source, s) for s in filters.sources)))
    if filters.formats:
        inner = inner.where(d.c.format.in_(list(filters.formats)))
    if filters.doc_ids:
        inner = inner.where(c.c.doc_id.in_(list(filters.doc_ids)))
    if filters.meta:
        inner = inner.where(c.c.meta.contains(filters.meta))
    # relaxed_order may return the k rows slightly out of order: sort them again outside.
    sub = inner.subquery()
    return sa.select(sub).order_by(sub.c.distance)


def _source_clause(column: sa.ColumnElement[str], pattern: str) -> sa.ColumnElement[bool]:
    if "*" not in pattern:
        return column == pattern
    escaped = (
        pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
    )
    return column.like(escaped, escape="\\")
