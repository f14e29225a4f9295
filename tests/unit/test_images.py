"""Image documents: OCR into text with regions, scanned PDF pages, and every kind of bad image
recorded with its reason. Tesseract is the real engine (Debian's tesseract-ocr)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from refinery.corpus.chunking import ChunkingConfig
from refinery.corpus.documents import (
    CorpusFile,
    DocumentRejected,
    ParseLimits,
    RejectReason,
    parse_bytes,
)
from tests.images import line_top, png_declaring, scanned_pdf, text_image

POSTER = ["Varroa count: 3 mites per 100 bees", "Treat with oxalic acid in December"]


def parse(name: str, data: bytes, **limits):
    file = CorpusFile(Path(name), name, len(data), datetime.now(UTC))
    return parse_bytes(file, data, ParseLimits(**limits))


def rejected(name: str, data: bytes, **limits) -> tuple[RejectReason, str]:
    with pytest.raises(DocumentRejected) as info:
        parse(name, data, **limits)
    return info.value.reason, info.value.detail


@pytest.mark.parametrize(("name", "fmt"), [("poster.png", "PNG"), ("poster.jpg", "JPEG"),
                                           ("poster.webp", "WEBP")])  # fmt: skip
def test_an_image_document_is_read_by_ocr_with_the_region_of_each_line(name, fmt):
    doc = parse(name, text_image(POSTER, fmt=fmt))
    assert doc.format == "image"
    assert doc.text.splitlines() == POSTER
    assert doc.meta["image"]["format"] == fmt
    regions = doc.meta["ocr"]["regions"]
    assert [r["page"] for r in regions] == [1, 1]
    for i, region in enumerate(regions):
        left, top, _w, h = region["box"]
        assert abs(top - line_top(i)) <= 12 and 20 <= left <= 40 and h > 10
        start, end = region["chars"]
        assert doc.text[start:end] == POSTER[i]


def test_scanned_pdf_pages_without_a_text_layer_are_read_by_ocr():
    pages = [["Queen cells hang down", "like peanuts"], ["Swarms leave in spring"]]
    doc = parse("scan.pdf", scanned_pdf(pages))
    assert doc.format == "pdf"
    assert "Queen cells hang down" in doc.text and "Swarms leave in spring" in doc.text
    (p1_start, p1_end), (p2_start, p2_end) = doc.meta["pages"]
    assert "like peanuts" in doc.text[p1_start:p1_end]
    assert "Swarms" in doc.text[p2_start:p2_end]
    regions = doc.meta["ocr"]["regions"]
    assert [r["page"] for r in regions] == [1, 1, 2]
    assert doc.text[slice(*regions[2]["chars"])] == "Swarms leave in spring"


def test_chunks_of_an_image_say_which_regions_their_text_came_from():
    from refinery.corpus.chunking import Chunker
    from refinery.retrieval.embedding import Embedder

    lines = [*POSTER, "Feed syrup when stores run low", "Check the brood every week"]
    doc = parse("poster.png", text_image(lines))
    regions = doc.meta["ocr"]["regions"]
    assert len(regions) == 4
    tokenizer = Embedder().tokenizer()  # from tokenizer.json on disk: the model is not loaded
    config = ChunkingConfig(max_tokens=16, overlap_tokens=0, contextual=False)
    chunks = Chunker(config, tokenizer, "minilm").split(
        doc_id="d", source="poster.png", text=doc.text, format=doc.format,
        pages=doc.meta["pages"], regions=regions,
    )  # fmt: skip
    assert len(chunks) >= 2
    for chunk in chunks:
        mine = [i for i, r in enumerate(regions)
                if r["chars"][0] < chunk.char_end and r["chars"][1] > chunk.char_start]  # fmt: skip
        assert 0 < len(mine) < 4
        assert chunk.meta["regions"] == [{"page": 1, "box": regions[i]["box"]} for i in mine]
        assert chunk.meta["pages"] == [1]
    assert chunks[0].meta["regions"][0]["box"] == regions[0]["box"]
    assert chunks[-1].meta["regions"][-1]["box"] == regions[-1]["box"]


def test_bad_images_are_rejected_with_their_reason():
    png = text_image(POSTER)
    assert rejected("cut.png", png[: len(png) // 2])[0] is RejectReason.CORRUPT_IMAGE
    reason, detail = rejected("photo.png", text_image(POSTER, fmt="JPEG"))
    assert reason is RejectReason.WRONG_TYPE and "JPEG" in detail
    assert rejected("empty.webp", b"")[0] is RejectReason.EMPTY
    assert rejected("notes.jpg", b"just some text, not a JPEG")[0] is RejectReason.CORRUPT_IMAGE
    reason, detail = rejected("bomb.png", png_declaring(100_000, 100_000))
    assert reason is RejectReason.DECOMPRESSION_BOMB and "100000×100000" in detail
    reason, _ = rejected("big.png", png, max_image_pixels=10_000)
    assert reason is RejectReason.DECOMPRESSION_BOMB
    blank = text_image([])
    assert rejected("blank.png", blank)[0] is RejectReason.NO_TEXT


def test_without_an_ocr_engine_an_image_is_recorded_as_such(monkeypatch):
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "tesseract" else real(name))
    reason, detail = rejected("poster.png", text_image(POSTER))
    assert reason is RejectReason.OCR_UNAVAILABLE and "tesseract-ocr" in detail
