"""The three ingestion steps as plain functions: documents, chunks, embeddings.

Each step reads what the previous one wrote to Postgres, does only the work that changed,
and returns a small result whose fields become MLflow metrics and Dagster metadata.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from refinery.core.lineage import sha256_hex
from refinery.corpus.chunking import Chunker, ChunkingConfig
from refinery.corpus.documents import (
    DEFAULT_MAX_FILE_BYTES,
    FORMATS,
    CorpusFile,
    DocumentRejected,
    ParsedDocument,
    ParseLimits,
    Rejection,
    RejectReason,
    corpus_file,
    parse_bytes,
    read_bytes,
    scan_corpus,
)
from refinery.corpus.isolation import ParserPool
from refinery.retrieval.embedding import Embedder
from refinery.retrieval.vectorstore import EmbeddingSpace, VectorStore

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# Text → None when it is fine, or why it looks like it instructs a model (the detail recorded
# in the ledger). The default is refinery.safety.screening's document screen.
Screen = Callable[[str], str | None]
Parse = Callable[[CorpusFile, bytes], ParsedDocument]


class ImageDescriber:
    """Vectors and labels for image documents (``refinery.vision.classifier``), the model loaded at
    the first image. If it cannot load (its package missing), images are still indexed by
    their OCR text, without vector or labels, and the reason is logged once."""

    def __init__(self, models_dir: Path | None = None, limits: ParseLimits | None = None) -> None:
        self.models_dir = models_dir
        self.limits = limits or ParseLimits()
        self._model: Any = None
        self.error: str | None = None

    @property
    def model_name(self) -> str:
        from refinery.vision.classifier import MODEL_NAME

        return MODEL_NAME

    def __call__(self, data: bytes) -> Any:
        """The image's ``ImageDescription``, or None when no vision model is available."""
        from refinery.corpus.ocr import open_image

        return self.describe_image(open_image(data, self.limits))

    def describe_image(self, img: Any) -> Any:
        """The same for an image already decoded (Pillow)."""
        if self._model is None and self.error is None:
            from refinery.core.settings import Settings
            from refinery.vision.classifier import load_optional

            self._model, self.error = load_optional(
                self.models_dir or Settings.from_env().models_dir
            )
            if self.error:  # OCR text still indexes the image
                log.warning("image vectors and labels are off: %s", self.error)
        if self._model is None:
            return None
        return self._model.describe([img])[0]


# Missing chunks are fetched this many batches at a time and sorted by length (less padding).
WINDOW_BATCHES = 16


def _metrics(obj: Any) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in asdict(obj).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class EmptyCorpusError(RuntimeError):
    pass


@dataclass
class DocumentSyncResult:
    corpus: str
    corpus_hash: str
    files_seen: int = 0
    documents: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    rejected: int = 0
    suspicious: int = 0
    parser_restarts: int = 0  # workers killed at their deadline or crashed, and replaced
    bytes_read: int = 0
    seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)

    def rejection_rows(self) -> list[dict[str, str]]:
        return [
            {"file": r.source, "reason": r.reason.value, "detail": r.detail}
            for r in self.rejections
        ]

    def metrics(self) -> dict[str, float]:
        return _metrics(self)


def sync_documents(
    store: VectorStore,
    corpus_dir: Path,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    allow_empty: bool = False,
    only: Sequence[str] | None = None,
    progress: Progress | None = None,
    limits: ParseLimits | None = None,
    isolate: bool = True,
    screen: Screen | str | None = "default",
    describe: ImageDescriber | None = None,
) -> DocumentSyncResult:
    """Bring the documents table in line with the corpus folder.

    New and changed files are parsed and upserted; files whose bytes did not change are not
    parsed again; documents whose file is gone (or now unreadable) are deleted with their
    chunks and embeddings; every file that cannot be read is recorded in the ledger.

    ``only``: paths relative to the folder (what ``corpus_changes`` found); just those are
    looked at, so reacting to one new file does not read the whole corpus.

    ``limits``: what parsing one file may cost; with ``isolate`` (the default) files are parsed
    in a worker process killed at ``limits.timeout_s`` (``isolate=False`` parses in this process,
    with the limits but without the time budget). ``screen``: documents it flags are not indexed
    but recorded in the ledger as ``suspicious`` (``None``: no screen). ``describe``: gives
    image documents their vector and labels (default: EfficientNet-Lite0, loaded at the first
    image).
    """
    t0 = time.perf_counter()
    corpus_dir = Path(corpus_dir)
    corpus = str(corpus_dir.resolve())
    existing = store.document_states(corpus)
    files = _files_to_sync(corpus_dir, only)
    result = DocumentSyncResult(corpus=corpus, corpus_hash="")
    limits = limits or ParseLimits()
    screen = _resolve_screen(screen)
    describe = describe or ImageDescriber(limits=limits)
    good = _sync_files(
        store, corpus, files, existing, result, max_file_bytes, limits, isolate, screen, describe
    )
    looked_at = existing.keys() if only is None else set(only) & existing.keys()
    gone = [existing[source].doc_id for source in looked_at if source not in good]
    if only is None and not good and existing and not allow_empty:
        raise EmptyCorpusError(
            f"no readable document in {corpus_dir} ({len(result.rejections)} rejected); refusing to "
            f"delete the {len(existing)} indexed documents. Check the folder, or set allow_empty."
        )
    result.removed = store.delete_documents(gone)
    store.record_rejections(corpus, result.rejections, scope=None if only is None else list(only))
    result.rejected = len(result.rejections)
    result.suspicious = sum(r.reason is RejectReason.SUSPICIOUS for r in result.rejections)
    result.documents = len(good) if only is None else len(existing) + result.new - result.removed
    result.corpus_hash = store.corpus_hash()
    result.seconds = time.perf_counter() - t0
    _report_documents(result, progress)
    return result


def _report_documents(result: DocumentSyncResult, progress: Progress | None) -> None:
    for rej in result.rejections:
        log.warning("rejected %s: %s (%s)", rej.source, rej.reason.value, rej.detail)
    if progress:
        progress(
            f"documents: {result.documents} indexed ({result.new} new, {result.changed} changed, "
            f"{result.unchanged} unchanged), {result.removed} removed, {result.rejected} rejected"
        )


def _files_to_sync(corpus_dir: Path, only: Sequence[str] | None) -> list[CorpusFile | Rejection]:
    """Every file of the corpus, or just the ``only`` paths that still exist (as links too)."""
    if only is None:
        return list(scan_corpus(corpus_dir))
    if not corpus_dir.is_dir():
        raise NotADirectoryError(f"corpus folder {corpus_dir} does not exist")
    return [
        corpus_file(corpus_dir / source, corpus_dir)
        for source in sorted(set(only))
        if (corpus_dir / source).exists() or (corpus_dir / source).is_symlink()
    ]


def _resolve_screen(screen: Screen | str | None) -> Screen | None:
    if isinstance(screen, str):
        if screen != "default":
            raise ValueError(f"screen must be a callable, None or 'default', not {screen!r}")
        from refinery.safety.screening.documents import document_screen

        return document_screen()
    return screen


def _sync_files(
    store: VectorStore,
    corpus: str,
    files: list[CorpusFile | Rejection],
    existing: dict[str, Any],
    result: DocumentSyncResult,
    max_file_bytes: int,
    limits: ParseLimits,
    isolate: bool,
    screen: Screen | None,
    describe: ImageDescriber,
) -> set[str]:
    """Sync each file, counting into ``result``; the sources that are indexed now."""
    good: set[str] = set()
    with ParserPool(limits) as pool:  # starts its worker at the first file that needs parsing
        parse: Parse = pool.parse if isolate else (lambda f, data: parse_bytes(f, data, limits))
        for item in tqdm(files, desc="documents", unit="file", disable=None):
            result.files_seen += 1
            if isinstance(item, Rejection):
                result.rejections.append(item)
                continue
            rejection = _sync_one(
                store, corpus, item, existing, max_file_bytes, result, parse, screen, describe
            )
            if rejection is not None:
                result.rejections.append(rejection)
            else:
                good.add(item.source)
        result.parser_restarts = max(0, pool.started - 1)
    return good


def _sync_one(
    store: VectorStore,
    corpus: str,
    file: CorpusFile,
    existing: dict[str, Any],
    max_file_bytes: int,
    result: DocumentSyncResult,
    parse: Parse,
    screen: Screen | None,
    describe: ImageDescriber,
) -> Rejection | None:
    """Upsert one file if it changed; return why it was rejected, if it was."""
    try:
        data = read_bytes(file, max_file_bytes)
        result.bytes_read += len(data)
        state = existing.get(file.source)
        file_hash = sha256_hex(data)
        if state is not None and state.file_hash == file_hash:
            if not _same_time(state.modified_at, file.modified_at):  # touched, not edited
                store.touch_document(state.doc_id, file_hash, file.modified_at)
            result.unchanged += 1
            return None
        try:
            doc, seen = parse(file, data), None
        except DocumentRejected as err:
            doc, seen = labelled_photo(file, data, err, describe)
        flagged = screen(doc.text) if screen is not None else None
        if flagged is not None:
            raise DocumentRejected(RejectReason.SUSPICIOUS, flagged)
        if seen is None and doc.format == "image":
            seen = describe(data)
        if seen is not None:
            doc.meta["labels"] = [{"label": name, "p": p} for name, p in seen.labels]
    except DocumentRejected as err:
        return Rejection(file.source, err.reason, err.detail, file.size_bytes)
    if state is not None and state.content_hash == doc.content_hash:
        store.touch_document(state.doc_id, doc.file_hash, doc.modified_at)
        result.unchanged += 1
    else:
        doc_id = store.upsert_document(corpus, doc)
        if seen is not None:
            store.upsert_image_vector(
                doc_id, describe.model_name, doc.file_hash, seen.vector, seen.labels
            )
        if state is None:
            result.new += 1
        else:
            result.changed += 1
    return None


def labelled_photo(
    file: CorpusFile, data: bytes, err: DocumentRejected, describe: ImageDescriber
) -> tuple[ParsedDocument, Any]:
    """An image in which OCR found no text (a photo) is indexed by what the vision model names
    in it: its likely labels become the document's text ("Image labels: palace, bell cote").
    Re-raises ``err`` for any other rejection, and when the model names nothing likely."""
    from refinery.corpus.ocr import open_image
    from refinery.vision.classifier import LABEL_MIN_P, labels_text

    if err.reason is not RejectReason.NO_TEXT or FORMATS[file.path.suffix.lower()] != "image":
        raise err
    img = open_image(data, describe.limits)
    seen = describe.describe_image(img)
    if seen is None:
        raise DocumentRejected(err.reason, f"{err.detail}, and no vision model could name what "
                               f"it shows ({describe.error})") from err  # fmt: skip
    text = labels_text(seen.labels, with_p=False)
    if not text:
        best, p = seen.labels[0]
        raise DocumentRejected(err.reason, f"{err.detail}, and the vision model's best label "
                               f"({best}, {p:.2f}) is below {LABEL_MIN_P}") from err  # fmt: skip
    doc = ParsedDocument(
        source=file.source,
        title=Path(file.source).stem[:200],
        format="image",
        text=text,
        file_hash=sha256_hex(data),
        content_hash=sha256_hex(text),
        size_bytes=len(data),
        modified_at=file.modified_at,
        meta={
            "image": {"format": img.format, "width": img.width, "height": img.height},
            "pages": [[0, len(text)]],
        },
    )
    return doc, seen


def _same_time(a: datetime | None, b: datetime | None) -> bool:
    """Modification times equal to the millisecond (a float mtime does not round-trip exactly)."""
    return a is not None and b is not None and abs((a - b).total_seconds()) < 1e-3


@dataclass(frozen=True)
class CorpusChanges:
    """What changed in a corpus folder since the last ingestion, from file metadata only."""

    corpus: str
    changed: list[str]  # new or modified files, and new unreadable ones
    removed: list[str]  # indexed documents (or ledger entries) whose file is gone
    files: int

    @property
    def paths(self) -> list[str]:
        return sorted({*self.changed, *self.removed})

    def fingerprint(self) -> str:
        return sha256_hex("\x00".join(self.paths) + "\x00" + self.stamp)[:24]

    stamp: str = ""  # newest modification time among the changed files


def corpus_changes(store: VectorStore, corpus_dir: Path) -> CorpusChanges:
    """Compare the folder's file names, sizes and modification times with the documents table
    and the rejected-files ledger. Reads no file: stat calls and two queries."""
    corpus_dir = Path(corpus_dir)
    corpus = str(corpus_dir.resolve())
    existing = store.document_states(corpus)
    ledger = {r["path"]: r for r in store.rejections(corpus)}
    changed: list[str] = []
    seen: set[str] = set()
    newest = 0.0
    for item in scan_corpus(corpus_dir):
        seen.add(item.source)
        if isinstance(item, Rejection):
            if item.source not in ledger:
                changed.append(item.source)
            continue
        state = existing.get(item.source)
        rejected = ledger.get(item.source)
        if state is not None:
            moved = not _same_time(state.modified_at, item.modified_at)
        elif rejected is not None:  # still the file that was rejected?
            moved = (
                rejected["size_bytes"] != item.size_bytes
                or item.modified_at > rejected["last_seen"]
            )
        else:
            moved = True
        if moved:
            changed.append(item.source)
            newest = max(newest, item.modified_at.timestamp())
    removed = sorted((existing.keys() | ledger.keys()) - seen)
    return CorpusChanges(corpus, sorted(changed), removed, len(seen), stamp=f"{newest:.6f}")


@dataclass
class ChunkSyncResult:
    documents_chunked: int = 0
    documents_unchanged: int = 0
    chunks_new: int = 0
    chunks_deleted: int = 0
    chunks_total: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        return _metrics(self)


def sync_chunks(
    store: VectorStore,
    chunker: Chunker,
    *,
    progress: Progress | None = None,
) -> ChunkSyncResult:
    """Re-chunk only documents whose text or chunking config changed since their last chunking."""
    t0 = time.perf_counter()
    fingerprint = chunker.config.fingerprint(chunker.tokenizer_name)
    todo = store.documents_to_chunk(fingerprint)
    result = ChunkSyncResult()
    for doc in tqdm(todo, desc="chunks", unit="doc", disable=None):
        chunks = chunker.split(
            doc_id=doc.doc_id,
            source=doc.source,
            text=doc.text,
            format=doc.format,
            title=doc.title,
            pages=doc.meta.get("pages"),
            regions=(doc.meta.get("ocr") or {}).get("regions"),
        )
        new, deleted = store.replace_chunks(doc, chunks, fingerprint)
        result.chunks_new += new
        result.chunks_deleted += deleted
        result.documents_chunked += 1
    result.chunks_total = store.count_chunks()
    if result.documents_chunked or store.text_stats_total() != result.chunks_total:
        store.refresh_text_stats()  # the word counts full-text search weighs terms by
    result.documents_unchanged = store.count_documents() - result.documents_chunked
    result.seconds = time.perf_counter() - t0
    if progress:
        progress(
            f"chunks: {result.documents_chunked} documents re-chunked, {result.chunks_new} new and "
            f"{result.chunks_deleted} deleted chunks, {result.chunks_total} in all"
        )
    return result


@dataclass
class EmbeddingSyncResult:
    model: str
    dim: int
    space_id: str
    embedded: int = 0
    batches: int = 0
    total: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    chunks_per_second: float = 0.0

    def metrics(self) -> dict[str, float]:
        return _metrics(self)


def space_for(store: VectorStore, embedder: Embedder) -> EmbeddingSpace:
    """The embedder's space; a known space gives the dimension, so a no-change run never
    loads the model."""
    known = store.find_space(embedder.name)
    return store.ensure_space(embedder.name, known.dim if known else embedder.dim)


def sync_embeddings(
    store: VectorStore,
    embedder: Embedder,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    log_every: int = 10,
    query_export_dir: Path | None = None,
) -> EmbeddingSyncResult:
    """Embed every chunk that has no current vector in the model's space (none, or one made
    from other text or context), committing batch by batch.

    A run killed at any point leaves only whole batches behind; the next run embeds the rest.
    ``query_export_dir``: also make the ONNX export the query side embeds questions with
    (refinery.retrieval.onnx_embedding), once; a model that cannot be exported is only logged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    space = space_for(store, embedder)
    result = EmbeddingSyncResult(model=space.model, dim=space.dim, space_id=space.space_id)
    todo = store.count_missing(space)
    with tqdm(total=todo, desc="embeddings", unit="chunk", disable=None) as bar:
        while True:
            window = store.missing_embeddings(space, batch_size * WINDOW_BATCHES)
            if not window:
                break
            # Similar lengths in one batch waste less padding: sort a window of missing chunks
            # by length, then encode and commit it batch by batch.
            window.sort(key=lambda row: len(row[1]))
            for start in range(0, len(window), batch_size):
                rows = window[start : start + batch_size]
                _embed_batch(store, embedder, space, rows, batch_size, result)
                bar.update(len(rows))
                if progress and result.batches % log_every == 0:
                    progress(f"embeddings: {result.embedded}/{todo}")
    if query_export_dir is not None:
        _ensure_query_export(query_export_dir, embedder)
    result.total = store.count_chunks()
    result.seconds = time.perf_counter() - t0
    result.chunks_per_second = result.embedded / result.seconds if result.embedded else 0.0
    if progress:
        progress(
            f"embeddings: {result.embedded} new vectors in {result.seconds:.1f}s "
            f"({result.chunks_per_second:.0f} chunks/s); {result.total} chunks in space {space.space_id}"
        )
    return result


def _embed_batch(
    store: VectorStore,
    embedder: Embedder,
    space: EmbeddingSpace,
    rows: Sequence[tuple[str, str, str]],
    batch_size: int,
    result: EmbeddingSyncResult,
) -> None:
    """Encode one batch of (chunk id, text, hash) rows and commit its vectors."""
    ids, texts, hashes = (list(x) for x in zip(*rows, strict=True))
    t_enc = time.perf_counter()
    vectors = embedder.encode(texts, batch_size=batch_size)  # (n, dim)
    result.encode_seconds += time.perf_counter() - t_enc
    if vectors.shape[1] != space.dim:
        raise ValueError(
            f"model {space.model} now returns {vectors.shape[1]}-d vectors, but its space "
            f"{space.space_id} holds {space.dim}-d ones"
        )
    # Chunks deleted meanwhile by a concurrent re-chunk are skipped, not written.
    result.embedded += store.upsert_embeddings(space, ids, hashes, vectors)
    result.batches += 1


def _ensure_query_export(query_export_dir: Path, embedder: Embedder) -> None:
    from refinery.retrieval.onnx_embedding import ExportError, ensure_export, find_export

    if find_export(query_export_dir, embedder.ref) is None:
        try:
            ensure_export(query_export_dir, embedder)
        except ExportError as err:
            log.warning("no ONNX export of %s for queries: %s", embedder.name, err)


def make_chunker(config: ChunkingConfig, embedder: Embedder) -> Chunker:
    """A chunker that counts tokens with the embedding model's own tokenizer."""
    limit = embedder.ref.max_seq_length
    # +2: the [CLS]/[SEP] (or <s>/</s>) tokens the embedder adds around every chunk.
    if limit is not None and config.embedded_tokens + 2 > limit:
        context = f" + {config.context_tokens} of context" if config.contextual else ""
        raise ValueError(
            f"chunks of {config.max_tokens} tokens{context} would be truncated by {embedder.name}, "
            f"which reads at most {limit} tokens; set max_tokens <= {limit - 2 - (config.embedded_tokens - config.max_tokens)}"
        )
    return Chunker(config, embedder.tokenizer(), tokenizer_name=embedder.name)
