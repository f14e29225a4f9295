"""Parser limits (checked in the parser) and the time budget (enforced from outside it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from refinery.corpus.documents import (
    DocumentRejected,
    ParseLimits,
    RejectReason,
    check_html_shape,
    corpus_file,
    parse_bytes,
    parse_file,
    read_bytes,
)
from refinery.corpus.isolation import ParserPool
from tests import adversarial
from tests.conftest import SAMPLE_CORPUS


def rejected(tmp_path: Path, name: str, data: bytes, limits: ParseLimits | None = None) -> str:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DocumentRejected) as info:
        parse_file(corpus_file(tmp_path / name, tmp_path), limits=limits)
    return info.value.reason.value


def test_the_deep_html_from_the_issue_is_refused_at_once(tmp_path):
    # 200,000 nested <div>s kept the old parser busy for minutes; the shape check refuses it
    # before any tree is built.
    assert rejected(tmp_path, "deep.html", adversarial.deep_html()) == "too_deep"


def test_html_shape_follows_the_parser_not_the_raw_tags():
    limits = ParseLimits(max_depth=10, max_elements=1000)
    # Unclosed <p>/<li>, void elements, self-closing tags, comments and scripts do not nest.
    page = "<body>" + "<p>x" * 200 + "<ul>" + "<li>y" * 200 + "</ul>" + "<br><img src=a>" * 50
    page += "<span/>" * 10 + "<!-- <div><div><div> -->" * 20 + "<script>" + "<div>" * 50
    page += "</script></body>"
    elements, depth = check_html_shape(page, limits)
    assert depth <= 4
    assert elements == 1 + 200 + 1 + 200 + 100 + 10 + 1
    # A stray end tag closes nothing; a matching one closes back to its element.
    assert check_html_shape("<a><b><c></x></b><d>", limits)[1] == 3
    with pytest.raises(DocumentRejected) as info:
        check_html_shape("<div>" * 11, limits)
    assert info.value.reason is RejectReason.TOO_DEEP
    with pytest.raises(DocumentRejected) as info:
        check_html_shape("<br>" * 1001, limits)
    assert info.value.reason is RejectReason.TOO_MANY_ELEMENTS


def test_html_shape_is_linear_on_unclosed_comments_and_tags():
    # Each "<" must not rescan the rest of the page: these would be quadratic (minutes) if it did.
    check_html_shape("<!--" * 200_000, ParseLimits())
    check_html_shape("<a" * 200_000, ParseLimits())
    check_html_shape("<a x='" + ">" * 10 + "<" * 200_000, ParseLimits())


def test_deep_but_allowed_html_is_read_without_recursion(tmp_path):
    page = b"<html><body>" + b"<div>" * 500 + b"<p>bottom</p>" + b"</div>" * 500 + b"</body></html>"
    (tmp_path / "ok.html").write_bytes(page)
    doc = parse_file(corpus_file(tmp_path / "ok.html", tmp_path))
    assert doc.text == "bottom"


def test_html_comments_are_not_text(tmp_path):
    (tmp_path / "c.html").write_bytes(b"<p>seen<!-- not seen --></p>")
    assert parse_file(corpus_file(tmp_path / "c.html", tmp_path)).text == "seen"


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("wide.html", adversarial.wide_html, "too_many_elements"),
        ("laughs.html", adversarial.billion_laughs, "entity_expansion"),
        ("declared.pdf", adversarial.declared_objects_pdf, "too_many_objects"),
        ("bomb.pdf", adversarial.compression_bomb_pdf, "decompression_bomb"),
        ("quotes.md", adversarial.deep_markdown, "too_deep"),
        ("empty.pdf", lambda: b"", "empty"),
    ],
)
def test_each_limit_has_its_reason(tmp_path, name, make, reason):
    assert rejected(tmp_path, name, make()) == reason


def test_pdf_pages_and_objects_limits(tmp_path):
    pages = adversarial.pdf_with_pages(
        [adversarial.flate_stream(b"BT /F1 12 Tf 72 720 Td (p) Tj ET")] * 5
    )
    assert rejected(tmp_path, "pages.pdf", pages, ParseLimits(max_pages=4)) == "too_many_pages"
    (tmp_path / "ok.pdf").write_bytes(pages)
    doc = parse_file(corpus_file(tmp_path / "ok.pdf", tmp_path), limits=ParseLimits(max_pages=5))
    assert len(doc.meta["pages"]) == 5
    many = adversarial.many_objects_pdf(objects=300)
    assert rejected(tmp_path, "objects.pdf", many, ParseLimits(max_objects=200)) == (
        "too_many_objects"
    )


def test_entities_in_prose_are_not_a_bomb(tmp_path):
    # Markdown about XML may quote a declaration; only a file that is an XML document counts.
    (tmp_path / "xml.md").write_text('# XML\n\nDeclare one with `<!ENTITY name "value">`.\n')
    assert "ENTITY" in parse_file(corpus_file(tmp_path / "xml.md", tmp_path)).text


def test_a_file_that_changed_since_the_scan_is_not_parsed(tmp_path):
    path = tmp_path / "moving.md"
    path.write_text("# One\n\nfirst version\n")
    file = corpus_file(path, tmp_path)
    path.write_text("# One\n\nsecond, longer version\n")
    with pytest.raises(DocumentRejected) as info:
        read_bytes(file)
    assert info.value.reason is RejectReason.CHANGED_WHILE_READING
    assert read_bytes(corpus_file(path, tmp_path)).endswith(b"version\n")  # a new scan reads it


def test_pool_kills_a_parser_past_its_deadline_and_goes_on(tmp_path):
    (tmp_path / "slow.pdf").write_bytes(adversarial.slow_pdf(pages=4))
    good = corpus_file(SAMPLE_CORPUS / "siting-an-apiary.pdf", SAMPLE_CORPUS)
    slow = corpus_file(tmp_path / "slow.pdf", tmp_path)
    with ParserPool(ParseLimits(timeout_s=2)) as pool:
        first = pool.parse(good, read_bytes(good))
        with pytest.raises(DocumentRejected) as info:
            pool.parse(slow, read_bytes(slow))
        assert info.value.reason is RejectReason.PARSE_TIMEOUT
        again = pool.parse(good, read_bytes(good))  # a fresh worker
        assert (pool.started, pool.killed) == (2, 1)
    # The worker's answer is what parsing in this process gives.
    assert first == again == parse_bytes(good, read_bytes(good))


def test_pool_reports_a_worker_that_runs_out_of_memory(tmp_path):
    (tmp_path / "wide.html").write_bytes(adversarial.wide_html(100_000))
    wide = corpus_file(tmp_path / "wide.html", tmp_path)
    good = corpus_file(SAMPLE_CORPUS / "hive-inspections.md", SAMPLE_CORPUS)
    with ParserPool(ParseLimits(max_memory_mb=100, timeout_s=60)) as pool:
        with pytest.raises(DocumentRejected) as info:
            pool.parse(wide, read_bytes(wide))
        assert info.value.reason in (RejectReason.TOO_MUCH_MEMORY, RejectReason.PARSER_CRASHED)
        assert pool.parse(good, read_bytes(good)).title
