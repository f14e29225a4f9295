"""Ingestion: corpus files → documents → chunks → embeddings in Postgres + pgvector."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.resources import (
    EmbeddingModelResource,
    HomeResource,
    MLflowResource,
    PostgresResource,
    mlflow_metadata,
)
from refinery.core.lineage import TAG_CORPUS_HASH
from refinery.corpus.chunking import ChunkingConfig
from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings

GROUP = "ingestion"
EXPERIMENT = "refinery-ingestion"


class SourceDocumentsConfig(dg.Config):
    corpus_dir: str = Field(
        default="", description="Corpus folder; empty: REFINERY_CORPUS_DIR or the sample corpus."
    )
    max_file_mb: float = Field(
        default=20.0, gt=0, description="Files larger than this are rejected."
    )
    allow_empty: bool = Field(
        default=False, description="Allow a corpus with no readable file to empty the index."
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Only these files (relative to the corpus folder; gone ones are removed). "
        "Empty: the whole folder. The corpus sensor fills it with what changed.",
    )

    def corpus_path(self, home: HomeResource) -> Path:
        return Path(self.corpus_dir).expanduser() if self.corpus_dir else home.corpus_dir


class DocumentChunksConfig(dg.Config):
    max_tokens: int = Field(
        default=ChunkingConfig.max_tokens,
        ge=16,
        description="Chunk size in embedding-model tokens.",
    )
    overlap_tokens: int = Field(
        default=ChunkingConfig.overlap_tokens,
        ge=0,
        description="Tokens shared by neighbouring chunks.",
    )
    contextual: bool = Field(
        default=ChunkingConfig.contextual,
        description="Embed the document title and section headings in front of each chunk.",
    )


class ChunkEmbeddingsConfig(dg.Config):
    batch_size: int = Field(default=64, ge=1, le=4096, description="Chunks per encode and commit.")


def _rejections_markdown(rejections: list) -> str:
    if not rejections:
        return "No file was rejected."
    rows = ["| file | reason | detail |", "|---|---|---|"]
    for r in rejections:
        detail = r.detail.replace("|", "\\|")
        rows.append(f"| `{r.source}` | {r.reason.value} | {detail} |")
    return "\n".join(rows)


@dg.asset(
    group_name=GROUP,
    kinds={"postgres", "python"},
    description="Corpus files parsed to normalized text, one row per document with its content "
    "hash; files that cannot be read are skipped and listed in the rejected_files ledger.",
)
def source_documents(
    context: dg.AssetExecutionContext,
    config: SourceDocumentsConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult:
    corpus = config.corpus_path(home)
    params = {
        "corpus_dir": str(corpus),
        "max_file_mb": config.max_file_mb,
        "paths": len(config.paths) if config.paths else "all",
    }
    with mlflow.asset_run(context, EXPERIMENT, params=params) as run:
        result = sync_documents(
            postgres.store(),
            corpus,
            max_file_bytes=int(config.max_file_mb * 1024 * 1024),
            allow_empty=config.allow_empty,
            only=config.paths or None,
            progress=context.log.info,
        )
        run.log_metrics(result.metrics())
        run.set_tags({TAG_CORPUS_HASH: result.corpus_hash})
        run.log_dict(result.rejection_rows(), "rejected_files.json")
    counts = ("documents", "new", "changed", "unchanged", "removed", "rejected")
    return dg.MaterializeResult(
        metadata={
            "corpus": str(corpus),
            "corpus_hash": result.corpus_hash,
            **{name: getattr(result, name) for name in counts},
            "rejected_files": dg.MetadataValue.md(_rejections_markdown(result.rejections)),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(result.corpus_hash),
    )


@dg.asset_check(
    asset=source_documents,
    description="Warns when corpus files were rejected (the ledger lists each with its reason).",
)
def no_rejected_files(postgres: PostgresResource) -> dg.AssetCheckResult:
    rejections = postgres.store().rejections()
    return dg.AssetCheckResult(
        passed=not rejections,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rejected": len(rejections),
            "files": dg.MetadataValue.md(
                "\n".join(f"- `{r['path']}`: {r['reason']} ({r['detail']})" for r in rejections)
                or "none"
            ),
        },
    )


@dg.asset(
    group_name=GROUP,
    deps=[source_documents],
    kinds={"postgres", "python"},
    description="Token-aware recursive chunks with overlap; ids derived from document and text, "
    "so reruns overwrite instead of duplicating. Only changed documents are re-chunked.",
)
def document_chunks(
    context: dg.AssetExecutionContext,
    config: DocumentChunksConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    embedding_model: EmbeddingModelResource,
) -> dg.MaterializeResult:
    chunking = ChunkingConfig(
        max_tokens=config.max_tokens,
        overlap_tokens=config.overlap_tokens,
        contextual=config.contextual,
    )
    embedder = embedding_model.get()
    store = postgres.store()
    params = {**chunking.__dict__, "tokenizer": embedder.name}
    with mlflow.asset_run(context, EXPERIMENT, params=params) as run:
        result = sync_chunks(store, make_chunker(chunking, embedder), progress=context.log.info)
        corpus_hash = store.corpus_hash()
        run.log_metrics(result.metrics())
        run.set_tags({TAG_CORPUS_HASH: corpus_hash})
    return dg.MaterializeResult(
        metadata={
            "chunks": result.chunks_total,
            "documents_rechunked": result.documents_chunked,
            "chunks_new": result.chunks_new,
            "chunks_deleted": result.chunks_deleted,
            "corpus_hash": corpus_hash,
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(
            f"{corpus_hash[:32]}-{chunking.fingerprint(embedder.name)[:16]}"
        ),
    )


@dg.asset(
    group_name=GROUP,
    deps=[document_chunks],
    kinds={"pgvector", "pytorch"},
    description="One vector per chunk in the embedding model's space (HNSW, cosine). Embeds only "
    "chunks without a vector, committing batch by batch.",
)
def chunk_embeddings(
    context: dg.AssetExecutionContext,
    config: ChunkEmbeddingsConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    embedding_model: EmbeddingModelResource,
    home: HomeResource,
) -> dg.MaterializeResult:
    embedder = embedding_model.get()
    store = postgres.store()
    params = {"model": embedder.name, "device": embedder.device, "batch_size": config.batch_size}
    with mlflow.asset_run(context, EXPERIMENT, params=params) as run:
        result = sync_embeddings(
            store,
            embedder,
            batch_size=config.batch_size,
            progress=context.log.info,
            query_export_dir=home.models_dir,  # the ONNX export `refinery query` embeds with
        )
        corpus_hash = store.corpus_hash()
        run.log_metrics(result.metrics())
        run.set_tags({TAG_CORPUS_HASH: corpus_hash, "refinery.embedding_space": result.space_id})
    return dg.MaterializeResult(
        metadata={
            "model": result.model,
            "dimension": result.dim,
            "space": result.space_id,
            "embedded_now": result.embedded,
            "chunks": result.total,
            "seconds": round(result.seconds, 2),
            "chunks_per_second": round(result.chunks_per_second, 1),
            "corpus_hash": corpus_hash,
            **mlflow_metadata(run),
        },
    )


_EMBEDDING_CHECKS = {
    "every_chunk_embedded": "Every chunk has exactly one current vector of the space's dimension.",
    "no_orphan_embeddings": "No vector without its chunk.",
    "no_nan_embeddings": "No vector holds NaN.",
    "hnsw_index_exists": "The HNSW cosine index of the space exists.",
}


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=chunk_embeddings, description=desc, blocking=True)
        for name, desc in _EMBEDDING_CHECKS.items()
    ],
)
def chunk_embeddings_integrity(
    postgres: PostgresResource, embedding_model: EmbeddingModelResource
):  # no return annotation: dagster would read it as an output type
    store = postgres.store()
    space = store.find_space(embedding_model.get().name)
    if space is None:
        for name in _EMBEDDING_CHECKS:
            yield dg.AssetCheckResult(
                check_name=name, passed=False, metadata={"error": "no embedding space yet"}
            )
        return
    v = store.integrity(space)
    yield dg.AssetCheckResult(
        check_name="every_chunk_embedded",
        passed=v.missing == 0 and v.wrong_dim == 0 and v.stale == 0,
        metadata={
            "chunks": v.chunks,
            "missing": v.missing,
            "wrong_dimension": v.wrong_dim,
            "stale": v.stale,
        },
    )
    yield dg.AssetCheckResult(
        check_name="no_orphan_embeddings", passed=v.orphans == 0, metadata={"orphans": v.orphans}
    )
    yield dg.AssetCheckResult(
        check_name="no_nan_embeddings", passed=v.nan == 0, metadata={"nan": v.nan}
    )
    yield dg.AssetCheckResult(
        check_name="hnsw_index_exists", passed=v.index_exists, metadata={"index": space.index_name}
    )
