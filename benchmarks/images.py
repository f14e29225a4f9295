"""Image documents: OCR ingestion throughput against bare Tesseract on the same pages, and
retrieval over scanned copies of the sample corpus with its RAG question set (test split).

Scanned corpus: each sample document's text, as the parser extracts it, printed onto A4 pages
at 150 dpi (1,240 × 1,754 pixels, up to 48 lines of at most 90 characters, Pillow's default
font at 22 px) and saved as an image-only PDF: a scanner's output, without a scanner's noise.
Every page is one image to OCR.

Ingestion: `sync_documents` over the scanned corpus (the parser worker pool, one Tesseract
thread per worker, OCR inside the file's time budget) against `pytesseract.image_to_string`
over the same page images one after another in one process (Tesseract's own default threads):
pages per second, whole runs.

Retrieval: the same path for both corpora (default chunking, MiniLM, hybrid search), on the
test-split questions of data/eval/rag_questions.jsonl; a question is found at rank r when the
r-th chunk comes from its gold document (the scanned copy has the same name, ending in .pdf).
"""

from __future__ import annotations

import io
import os
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks.common import WORK, fresh_home, write_table
from evaluation.datasets import DEFAULT_RAG_QUESTIONS, load_rag_questions
from refinery.core.settings import DEFAULT_CORPUS_DIR
from refinery.core.stores import make_engine

K = 5
PAGE = (1240, 1754)
LINES_PER_PAGE = 48
WIDTH_CHARS = 90
FONT_PX = 22


def page_images(text: str) -> list[Any]:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=FONT_PX)
    lines: list[str] = []
    for paragraph in text.splitlines():
        lines += textwrap.wrap(paragraph, WIDTH_CHARS) or [""]
    pages = []
    for start in range(0, max(1, len(lines)), LINES_PER_PAGE):
        img = Image.new("L", PAGE, 255)
        draw = ImageDraw.Draw(img)
        for i, line in enumerate(lines[start : start + LINES_PER_PAGE]):
            draw.text((80, 80 + i * 33), line, fill=0, font=font)
        pages.append(img)
    return pages


def scanned_corpus(out: Path) -> dict[str, list[Any]]:
    """Write the scanned copies; return their page images by scanned file name."""
    from refinery.corpus.documents import Rejection, parse_file, scan_corpus

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pages_by_file = {}
    for item in scan_corpus(DEFAULT_CORPUS_DIR):
        if isinstance(item, Rejection):
            continue
        pages = page_images(parse_file(item).text)
        name = Path(item.source).stem + ".pdf"
        buf = io.BytesIO()
        rgb = [p.convert("RGB") for p in pages]
        rgb[0].save(buf, format="PDF", save_all=True, append_images=rgb[1:], resolution=150)
        (out / name).write_bytes(buf.getvalue())
        pages_by_file[name] = pages
    return pages_by_file


def bare_ocr(pages_by_file: dict[str, list[Any]]) -> tuple[int, float, int]:
    import pytesseract

    n, chars = 0, 0
    t0 = time.perf_counter()
    for pages in pages_by_file.values():
        for page in pages:
            chars += len(pytesseract.image_to_string(page))
            n += 1
    return n, time.perf_counter() - t0, chars


def index_and_ask(corpus: Path, rows: list[dict[str, Any]], stem_gold: bool) -> dict[str, Any]:
    """Ingest ``corpus`` into a fresh home and ask the test questions; returns metrics."""
    from refinery.corpus.chunking import ChunkingConfig
    from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
    from refinery.retrieval.embedding import Embedder
    from refinery.retrieval.search import Retriever
    from refinery.retrieval.vectorstore import VectorStore

    with fresh_home(f"images-{corpus.name}") as settings:
        engine = make_engine(settings=settings, create_schema=True)
        store = VectorStore(engine)
        t0 = time.perf_counter()
        docs = sync_documents(store, corpus)
        parse_s = time.perf_counter() - t0
        embedder = Embedder()
        chunks = sync_chunks(store, make_chunker(ChunkingConfig(), embedder))
        sync_embeddings(store, embedder, batch_size=32)
        retriever = Retriever(store, embedder)
        ranks: list[int | None] = []
        for row in rows:
            gold = {Path(s).stem if stem_gold else s for s in row["sources"]}
            hits = retriever.search(row["question"], k=K)
            names = [Path(h.source).stem if stem_gold else h.source for h in hits]
            ranks.append(next((r for r, s in enumerate(names, 1) if s in gold), None))
        engine.dispose()
    n = len(ranks)
    return {
        "documents": docs.documents,
        "rejected": docs.rejected,
        "chunks": chunks.chunks_total,
        "parse_s": parse_s,
        "hit1": sum(r == 1 for r in ranks) / n,
        "hit5": sum(r is not None for r in ranks) / n,
        "mrr5": sum(1 / r for r in ranks if r is not None) / n,
        "n": n,
    }


def main() -> None:
    rows = [r for r in load_rag_questions(DEFAULT_RAG_QUESTIONS)[0] if r["split"] == "test"]
    out = WORK / "scanned-corpus"
    pages_by_file = scanned_corpus(out)
    n_pages = sum(len(p) for p in pages_by_file.values())
    bare_pages, bare_s, bare_chars = bare_ocr(pages_by_file)
    scanned = index_and_ask(out, rows, stem_gold=True)
    text = index_and_ask(DEFAULT_CORPUS_DIR, rows, stem_gold=True)
    table = [
        ["OCR throughput", "bare Tesseract, one process (its default threads)",
         f"{bare_pages / bare_s:.2f} pages/s", f"{bare_pages} pages in {bare_s:.1f} s"],
        ["OCR throughput", f"ingestion (`sync_documents`, {os.cpu_count()} parser workers)",
         f"{n_pages / scanned['parse_s']:.2f} pages/s",
         f"{n_pages} pages in {scanned['parse_s']:.1f} s, parse + hash + upsert; "
         f"{scanned['documents']} documents, {scanned['rejected']} rejected"],
    ]  # fmt: skip
    for label, m in (("text corpus (as written)", text), ("scanned copies (OCR)", scanned)):
        table.append(
            [
                "retrieval, hybrid, test split",
                label,
                f"hit@1 {m['hit1']:.3f}, hit@5 {m['hit5']:.3f}, MRR@5 {m['mrr5']:.3f}",
                f"{m['n']} questions, {m['documents']} documents, {m['chunks']} chunks",
            ]
        )
    write_table(
        "images",
        "Image documents: OCR ingestion and retrieval over scanned pages",
        __doc__ or "",
        ["what", "how", "result", "detail"],
        table,
        notes=f"Bare Tesseract read {bare_chars:,} characters from the {bare_pages} pages.",
    )


if __name__ == "__main__":
    main()
