"""Image documents with vectors and labels: ingestion (OCR + EfficientNet-Lite0) against the bare
OCR engine on the same files.

Files: the first 24 pages of the scanned sample corpus (see benchmarks/images.py: each document's
text printed onto A4 at 150 dpi), saved as PNG image documents. Ingestion: `sync_documents` into
a fresh store (the parser pool runs OCR; the vision model gives each image its vector and labels
in the main process). Bare: `pytesseract.image_to_string` over the same images one after
another, then the vision model alone over the same images one at a time.
"""

from __future__ import annotations

import os
import shutil
import time

from benchmarks.common import WORK, fresh_home, write_table
from benchmarks.images import scanned_corpus
from refinery.core.stores import make_engine

N_IMAGES = 24


def main() -> None:
    import pytesseract

    from refinery.ingestion.sync import ImageDescriber, sync_documents
    from refinery.retrieval.vectorstore import VectorStore
    from refinery.vision.classifier import VisionModel

    pages = [p for ps in scanned_corpus(WORK / "scanned-corpus").values() for p in ps][:N_IMAGES]
    corpus = WORK / "png-pages"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    for i, page in enumerate(pages):
        page.save(corpus / f"page-{i:03d}.png")
    t0 = time.perf_counter()
    for page in pages:
        pytesseract.image_to_string(page)
    bare_ocr_s = time.perf_counter() - t0
    vision = VisionModel(WORK / "models")
    vision.describe([pages[0]])  # load and warm up
    t0 = time.perf_counter()
    for page in pages:
        vision.describe([page])
    vision_s = time.perf_counter() - t0
    with fresh_home("image-vectors") as settings:
        engine = make_engine(settings=settings, create_schema=True)
        store = VectorStore(engine)
        describe = ImageDescriber(WORK / "models")
        t0 = time.perf_counter()
        docs = sync_documents(store, corpus, describe=describe)
        ingest_s = time.perf_counter() - t0
        vectors = store.image_vector_count()
        engine.dispose()
    n = len(pages)
    rows = [
        ["bare Tesseract, one process (its default threads)", f"{n / bare_ocr_s:.2f}", f"{bare_ocr_s:.1f} s", "text only"],
        ["EfficientNet-Lite0 alone, one image at a time", f"{n / vision_s:.1f}", f"{vision_s:.1f} s", "vector + labels only"],
        [f"ingestion: OCR ({os.cpu_count()} parser workers) + vectors and labels", f"{n / ingest_s:.2f}", f"{ingest_s:.1f} s",
         f"{docs.documents} documents, {vectors} vectors, {docs.rejected} rejected"],
    ]  # fmt: skip
    write_table(
        "image_vectors",
        "Image documents: OCR + image vectors at ingestion",
        __doc__ or "",
        ["what", "images/s", "time", "detail"],
        rows,
    )
