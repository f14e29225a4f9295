"""Documents, chunks and embeddings in Postgres + pgvector (SQLAlchemy 2 Core, parameterized).

Writes are upserts keyed by stable ids, so a rerun or a backfill overwrites instead of
duplicating; embeddings commit batch by batch, so a run killed halfway resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from refinery.core import schema
from refinery.core.lineage import combined_hash, sha256_hex
from refinery.corpus.chunking import Chunk, embedding_text
from refinery.corpus.documents import ParsedDocument, Rejection, document_id


@dataclass(frozen=True)
class EmbeddingSpace:
    """The vectors of one embedding model: its own table, dimension and HNSW index."""

    space_id: str
    model: str
    dim: int
    table_name: str

    @property
    def table(self) -> sa.Table:
        return schema.embedding_table(self.table_name, self.dim, _SPACE_METADATA)

    @property
    def index_name(self) -> str:
        return f"{self.table_name}_hnsw"


_SPACE_METADATA = sa.MetaData()


@dataclass(frozen=True)
class DocumentState:
    doc_id: str
    file_hash: str
    content_hash: str
    modified_at: datetime | None = None


@dataclass(frozen=True)
class DocumentToChunk:
    doc_id: str
    source: str
    title: str
    format: str
    text: str
    content_hash: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class Integrity:
    chunks: int
    embedded: int
    missing: int
    orphans: int
    wrong_dim: int
    nan: int
    stale: int
    index_exists: bool


def _needs_vector(c: sa.Table, e: sa.Table) -> sa.ColumnElement[bool]:
    return sa.or_(e.c.chunk_id.is_(None), e.c.content_hash != c.c.content_hash)


def now() -> datetime:
    return datetime.now(tz=UTC)


# Columns an existing chunk (same id: same document and text) takes from the new chunking; its
# id, text and embeddings stay.
_CHUNK_UPDATED = (
    "position",
    "source",
    "context",
    "content_hash",
    "char_start",
    "char_end",
    "meta",
    "token_count",
    "updated_at",
)


def _chunk_upsert(chunks: Sequence[Chunk]) -> Any:
    """INSERT … ON CONFLICT DO UPDATE of ``chunks`` (not empty)."""
    c = schema.chunks
    rows = [
        {
            "chunk_id": ch.chunk_id,
            "doc_id": ch.doc_id,
            "source": ch.source,
            "position": ch.position,
            "text": ch.text,
            "context": ch.context,
            "content_hash": ch.content_hash,
            "token_count": ch.token_count,
            "char_start": ch.char_start,
            "char_end": ch.char_end,
            "meta": ch.meta,
            "updated_at": now(),
        }
        for ch in chunks
    ]
    stmt = insert(c).values(rows)
    return stmt.on_conflict_do_update(
        index_elements=[c.c.chunk_id], set_={k: stmt.excluded[k] for k in _CHUNK_UPDATED}
    )


class VectorStore:
    def __init__(self, engine: sa.Engine):
        self.engine = engine

    # ---- schema -----------------------------------------------------------------------------

    def create_schema(self) -> None:
        schema.create_schema(self.engine)

    # ---- documents --------------------------------------------------------------------------

    def document_states(self, corpus: str) -> dict[str, DocumentState]:
        d = schema.documents
        stmt = sa.select(
            d.c.source, d.c.doc_id, d.c.file_hash, d.c.content_hash, d.c.modified_at
        ).where(d.c.corpus == corpus)
        with self.engine.connect() as conn:
            return {
                r.source: DocumentState(r.doc_id, r.file_hash, r.content_hash, r.modified_at)
                for r in conn.execute(stmt)
            }

    def upsert_document(self, corpus: str, doc: ParsedDocument) -> str:
        d = schema.documents
        doc_id = document_id(corpus, doc.source)
        values = {
            "doc_id": doc_id,
            "corpus": corpus,
            "source": doc.source,
            "title": doc.title,
            "format": doc.format,
            "file_hash": doc.file_hash,
            "content_hash": doc.content_hash,
            "text": doc.text,
            "n_chars": len(doc.text),
            "size_bytes": doc.size_bytes,
            "meta": doc.meta,
            "modified_at": doc.modified_at,
            "updated_at": now(),
        }
        stmt = insert(d).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[d.c.doc_id],
            set_={k: stmt.excluded[k] for k in values if k not in ("doc_id", "corpus", "source")},
        )
        with self.engine.begin() as conn:
            # ON CONFLICT arbitrates on doc_id only: a concurrent insert of the same document
            # would still trip the (corpus, source) key. Two runs write one document in turn.
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": doc_id}
            )
            conn.execute(stmt)
        return doc_id

    def upsert_image_vector(
        self, doc_id: str, model: str, file_hash: str, vector: Any, labels: list[tuple[str, float]]
    ) -> None:
        """An image document's vector and labels (replacing what an older version had)."""
        t = schema.image_vectors
        values = {
            "doc_id": doc_id, "model": model, "file_hash": file_hash,
            "embedding": [float(x) for x in vector],
            "labels": [{"label": name, "p": p} for name, p in labels], "updated_at": now(),
        }  # fmt: skip
        stmt = insert(t).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.doc_id], set_={k: stmt.excluded[k] for k in values if k != "doc_id"}
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def similar_images(self, vector: Any, k: int = 5) -> list[dict[str, Any]]:
        """Image documents nearest to ``vector`` (cosine), with their labels."""
        t, d = schema.image_vectors, schema.documents
        distance = t.c.embedding.cosine_distance([float(x) for x in vector])
        stmt = (
            sa.select(d.c.doc_id, d.c.source, t.c.labels, (1 - distance).label("score"))
            .join(d, d.c.doc_id == t.c.doc_id)
            .order_by(distance)
            .limit(k)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def image_vector_count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(schema.image_vectors)
                ).scalar_one()
            )

    def touch_document(self, doc_id: str, file_hash: str, modified_at: datetime) -> None:
        """Same text, different bytes (re-saved, metadata edited): record the new file hash."""
        d = schema.documents
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(d)
                .where(d.c.doc_id == doc_id)
                .values(file_hash=file_hash, modified_at=modified_at, updated_at=now())
            )

    def delete_documents(self, doc_ids: Sequence[str]) -> int:
        """Delete documents with their chunks and embeddings (ON DELETE CASCADE)."""
        if not doc_ids:
            return 0
        d = schema.documents
        with self.engine.begin() as conn:
            return conn.execute(sa.delete(d).where(d.c.doc_id.in_(list(doc_ids)))).rowcount

    def record_rejections(
        self, corpus: str, rejections: Sequence[Rejection], scope: Sequence[str] | None = None
    ) -> None:
        """The ledger holds this corpus's currently rejected files: fixed files leave it.
        With ``scope``, only those paths were looked at: other entries stay."""
        r = schema.rejected_files
        with self.engine.begin() as conn:
            current = [x.source for x in rejections]
            stale = sa.delete(r).where(r.c.corpus == corpus, r.c.path.not_in(current))
            if scope is not None:
                stale = stale.where(r.c.path.in_(list(scope)))
            conn.execute(stale)
            for x in rejections:
                stmt = insert(r).values(
                    corpus=corpus,
                    path=x.source,
                    reason=x.reason.value,
                    detail=x.detail,
                    size_bytes=x.size_bytes,
                    last_seen=now(),
                )
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[r.c.corpus, r.c.path],
                        set_={
                            "reason": stmt.excluded.reason,
                            "detail": stmt.excluded.detail,
                            "size_bytes": stmt.excluded.size_bytes,
                            "last_seen": stmt.excluded.last_seen,
                        },
                    )
                )

    def rejections(self, corpus: str | None = None) -> list[dict[str, Any]]:
        r = schema.rejected_files
        stmt = sa.select(
            r.c.corpus, r.c.path, r.c.reason, r.c.detail, r.c.size_bytes, r.c.last_seen
        ).order_by(r.c.path)
        if corpus is not None:
            stmt = stmt.where(r.c.corpus == corpus)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def corpus_hash(self) -> str:
        """The data version of the index: a hash of every document's (source, content hash).

        Independent of where the corpus folder lives, so the same files hash the same anywhere.
        """
        d = schema.documents
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(d.c.source, d.c.content_hash))
            return combined_hash((r.source, r.content_hash) for r in rows)

    # ---- chunks -----------------------------------------------------------------------------

    @staticmethod
    def chunk_stamp(content_hash: str, chunking_fingerprint: str) -> str:
        return sha256_hex(f"{content_hash}\x00{chunking_fingerprint}")

    def documents_to_chunk(self, chunking_fingerprint: str) -> list[DocumentToChunk]:
        """Documents whose chunks were made from other text or another chunking config."""
        d = schema.documents
        # chunk_stamp computed by Postgres, so that only the documents to re-chunk (not every
        # document's text) leave the database: reacting to one new file stays cheap at 10k.
        stamp = sa.func.encode(
            sa.func.sha256(
                sa.func.convert_to(d.c.content_hash, "UTF8")
                .op("||")(sa.literal_column("'\\x00'::bytea"))
                .op("||")(sa.func.convert_to(chunking_fingerprint, "UTF8"))
            ),
            "hex",
        )
        stmt = (
            sa.select(
                d.c.doc_id, d.c.source, d.c.title, d.c.format, d.c.text, d.c.content_hash, d.c.meta
            )
            .where(d.c.chunked_with.is_distinct_from(stamp))
            .order_by(d.c.source)
        )
        with self.engine.connect() as conn:
            return [
                DocumentToChunk(
                    r.doc_id, r.source, r.title, r.format, r.text, r.content_hash, r.meta
                )
                for r in conn.execute(stmt)
            ]

    def replace_chunks(
        self, doc: DocumentToChunk, chunks: Sequence[Chunk], chunking_fingerprint: str
    ) -> tuple[int, int]:
        """Make ``chunks`` the document's chunks in one transaction; return (new, deleted).

        Chunks whose id (document + text) already exists keep their row and their embeddings.
        """
        c, d = schema.chunks, schema.documents
        ids = [ch.chunk_id for ch in chunks]
        with self.engine.begin() as conn:
            # Lock the document row: two concurrent runs re-chunk a document one after the other.
            conn.execute(sa.select(d.c.doc_id).where(d.c.doc_id == doc.doc_id).with_for_update())
            existing = set(
                conn.execute(sa.select(c.c.chunk_id).where(c.c.doc_id == doc.doc_id)).scalars()
            )
            deleted = conn.execute(
                sa.delete(c).where(c.c.doc_id == doc.doc_id, c.c.chunk_id.not_in(ids))
            ).rowcount
            if chunks:
                conn.execute(_chunk_upsert(chunks))
            conn.execute(
                sa.update(d)
                .where(d.c.doc_id == doc.doc_id)
                .values(chunked_with=self.chunk_stamp(doc.content_hash, chunking_fingerprint))
            )
        return len(set(ids) - existing), deleted

    def refresh_text_stats(self) -> int:
        """Recount how many chunks hold each lexeme (``schema.lexeme_stats``) in one
        transaction; returns the number of lexemes. Two ingests that finish together recount
        one after the other: the table lock (which readers pass) makes the second one's delete
        see the first one's rows, where otherwise both would insert every lexeme."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("LOCK TABLE lexeme_stats IN SHARE ROW EXCLUSIVE MODE"))
            conn.execute(sa.delete(schema.lexeme_stats))
            conn.execute(
                sa.text(
                    "INSERT INTO lexeme_stats (lexeme, ndoc) "
                    "SELECT word, ndoc FROM ts_stat('SELECT tsv FROM chunks WHERE tsv IS NOT NULL') "
                    "UNION ALL SELECT '', count(*) FROM chunks"
                )
            )
            return (
                conn.execute(
                    sa.select(sa.func.count()).select_from(schema.lexeme_stats)
                ).scalar_one()
                - 1
            )

    def text_stats_total(self) -> int | None:
        """The chunk count ``lexeme_stats`` was made from (None: never made)."""
        s = schema.lexeme_stats
        with self.engine.connect() as conn:
            return conn.execute(sa.select(s.c.ndoc).where(s.c.lexeme == "")).scalar_one_or_none()

    def count_chunks(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(schema.chunks)).scalar_one()

    def count_documents(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(schema.documents)
            ).scalar_one()

    # ---- embedding spaces -------------------------------------------------------------------

    def find_space(self, model: str) -> EmbeddingSpace | None:
        s = schema.embedding_spaces
        stmt = sa.select(s).where(s.c.model == model).order_by(s.c.last_used_at.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return EmbeddingSpace(row.space_id, row.model, row.dim, row.table_name) if row else None

    def latest_space(self) -> EmbeddingSpace | None:
        s = schema.embedding_spaces
        stmt = sa.select(s).order_by(s.c.last_used_at.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return EmbeddingSpace(row.space_id, row.model, row.dim, row.table_name) if row else None

    def ensure_space(self, model: str, dim: int) -> EmbeddingSpace:
        """The space for (model, dim), created with its table and HNSW index when new.

        A model switch gets a new space (its own table, its own dimension); the old space's
        vectors stay until pruned, so switching back costs nothing.
        """
        s = schema.embedding_spaces
        space = EmbeddingSpace(
            schema.space_id(model, dim), model, dim, schema.embedding_table_name(model, dim)
        )
        schema.create_embedding_table(self.engine, space.table_name, dim)
        stmt = insert(s).values(
            space_id=space.space_id,
            model=model,
            dim=dim,
            table_name=space.table_name,
            last_used_at=now(),
        )
        with self.engine.begin() as conn:
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[s.c.space_id], set_={"last_used_at": now()}
                )
            )
        return space

    def missing_embeddings(self, space: EmbeddingSpace, limit: int) -> list[tuple[str, str, str]]:
        """(chunk_id, embedded text, content_hash) of chunks with no current vector in
        ``space`` (none, or one made from another text or context), in id order."""
        c, e = schema.chunks, space.table
        stmt = (
            sa.select(c.c.chunk_id, c.c.context, c.c.text, c.c.content_hash)
            .select_from(c.outerjoin(e, e.c.chunk_id == c.c.chunk_id))
            .where(_needs_vector(c, e))
            .order_by(c.c.chunk_id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                (r.chunk_id, embedding_text(r.context, r.text), r.content_hash)
                for r in conn.execute(stmt)
            ]

    def count_missing(self, space: EmbeddingSpace) -> int:
        c, e = schema.chunks, space.table
        stmt = (
            sa.select(sa.func.count())
            .select_from(c.outerjoin(e, e.c.chunk_id == c.c.chunk_id))
            .where(_needs_vector(c, e))
        )
        with self.engine.connect() as conn:
            return conn.execute(stmt).scalar_one()

    def upsert_embeddings(
        self,
        space: EmbeddingSpace,
        chunk_ids: Sequence[str],
        hashes: Sequence[str],
        vectors: np.ndarray,
    ) -> int:
        """Write one batch in one transaction. ``vectors``: (n, dim) float32."""
        if vectors.shape != (len(chunk_ids), space.dim):
            raise ValueError(
                f"expected vectors of shape ({len(chunk_ids)}, {space.dim}), got {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            bad = [
                cid
                for cid, row in zip(chunk_ids, vectors, strict=True)
                if not np.isfinite(row).all()
            ]
            raise ValueError(f"embedding model returned NaN/inf for chunks {bad[:5]}")
        e = space.table
        with self.engine.begin() as conn:
            # A chunk deleted meanwhile (a concurrent re-chunk) would break the foreign key: skip it.
            live = set(
                conn.execute(
                    sa.select(schema.chunks.c.chunk_id).where(
                        schema.chunks.c.chunk_id.in_(list(chunk_ids))
                    )
                ).scalars()
            )
            rows = [
                {"chunk_id": cid, "embedding": vec, "content_hash": h}
                for cid, h, vec in zip(chunk_ids, hashes, vectors, strict=True)
                if cid in live
            ]
            if rows:
                stmt = insert(e).values(rows)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[e.c.chunk_id],
                        set_={
                            "embedding": stmt.excluded.embedding,
                            "content_hash": stmt.excluded.content_hash,
                        },
                    )
                )
        return len(rows)

    def integrity(self, space: EmbeddingSpace) -> Integrity:
        c, e = schema.chunks, space.table
        q = {
            "chunks": sa.select(sa.func.count()).select_from(c),
            "embedded": sa.select(sa.func.count()).select_from(
                e.join(c, e.c.chunk_id == c.c.chunk_id)
            ),
            "orphans": sa.select(sa.func.count())
            .select_from(e.outerjoin(c, e.c.chunk_id == c.c.chunk_id))
            .where(c.c.chunk_id.is_(None)),
            "wrong_dim": sa.select(sa.func.count())
            .select_from(e)
            .where(sa.func.vector_dims(e.c.embedding) != space.dim),
            "nan": sa.select(sa.func.count())
            .select_from(e)
            .where(
                sa.literal_column("'NaN'::real").op("=")(
                    sa.func.any(sa.cast(e.c.embedding, sa.ARRAY(sa.REAL)))
                )
            ),
            "stale": sa.select(sa.func.count())
            .select_from(e.join(c, e.c.chunk_id == c.c.chunk_id))
            .where(e.c.content_hash != c.c.content_hash),
            "index_exists": sa.select(sa.func.count())
            .select_from(sa.table("pg_indexes", sa.column("indexname"), sa.column("indexdef")))
            .where(
                sa.column("indexname") == space.index_name,
                sa.column("indexdef").like("%USING hnsw%vector_cosine_ops%"),
            ),
        }
        with self.engine.connect() as conn:
            v = {k: conn.execute(stmt).scalar_one() for k, stmt in q.items()}
        return Integrity(
            chunks=v["chunks"],
            embedded=v["embedded"],
            missing=v["chunks"] - v["embedded"],
            orphans=v["orphans"],
            wrong_dim=v["wrong_dim"],
            nan=v["nan"],
            stale=v["stale"],
            index_exists=v["index_exists"] > 0,
        )
