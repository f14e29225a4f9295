"""Refinery's tables (SQLAlchemy 2 Core). Created idempotently by ``create_schema``.

documents ─< chunks ─< emb_<space>   (one embedding table per embedding space: model + dimension)
                                     chunks.tsv: full-text search (generated, GIN index)
documents ─ image_vectors             (image documents: a vision model's vector and labels)
rejected_files                       (the ledger of corpus files that could not be ingested)
reviewers, review_items, ratings     (human evaluation)
traffic_log                          (what the service saw; monitoring reads it)
training_examples                    (user data awaiting approval before it may train a model)
handoffs, shared_artifacts           (what assets hand each other, and the artifacts in it)
"""

from __future__ import annotations

import hashlib
import re

import sqlalchemy as sa
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR

metadata = sa.MetaData()

documents = sa.Table(
    "documents",
    metadata,
    # sha256 of the corpus folder and the path relative to it: stable across edits.
    sa.Column("doc_id", sa.String(32), primary_key=True),
    sa.Column("corpus", sa.Text, nullable=False),  # absolute path of the corpus folder
    sa.Column("source", sa.Text, nullable=False),  # path relative to the corpus folder
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    # sha256 of the raw bytes: a file whose bytes did not change is not parsed again.
    sa.Column("file_hash", sa.String(64), nullable=False),
    # sha256 of the normalized text: what chunks and embeddings depend on.
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("n_chars", sa.Integer, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("meta", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # content_hash + chunking config that the current chunks were made from (NULL: not chunked).
    sa.Column("chunked_with", sa.String(64)),
    sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.UniqueConstraint("corpus", "source", name="documents_corpus_source_key"),
)

# Full-text search over chunks: the text, and its context (title, headings) at a lower weight.
# A stored generated column, so every insert and update (upserts included) keeps it in step.
# 'english' stems and drops stop words; the query side uses the same configuration.
TEXT_SEARCH_CONFIG = "english"
_TSV_EXPRESSION = (
    f"setweight(to_tsvector('{TEXT_SEARCH_CONFIG}', context), 'B') || "
    f"setweight(to_tsvector('{TEXT_SEARCH_CONFIG}', text), 'A')"
)

chunks = sa.Table(
    "chunks",
    metadata,
    # Derived from the document id and the chunk's text (see refinery.corpus.chunking.chunk_id).
    sa.Column("chunk_id", sa.String(32), primary_key=True),
    sa.Column(
        "doc_id",
        sa.String(32),
        sa.ForeignKey("documents.doc_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("text", sa.Text, nullable=False),  # clean: what prompts and people see
    # Document title and the headings above the chunk ("Title › Section › Subsection"): put in
    # front of the text when it is embedded (refinery.corpus.chunking.embedding_text).
    sa.Column("context", sa.Text, nullable=False, server_default=""),
    # sha256 of what was embedded (context + text): a vector whose hash differs is stale.
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("token_count", sa.Integer, nullable=False),
    sa.Column("char_start", sa.Integer, nullable=False),
    sa.Column("char_end", sa.Integer, nullable=False),
    sa.Column("meta", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("tsv", TSVECTOR, sa.Computed(_TSV_EXPRESSION, persisted=True)),
    sa.Index("chunks_tsv_gin", "tsv", postgresql_using="gin"),
)

# How many chunks hold each lexeme (Postgres ts_stat over chunks.tsv), refreshed after chunking;
# the row with the empty lexeme holds the number of chunks. Full-text queries use it to leave
# out words that are in too many chunks to tell them apart (an IDF cut; see retrieval.py).
lexeme_stats = sa.Table(
    "lexeme_stats",
    metadata,
    sa.Column("lexeme", sa.Text, primary_key=True),
    sa.Column("ndoc", sa.Integer, nullable=False),
)

# Image documents in their own embedding space (a vision model's pooled features; not
# comparable with text vectors), with the model's top labels. One row per image document.
IMAGE_VECTOR_DIM = 1280
image_vectors = sa.Table(
    "image_vectors",
    metadata,
    sa.Column(
        "doc_id",
        sa.String(32),
        sa.ForeignKey("documents.doc_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("file_hash", sa.String(64), nullable=False),  # the bytes that were described
    sa.Column("embedding", Vector(IMAGE_VECTOR_DIM), nullable=False),
    sa.Column("labels", JSONB, nullable=False),  # [{"label", "p"}], most likely first
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

rejected_files = sa.Table(
    "rejected_files",
    metadata,
    sa.Column("corpus", sa.Text, primary_key=True),
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column(
        "first_seen", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "last_seen", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

embedding_spaces = sa.Table(
    "embedding_spaces",
    metadata,
    sa.Column("space_id", sa.String(64), primary_key=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("table_name", sa.String(63), nullable=False, unique=True),
    sa.Column("model_revision", sa.Text),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "last_used_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

# Human evaluation: reviewers (token hashes, never tokens), a blind queue, their ratings.
reviewers = sa.Table(
    "reviewers",
    metadata,
    sa.Column("reviewer_id", sa.String(64), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

review_items = sa.Table(
    "review_items",
    metadata,
    sa.Column("item_id", sa.String(32), primary_key=True),
    sa.Column("trace_id", sa.Text, nullable=False, unique=True),
    sa.Column("model", sa.Text, nullable=False),  # "name/version": never shown to reviewers
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("sources", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("order_key", sa.String(32), nullable=False, index=True),  # random: interleaves models
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

ratings = sa.Table(
    "ratings",
    metadata,
    sa.Column(
        "item_id",
        sa.String(32),
        sa.ForeignKey("review_items.item_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column(
        "reviewer_id", sa.String(64), sa.ForeignKey("reviewers.reviewer_id"), primary_key=True
    ),
    sa.Column(
        "rating", sa.SmallInteger, sa.CheckConstraint("rating BETWEEN 1 AND 5"), nullable=False
    ),
    sa.Column("comment", sa.Text, nullable=False, server_default=""),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

# What the service saw: one row per sampled request (serving/traffic.py writes it off the
# request path). Prompt and answer are NULL when the privacy setting keeps only their hashes.
traffic_log = sa.Table(
    "traffic_log",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),  # idempotent re-inserts
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("endpoint", sa.String(16), nullable=False),
    sa.Column("model", sa.Text, nullable=False),  # "name/version (variant)" that answered
    sa.Column("status", sa.SmallInteger, nullable=False),
    sa.Column("prompt", sa.Text),
    sa.Column("answer", sa.Text),
    sa.Column("prompt_sha256", sa.String(64), nullable=False),
    sa.Column("answer_sha256", sa.String(64)),
    sa.Column("prompt_chars", sa.Integer, nullable=False),
    sa.Column("answer_chars", sa.Integer, nullable=False),
    sa.Column("retrieval_scores", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("top_score", sa.Float),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False),
    sa.Column("guard", sa.String(16), nullable=False),  # passed | blocked | off | cached
    # The chunks a RAG answer was given: [{chunk_id, source, score}] (``refinery explain``).
    sa.Column("sources", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
)

# Training examples from users (feedback, logged conversations). They enter a training set only
# once a reviewer approved them (the poisoning guard); `source` says where each came from.
training_examples = sa.Table(
    "training_examples",
    metadata,
    sa.Column("example_id", sa.String(32), primary_key=True),  # hash of prompt + answer
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),  # e.g. "traffic:<request_id>", "feedback:<file>"
    sa.Column("submitted_by", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending", index=True),
    sa.Column("reviewed_by", sa.Text),
    sa.Column("reviewed_at", sa.DateTime(timezone=True)),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.CheckConstraint(
        "status IN ('pending', 'approved', 'rejected')", name="training_examples_status"
    ),
)

# What assets hand each other (assets/handoff.py): one row per asset and Dagster run, read by
# any run on any machine. ``artifacts``: the value's local-path fields, published to MLflow
# (field -> sha256, uri, name; refinery/core/artifacts.py). ``seq`` orders "latest".
handoffs = sa.Table(
    "handoffs",
    metadata,
    sa.Column("asset", sa.Text, primary_key=True),
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False, unique=True),
    sa.Column("type", sa.Text, nullable=False),
    # JSON text, not JSONB: a value may hold NaN (a mean of no ratings), which JSONB refuses.
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("artifacts", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

# Artifacts published for other runs, by content: each is uploaded to MLflow once.
shared_artifacts = sa.Table(
    "shared_artifacts",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)

# HNSW build parameters; pgvector's defaults, which the retrieval benchmark measured against exact search.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64

# One advisory-lock key for schema changes, so that two processes never race on CREATE.
_SCHEMA_LOCK = 0x5EF1_7E57


def space_id(model: str, dim: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")[-40:]
    digest = hashlib.sha256(f"{model}\x00{dim}".encode()).hexdigest()[:10]
    return f"{slug}_{dim}_{digest}"


def embedding_table_name(model: str, dim: int) -> str:
    return "emb_" + hashlib.sha256(f"{model}\x00{dim}".encode()).hexdigest()[:16]


def embedding_table(name: str, dim: int, md: sa.MetaData | None = None) -> sa.Table:
    """The table of one embedding space: one row per chunk, deleted with its chunk."""
    md = md if md is not None else sa.MetaData()
    if name in md.tables:
        return md.tables[name]
    return sa.Table(
        name,
        md,
        sa.Column(
            "chunk_id",
            sa.String(32),
            sa.ForeignKey(chunks.c.chunk_id, ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("embedding", Vector(dim), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Index(
            f"{name}_hnsw",
            "embedding",
            postgresql_using="hnsw",
            postgresql_with={"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION},
            postgresql_ops={"embedding": "vector_cosine_ops"},
        ),
    )


def create_schema(engine: sa.Engine) -> None:
    """Create the extension and the base tables if they are missing (safe to call concurrently)."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
        metadata.create_all(conn, checkfirst=True)
        _upgrade(conn)


def _upgrade(conn: sa.Connection) -> None:
    """Columns added since a store was created (create_all leaves existing tables alone)."""
    conn.execute(
        sa.text("ALTER TABLE chunks ADD COLUMN IF NOT EXISTS context text NOT NULL DEFAULT ''")
    )
    # The expression is a constant of this module (no user input).
    conn.execute(
        sa.text(
            "ALTER TABLE chunks ADD COLUMN IF NOT EXISTS tsv tsvector "
            f"GENERATED ALWAYS AS ({_TSV_EXPRESSION}) STORED"
        )
    )
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS chunks_tsv_gin ON chunks USING gin (tsv)"))
    conn.execute(
        sa.text(
            "ALTER TABLE traffic_log ADD COLUMN IF NOT EXISTS sources jsonb NOT NULL "
            "DEFAULT '[]'::jsonb"
        )
    )


def create_embedding_table(engine: sa.Engine, name: str, dim: int) -> sa.Table:
    table = embedding_table(name, dim)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
        table.create(conn, checkfirst=True)
    return table
