"""Parsing and the corpus scan: every format, and every kind of bad file, with its reason."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import pytest
from pypdf import PdfReader, PdfWriter

from refinery.corpus.documents import (
    CorpusFile,
    DocumentRejected,
    ParsedDocument,
    Rejection,
    RejectReason,
    document_id,
    normalize_text,
    parse_file,
    scan_corpus,
)
from tests.conftest import SAMPLE_CORPUS


def scan(root: Path) -> tuple[dict[str, CorpusFile], dict[str, Rejection]]:
    files, rejected = {}, {}
    for item in scan_corpus(root):
        if isinstance(item, Rejection):
            rejected[item.source] = item
        else:
            files[item.source] = item
    return files, rejected


def parse(root: Path, name: str, **kw) -> ParsedDocument:
    files, rejected = scan(root)
    assert name not in rejected, rejected.get(name)
    return parse_file(files[name], **kw)


def reject_reason(root: Path, name: str, **kw) -> tuple[RejectReason, str]:
    files, rejected = scan(root)
    if name in rejected:
        return rejected[name].reason, rejected[name].detail
    with pytest.raises(DocumentRejected) as info:
        parse_file(files[name], **kw)
    return info.value.reason, info.value.detail


def test_every_sample_document_parses_with_a_title_and_text():
    files, rejected = scan(SAMPLE_CORPUS)
    assert not rejected
    assert len(files) >= 30
    formats = set()
    for f in files.values():
        doc = parse_file(f)
        formats.add(doc.format)
        assert len(doc.text) > (300 if doc.format == "image" else 500), f.source
        assert doc.title and len(doc.title) < 200
        assert len(doc.content_hash) == 64
    assert formats == {"markdown", "text", "html", "pdf", "image"}


def test_html_boilerplate_is_stripped_and_structure_kept():
    doc = parse(SAMPLE_CORPUS, "waggle-and-round-dances.html")
    assert "Example Beekeepers Association" not in doc.text  # footer
    assert "function" not in doc.text and "{" not in doc.text  # script and style
    assert doc.text.count("\n# ") + doc.text.startswith("# ") >= 1  # headings become Markdown
    assert "waggle" in doc.text.lower()
    assert "dance" in doc.title.lower()


def test_pdf_text_and_page_spans():
    doc = parse(SAMPLE_CORPUS, "siting-an-apiary.pdf")
    pages = doc.meta["pages"]
    assert len(pages) >= 2
    assert pages[0][0] == 0 and all(a[1] <= b[0] for a, b in itertools.pairwise(pages))
    assert pages[-1][1] == len(doc.text)
    assert "apiary" in doc.text.lower()


def test_normalize_text():
    raw = "Title\r\n\r\n\r\n\r\nline  with\t tabs   \nzero\u200bwidth\x07 bell  \n"
    assert normalize_text(raw) == "Title\n\nline with tabs\nzerowidth bell"
    # NFC: a decomposed é becomes one code point, so equal text hashes equally.
    assert normalize_text("e\u0301") == "\u00e9"


def test_content_hash_ignores_layout_but_not_words(tmp_path):
    (tmp_path / "a.txt").write_text("Bees   make honey.\r\n")
    (tmp_path / "b.txt").write_text("Bees make honey.\n\n\n")
    (tmp_path / "c.txt").write_text("Bees make wax.\n")
    a, b, c = (parse(tmp_path, n) for n in ("a.txt", "b.txt", "c.txt"))
    assert a.content_hash == b.content_hash != c.content_hash
    assert a.file_hash != b.file_hash


def test_document_id_is_stable_per_corpus_and_source():
    assert document_id("/c", "a.md") == document_id("/c", "a.md")
    assert document_id("/c", "a.md") != document_id("/c", "b.md")
    assert document_id("/c", "a.md") != document_id("/d", "a.md")


def test_utf8_bom_and_utf16_are_read(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHive notes")
    (tmp_path / "u16.txt").write_bytes("Hive notes in UTF-16".encode("utf-16"))
    assert parse(tmp_path, "bom.txt").text == "Hive notes"
    assert parse(tmp_path, "u16.txt").text == "Hive notes in UTF-16"


def _encrypted_pdf(user_password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(SAMPLE_CORPUS / "siting-an-apiary.pdf"))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "reason", "says"),
    [
        ("empty.md", b"", RejectReason.EMPTY, "empty"),
        ("blank.txt", b"  \n\n\t ", RejectReason.EMPTY, "empty"),
        ("image.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, RejectReason.BINARY, "PNG"),
        ("random.md", os.urandom(4096), RejectReason.BINARY, "binary"),
        ("nul.txt", b"Bees make honey.\x00 And wax.", RejectReason.NUL_BYTES, "NUL"),
        ("latin1.txt", "Café au lait".encode("latin-1"), RejectReason.INVALID_UTF8, "UTF-8"),
        ("truncated.pdf", (SAMPLE_CORPUS / "splitting-colonies.pdf").read_bytes()[:1500], RejectReason.CORRUPT_PDF, "truncated"),
        ("fake.pdf", b"this is not a pdf at all\n%%EOF", RejectReason.CORRUPT_PDF, "%PDF"),
        ("garbled.pdf", b"%PDF-1.7\n" + os.urandom(3000) + b"\n%%EOF\n", RejectReason.CORRUPT_PDF, "PDF"),
        ("locked.pdf", _encrypted_pdf("hunter2"), RejectReason.ENCRYPTED_PDF, "password"),
        ("notes.docx", b"PK\x03\x04whatever", RejectReason.UNSUPPORTED, "unsupported"),
    ],
)  # fmt: skip
def test_bad_files_are_rejected_with_a_reason(tmp_path, name, content, reason, says):
    (tmp_path / name).write_bytes(content)
    got, detail = reject_reason(tmp_path, name)
    assert got == reason, detail
    assert says.lower() in detail.lower()


def test_pdf_with_only_an_owner_password_is_read(tmp_path):
    (tmp_path / "owner-only.pdf").write_bytes(_encrypted_pdf(""))
    assert "apiary" in parse(tmp_path, "owner-only.pdf").text.lower()


def test_too_large_is_rejected_before_reading(tmp_path):
    big = tmp_path / "huge.txt"
    with open(big, "wb") as fh:
        fh.write(b"Bees. " * 10)
        fh.truncate(100 * 1024 * 1024)  # 100 MB, sparse: costs no disk
    reason, detail = reject_reason(tmp_path, "huge.txt")
    assert reason == RejectReason.TOO_LARGE
    assert "104.9 MB" in detail and "limit" in detail


def test_size_limit_is_configurable(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 2000)
    reason, _ = reject_reason(tmp_path, "a.txt", max_bytes=1000)
    assert reason == RejectReason.TOO_LARGE


def test_unreadable_permissions(tmp_path):
    f = tmp_path / "secret.md"
    f.write_text("# Secret\n\nnot for the index")
    f.chmod(0)
    try:
        reason, detail = reject_reason(tmp_path, "secret.md")
    finally:
        f.chmod(0o644)
    assert reason == RejectReason.UNREADABLE
    assert "permission" in detail


def test_links_loops_and_special_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "good.md").write_text("# Good\n\nA good document about drones.")
    (root / "sub" / "deep.txt").write_text("Deep document about queens.")
    (root / "self.md").symlink_to(root / "self.md")  # a link to itself
    (root / "dangling.txt").symlink_to(root / "missing.txt")
    (root / "sub" / "up").symlink_to(root)  # a directory loop
    (root / "alias.md").symlink_to(root / "good.md")  # a good link is followed
    os.mkfifo(root / "pipe.txt")  # would block a naive reader
    (root / ".hidden.md").write_text("skipped")
    files, rejected = scan(root)
    assert set(files) == {"good.md", "sub/deep.txt", "alias.md"}
    assert rejected["self.md"].reason == RejectReason.SYMLINK_LOOP
    assert rejected["dangling.txt"].reason == RejectReason.BROKEN_SYMLINK
    assert rejected["sub/up"].reason == RejectReason.SYMLINK_LOOP
    assert rejected["pipe.txt"].reason == RejectReason.NOT_A_FILE
    assert ".hidden.md" not in files and ".hidden.md" not in rejected


def test_unreadable_folder_is_reported_and_the_rest_scanned(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    (root / "locked").mkdir(parents=True)
    (root / "ok.md").write_text("# Ok\n\ntext")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads any folder; simulate a locked one
    files, rejected = scan(root)
    assert set(files) == {"ok.md"}
    assert rejected["locked"].reason == RejectReason.UNREADABLE


def test_missing_corpus_folder_is_an_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="does not exist"):
        list(scan_corpus(tmp_path / "nope"))
