"""The ingestion steps against the real embedded Postgres + pgvector and the real MiniLM model."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from refinery.core import schema
from refinery.corpus.chunking import ChunkingConfig
from refinery.corpus.documents import RejectReason
from refinery.ingestion.sync import (
    EmptyCorpusError,
    make_chunker,
    sync_chunks,
    sync_documents,
    sync_embeddings,
)
from refinery.retrieval.search import Filters, Retriever

pytestmark = pytest.mark.integration


SMALL_CHUNKS = ChunkingConfig(max_tokens=120, overlap_tokens=16)


def ingest(store, corpus, embedder, config=SMALL_CHUNKS):
    docs = sync_documents(store, corpus)
    chunks = sync_chunks(store, make_chunker(config, embedder))
    vectors = sync_embeddings(store, embedder, batch_size=16)
    return docs, chunks, vectors


def embedded_ids(store, embedder) -> dict[str, str]:
    space = store.find_space(embedder.name)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(space.table.c.chunk_id, space.table.c.created_at))
        return {r.chunk_id: str(r.created_at) for r in rows}


def test_first_run_indexes_everything_and_rerun_does_nothing(store, small_corpus, embedder):
    docs, chunks, vectors = ingest(store, small_corpus, embedder)
    assert (docs.documents, docs.new, docs.rejected) == (6, 6, 0)
    assert chunks.chunks_total == vectors.embedded == vectors.total > 20
    integrity = store.integrity(store.find_space(embedder.name))
    assert integrity.missing == integrity.orphans == integrity.nan == integrity.stale == 0
    assert integrity.index_exists

    before = embedded_ids(store, embedder)
    docs2, chunks2, vectors2 = ingest(store, small_corpus, embedder)
    assert (docs2.unchanged, docs2.new, docs2.changed, docs2.removed) == (6, 0, 0, 0)
    assert chunks2.documents_chunked == 0 and vectors2.embedded == 0
    assert embedded_ids(store, embedder) == before  # nothing rewritten
    assert docs2.corpus_hash == docs.corpus_hash


def test_editing_one_document_reembeds_only_its_changed_chunks(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    before = embedded_ids(store, embedder)
    target = small_corpus / "queen-mating-flight.txt"
    target.write_text(
        target.read_text() + "\n\nA late note: queens mate with twelve to twenty drones.\n"
    )
    docs, chunks, vectors = ingest(store, small_corpus, embedder)
    assert (docs.changed, docs.unchanged) == (1, 5)
    assert chunks.documents_chunked == 1
    after = embedded_ids(store, embedder)
    new_ids = set(after) - set(before)
    assert 1 <= len(new_ids) <= 2 and vectors.embedded == len(new_ids)
    # Every other vector is the very same row as before.
    assert all(after[k] == v for k, v in before.items() if k in after)
    c = schema.chunks
    with store.engine.connect() as conn:
        sources = set(
            conn.execute(sa.select(c.c.source).where(c.c.chunk_id.in_(new_ids))).scalars()
        )
    assert sources == {"queen-mating-flight.txt"}


def test_touching_a_file_without_changing_its_text_reembeds_nothing(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    target = small_corpus / "varroa-mite-monitoring-and-treatment.md"
    target.write_text(target.read_text().replace("\n", "\r\n") + "\n\n\n")  # new bytes, same text
    docs, chunks, vectors = ingest(store, small_corpus, embedder)
    assert docs.changed == 0 and docs.unchanged == 6
    assert chunks.documents_chunked == 0 and vectors.embedded == 0


def test_removed_document_takes_its_chunks_and_vectors_along(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    (small_corpus / "siting-an-apiary.pdf").unlink()
    docs, chunks, _ = ingest(store, small_corpus, embedder)
    assert docs.removed == 1 and docs.documents == 5
    integrity = store.integrity(store.find_space(embedder.name))
    assert integrity.orphans == 0 and integrity.missing == 0
    c = schema.chunks
    with store.engine.connect() as conn:
        n = conn.execute(
            sa.select(sa.func.count()).where(c.c.source == "siting-an-apiary.pdf")
        ).scalar_one()
    assert n == 0 and chunks.chunks_total == integrity.embedded


def test_an_emptied_corpus_does_not_wipe_the_index_unless_allowed(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    for f in small_corpus.iterdir():
        f.unlink()
    with pytest.raises(EmptyCorpusError, match="refusing to delete the 6 indexed documents"):
        sync_documents(store, small_corpus)
    assert store.count_documents() == 6
    assert sync_documents(store, small_corpus, allow_empty=True).removed == 6


def test_changing_the_chunk_size_rechunks_and_reembeds(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    n_small = store.count_chunks()
    _docs, chunks, vectors = ingest(
        store, small_corpus, embedder, ChunkingConfig(max_tokens=200, overlap_tokens=16)
    )
    assert chunks.documents_chunked == 6 and store.count_chunks() < n_small
    assert vectors.embedded > 0
    assert store.integrity(store.find_space(embedder.name)).missing == 0


def test_switching_embedding_model_gets_its_own_space(store, small_corpus, embedder, tmp_path):
    """A second real model with another dimension: MiniLM with a 64-d projection on top."""
    from sentence_transformers import SentenceTransformer, models

    from refinery.retrieval.embedding import Embedder

    base = SentenceTransformer(embedder.ref.location, device="cpu")
    dense = models.Dense(in_features=384, out_features=64)
    small = SentenceTransformer(modules=[*base, dense], device="cpu")
    small.save(str(tmp_path / "minilm-64"))
    ingest(store, small_corpus, embedder)
    other = Embedder(str(tmp_path / "minilm-64"))
    _, _, vectors = ingest(store, small_corpus, other)
    assert other.dim == 64 and vectors.dim == 64 and vectors.embedded == vectors.total
    spaces = {store.find_space(embedder.name).dim, store.find_space(other.name).dim}
    assert spaces == {384, 64}
    hits = Retriever(store, other).search("varroa mites", k=3)
    assert len(hits) == 3


def test_corpus_with_subfolders_and_a_second_corpus(store, small_corpus, embedder, tmp_path):
    second = tmp_path / "second"
    (second / "notes").mkdir(parents=True)
    (second / "notes" / "a.md").write_text(
        "# Smoker fuel\n\nPine needles and burlap make cool smoke."
    )
    ingest(store, small_corpus, embedder)
    docs = sync_documents(store, second)
    assert docs.documents == 1 and docs.removed == 0  # the first corpus is untouched
    assert store.count_documents() == 7
    sync_chunks(store, make_chunker(ChunkingConfig(max_tokens=120, overlap_tokens=16), embedder))
    sync_embeddings(store, embedder)
    hits = Retriever(store, embedder).search("what burns in a smoker", k=1)
    assert hits[0].source == "notes/a.md"


def test_retrieval_finds_the_answering_document(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    retriever = Retriever(store, embedder)
    hits = retriever.search("How often should I check for varroa mites with an alcohol wash?", k=5)
    assert hits[0].source == "varroa-mite-monitoring-and-treatment.md"
    assert all(-1 <= h.score <= 1 for h in hits)
    # the default is hybrid search: hits come in fused order (vector and full-text ranks)
    assert [h.fused for h in hits] == sorted((h.fused for h in hits), reverse=True)
    only_pdf = retriever.search("varroa mites", k=4, filters=Filters(formats=("pdf",)))
    assert len(only_pdf) == 4 and {h.source.rsplit(".", 1)[1] for h in only_pdf} == {"pdf"}
    pages = retriever.search(
        "apiary site", k=3, filters=Filters(sources=("siting-*",), meta={"pages": [2]})
    )
    assert pages and all(h.source == "siting-an-apiary.pdf" and 2 in h.meta["pages"] for h in pages)


def test_selective_filters_still_return_k_rows(store):
    """Iterative index scans: with a 1%-selective filter the HNSW index still yields k rows.

    Without ``hnsw.iterative_scan`` this query returns 0-3 rows (measured): the index hands
    over its ef_search nearest candidates and the filter throws almost all of them away.
    """
    import datetime

    from refinery.corpus.chunking import Chunk
    from refinery.corpus.documents import ParsedDocument
    from refinery.retrieval.search import explain_search, search_vector
    from refinery.retrieval.vectorstore import DocumentToChunk

    rng = np.random.default_rng(0)
    space = store.ensure_space("synthetic", 32)
    n_docs, per_doc = 100, 200
    for d in range(n_docs):
        source = f"doc{d:03d}.txt"
        doc = ParsedDocument(
            source, "t", "text", "x", str(d), str(d), 1, datetime.datetime.now(datetime.UTC)
        )
        doc_id = store.upsert_document("/synthetic", doc)
        chunks = [
            Chunk(f"{d:03d}-{i:04d}", doc_id, source, i, "c", f"h{d}-{i}", 1, 0, 1, {})
            for i in range(per_doc)
        ]
        store.replace_chunks(
            DocumentToChunk(doc_id, source, "t", "text", "x", doc.content_hash, {}), chunks, "fp"
        )
        vectors = rng.normal(size=(per_doc, 32)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert_embeddings(
            space, [c.chunk_id for c in chunks], [c.content_hash for c in chunks], vectors
        )
    with store.engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    query = rng.normal(size=32).astype(np.float32)
    only = Filters(sources=("doc042.txt",))
    assert space.index_name in explain_search(store.engine, space, query, 10, only, ef_search=20)
    approx = search_vector(store.engine, space, query, k=10, filters=only, ef_search=20)
    exact = search_vector(store.engine, space, query, k=10, filters=only, exact=True)
    assert len(approx) == 10 and all(h.source == "doc042.txt" for h in approx)
    assert len({h.chunk_id for h in approx} & {h.chunk_id for h in exact}) >= 8


def index_rows(store, embedder) -> dict[str, set[str]]:
    """The ids of every document, chunk and vector in the index."""
    d, c = schema.documents, schema.chunks
    vectors = store.find_space(embedder.name).table
    with store.engine.connect() as conn:
        return {
            "documents": set(conn.execute(sa.select(d.c.doc_id)).scalars()),
            "chunks": set(conn.execute(sa.select(c.c.chunk_id)).scalars()),
            "vectors": set(conn.execute(sa.select(vectors.c.chunk_id)).scalars()),
        }


def test_two_ingests_of_one_corpus_at_once_leave_the_index_one_ingest_leaves(
    store, db_url, small_corpus, embedder, server_url
):
    """Two ingests of the same corpus at the same time (two engines, as two `refinery ingest`
    processes would have): both finish without error, and the index holds the very documents,
    chunks and vectors that one ingest alone makes of the corpus (in another database), so
    that a rerun has nothing left to do. (The tables' keys rule out a second copy of a row;
    what a race could do is leave one out, or keep one from a stale chunking.)"""
    from concurrent.futures import ThreadPoolExecutor

    from refinery.retrieval.vectorstore import VectorStore
    from tests.support import fresh_database

    def one() -> tuple:
        other = VectorStore(sa.create_engine(db_url))
        try:
            return ingest(other, small_corpus, embedder)
        finally:
            other.engine.dispose()

    with ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in [pool.submit(one), pool.submit(one)]]
    assert all(docs.documents == 6 for docs, _, _ in results)
    integrity = store.integrity(store.find_space(embedder.name))
    assert integrity.missing == integrity.orphans == integrity.stale == integrity.nan == 0

    with fresh_database(server_url) as alone_url:
        alone = VectorStore(sa.create_engine(alone_url))
        try:
            alone.create_schema()
            ingest(alone, small_corpus, embedder)
            expected = index_rows(alone, embedder)
        finally:
            alone.engine.dispose()
    got = index_rows(store, embedder)
    assert len(expected["documents"]) == 6 and expected["chunks"] == expected["vectors"]
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in expected.items()}
    assert got == expected
    docs, chunks, vectors = ingest(store, small_corpus, embedder)
    assert (docs.new, docs.changed, docs.removed, docs.unchanged) == (0, 0, 0, 6)
    assert chunks.documents_chunked == 0 and vectors.embedded == 0
    assert index_rows(store, embedder) == expected


def test_images_and_scans_are_indexed_through_ocr_and_bad_images_go_to_the_ledger(
    store, small_corpus, embedder
):
    """Image documents (parsed in the worker pool, Tesseract under its memory limit) become
    searchable chunks that say where on the page their text was; bad images are recorded."""
    import shutil

    from refinery.core.settings import REPO_ROOT
    from tests.images import png_declaring, text_image

    corpus = REPO_ROOT / "data" / "corpus"
    for name in ("apiary-notice-board.png", "scanned-hive-inspection-record.pdf"):
        shutil.copy(corpus / name, small_corpus / name)
    poster = text_image(["Robbing season starts in August"])
    (small_corpus / "cut.png").write_bytes(poster[: len(poster) // 2])
    (small_corpus / "photo.png").write_bytes(text_image(["A JPEG"], fmt="JPEG"))
    (small_corpus / "bomb.png").write_bytes(png_declaring(50_000, 50_000))
    docs, _chunks, _vectors = ingest(store, small_corpus, embedder)
    assert docs.documents == 8
    assert {r.source: r.reason.value for r in docs.rejections} == {
        "cut.png": "corrupt_image",
        "photo.png": "wrong_type",
        "bomb.png": "decompression_bomb",
    }
    retriever = Retriever(store, embedder)
    (top,) = retriever.search("When are hive inspections at the community garden?", k=1)
    assert top.source == "apiary-notice-board.png" and "Saturdays 10:00" in top.text
    assert top.meta["format"] == "image" and top.meta["regions"]
    assert all(len(r["box"]) == 4 and r["page"] == 1 for r in top.meta["regions"])
    (scan,) = retriever.search("How many varroa mites were on the sticky board?", k=1)
    assert scan.source == "scanned-hive-inspection-record.pdf" and "4 mites" in scan.text
    assert 2 in scan.meta["pages"] and any(r["page"] == 2 for r in scan.meta["regions"])


def test_image_documents_get_a_vector_and_labels_from_a_vision_model(
    store, small_corpus, embedder, tmp_path, monkeypatch
):
    """EfficientNet-Lite0 (from its package, converted to safetensors) gives each image
    document a unit vector in its own space and its top ImageNet labels; an edited image is
    described again, a removed one loses its vector; a photo without text is indexed by its
    labels; without the model, images are still indexed by their text."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from refinery.ingestion.sync import ImageDescriber
    from refinery.vision import classifier as vision

    def captioned(pixels: np.ndarray, caption: str) -> Image.Image:
        """A photo with a printed caption under it (image documents need text to index)."""
        from PIL import ImageDraw, ImageFont

        photo = Image.fromarray(pixels)
        page = Image.new("RGB", (photo.width, photo.height + 70), "white")
        page.paste(photo, (0, 0))
        font = ImageFont.load_default(size=36)
        ImageDraw.Draw(page).text((10, photo.height + 15), caption, fill="black", font=font)
        return page

    china, flower_pixels = load_sample_images().images
    palace = captioned(china, "The Summer Palace in spring")
    flower = captioned(flower_pixels, "A flower in the apiary garden")
    palace.save(small_corpus / "palace.jpg", quality=90)
    flower.save(small_corpus / "flower.jpg", quality=90)
    models = tmp_path / "models"
    describe = ImageDescriber(models)
    docs = sync_documents(store, small_corpus, describe=describe)
    assert not docs.rejections and describe.error is None
    assert (models / "efficientnet-lite0" / "model.safetensors").exists()
    assert store.image_vector_count() == 2
    with store.engine.connect() as conn:
        rows = {
            r.source: r
            for r in conn.execute(
                sa.select(
                    schema.documents.c.source,
                    schema.documents.c.meta,
                    schema.image_vectors.c.embedding,
                ).join(
                    schema.image_vectors, schema.image_vectors.c.doc_id == schema.documents.c.doc_id
                )
            )
        }
    labels = [x["label"] for x in rows["palace.jpg"].meta["labels"]]
    assert len(labels) == 5 and "palace" in labels[:2]
    assert abs(float(np.linalg.norm(np.asarray(rows["palace.jpg"].embedding))) - 1) < 1e-4
    nearest = store.similar_images(rows["flower.jpg"].embedding, k=2)
    assert [n["source"] for n in nearest] == ["flower.jpg", "palace.jpg"]
    assert nearest[0]["score"] > 0.99 > nearest[1]["score"]

    # An edited image is described again; a removed one takes its vector with it.
    flower.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(small_corpus / "palace.jpg", quality=90)
    (small_corpus / "flower.jpg").unlink()
    sync_documents(store, small_corpus, describe=describe)
    assert store.image_vector_count() == 1
    (only,) = store.similar_images(rows["flower.jpg"].embedding, k=5)
    assert only["source"] == "palace.jpg" and only["score"] > 0.9

    # A photo without text is indexed by its likely labels; one with none likely is rejected.
    Image.fromarray(china).save(small_corpus / "summer-palace.jpg", quality=90)
    Image.fromarray(flower_pixels).save(small_corpus / "garden.jpg", quality=90)
    result = sync_documents(store, small_corpus, describe=describe)
    assert result.new == 1 and store.image_vector_count() == 2
    (why,) = result.rejections
    assert why.source == "garden.jpg" and why.reason is RejectReason.NO_TEXT
    assert "daisy" in why.detail and "below 0.25" in why.detail
    with store.engine.connect() as conn:
        photo = conn.execute(
            sa.select(schema.documents.c.text, schema.documents.c.meta).where(
                schema.documents.c.source == "summer-palace.jpg"
            )
        ).one()
    assert photo.text.startswith("Image labels: palace") and "(" not in photo.text
    assert photo.meta["image"]["width"] == china.shape[1] and photo.meta["labels"]
    (small_corpus / "garden.jpg").unlink()

    # No vision model: the image is still indexed (by its OCR text), without vector or labels.
    monkeypatch.setattr(vision, "PACKAGE", "no_such_package")
    (small_corpus / "again.jpg").write_bytes((small_corpus / "palace.jpg").read_bytes())
    (small_corpus / "again-photo.jpg").write_bytes(
        (small_corpus / "summer-palace.jpg").read_bytes()
    )
    blind = ImageDescriber(tmp_path / "empty-models")
    result = sync_documents(store, small_corpus, describe=blind)
    assert result.new == 1 and "not installed" in (blind.error or "")
    (why,) = result.rejections  # a photo needs the model to be indexed
    assert why.source == "again-photo.jpg" and "no vision model" in why.detail
    assert store.image_vector_count() == 2
