"""Corpus files → normalized text, or a clear reason why a file was rejected.

Formats: Markdown, plain text, HTML (boilerplate stripped) and PDF (text layer). A bad file
never stops a scan: ``scan_corpus`` yields a ``Rejection`` for it and goes on.
"""

from __future__ import annotations

import codecs
import enum
import io
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refinery.lineage import sha256_hex

FORMATS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}

DEFAULT_MAX_FILE_BYTES = 20 * 1024 * 1024

# Magic numbers of common binary formats that sometimes hide behind a text extension.
_BINARY_MAGIC = {
    b"\x89PNG": "PNG image",
    b"\xff\xd8\xff": "JPEG image",
    b"GIF8": "GIF image",
    b"PK\x03\x04": "ZIP archive (or docx/xlsx)",
    b"\x1f\x8b": "gzip archive",
    b"\x7fELF": "ELF executable",
    b"%PDF-": "PDF document",
    b"\xd0\xcf\x11\xe0": "legacy Office document",
}


class RejectReason(enum.StrEnum):
    EMPTY = "empty"
    BINARY = "binary"
    NUL_BYTES = "nul_bytes"
    INVALID_UTF8 = "invalid_utf8"
    TOO_LARGE = "too_large"
    ENCRYPTED_PDF = "encrypted_pdf"
    CORRUPT_PDF = "corrupt_pdf"
    NO_TEXT = "no_text"
    SYMLINK_LOOP = "symlink_loop"
    BROKEN_SYMLINK = "broken_symlink"
    UNREADABLE = "unreadable"
    NOT_A_FILE = "not_a_regular_file"
    UNSUPPORTED = "unsupported_type"


class DocumentRejected(Exception):
    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CorpusFile:
    path: Path  # where to read it
    source: str  # path relative to the corpus root, with forward slashes: the document's identity
    size_bytes: int
    modified_at: datetime


@dataclass(frozen=True)
class Rejection:
    source: str
    reason: RejectReason
    detail: str
    size_bytes: int | None = None


@dataclass(frozen=True)
class ParsedDocument:
    source: str
    title: str
    format: str
    text: str
    file_hash: str
    content_hash: str
    size_bytes: int
    modified_at: datetime
    meta: dict[str, Any] = field(default_factory=dict)


def document_id(corpus: str, source: str) -> str:
    """Stable id of a document: its place in a corpus, not its content (edits keep the id)."""
    return sha256_hex(f"doc\x00{corpus}\x00{source}")[:32]


# ---------------------------------------------------------------------------------------------
# Walking the corpus


def scan_corpus(root: Path) -> Iterator[CorpusFile | Rejection]:
    """Every file under ``root`` that has a supported extension, or why it cannot be read.

    Follows symbolic links to directories once (a link back up the tree is a loop and is
    reported, not followed); hidden files and folders (".git", ".DS_Store") are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"corpus folder {root} does not exist or is not a directory")
    seen_dirs: set[Path] = set()
    walk_errors: list[OSError] = []

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=walk_errors.append):
        here = Path(dirpath)
        real = here.resolve()
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        while walk_errors:
            walk_error = walk_errors.pop()
            yield _rejection_for_oserror(
                _relative(Path(walk_error.filename or dirpath), root), walk_error
            )
        kept = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            sub = here / name
            try:
                sub_real = sub.resolve(strict=True)
            except (OSError, RuntimeError) as err:
                yield _rejection_for_link(_relative(sub, root), err)
                continue
            if sub_real in seen_dirs or sub_real == real or sub_real in real.parents:
                yield Rejection(
                    _relative(sub, root),
                    RejectReason.SYMLINK_LOOP,
                    f"symbolic link to {sub_real} leads back into a folder already scanned; not followed",
                )
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            yield corpus_file(here / name, root)
    while walk_errors:
        walk_error = walk_errors.pop()
        yield _rejection_for_oserror(_relative(Path(walk_error.filename or root), root), walk_error)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _rejection_for_link(source: str, err: BaseException) -> Rejection:
    if isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno == 40):  # ELOOP
        return Rejection(
            source, RejectReason.SYMLINK_LOOP, "symbolic link loop: the link points back to itself"
        )
    return Rejection(
        source, RejectReason.BROKEN_SYMLINK, f"symbolic link target is missing ({err})"
    )


def _rejection_for_oserror(source: str, err: OSError) -> Rejection:
    if isinstance(err, PermissionError):
        return Rejection(source, RejectReason.UNREADABLE, f"permission denied: {err.strerror}")
    if err.errno == 40:
        return _rejection_for_link(source, err)
    return Rejection(source, RejectReason.UNREADABLE, f"cannot read: {err}")


def corpus_file(path: Path, root: Path) -> CorpusFile | Rejection:
    source = _relative(path, root)
    try:
        st = path.stat()  # follows links: a loop or dangling link fails here
    except FileNotFoundError as err:
        if path.is_symlink():
            return _rejection_for_link(source, err)
        return Rejection(source, RejectReason.UNREADABLE, f"file vanished during the scan ({err})")
    except OSError as err:
        return _rejection_for_oserror(source, err)
    if not stat.S_ISREG(st.st_mode):
        return Rejection(
            source, RejectReason.NOT_A_FILE, "not a regular file (device, FIFO or socket)"
        )
    if path.suffix.lower() not in FORMATS:
        return Rejection(
            source,
            RejectReason.UNSUPPORTED,
            f"unsupported file type {path.suffix or '(no extension)'!r}; "
            f"supported: {', '.join(sorted(FORMATS))}",
            st.st_size,
        )
    # Policy, not only the OS: a file with no read bits is not meant to be read, even by root.
    if stat.S_IMODE(st.st_mode) & 0o444 == 0 or not os.access(path, os.R_OK):
        return Rejection(source, RejectReason.UNREADABLE, "file has no read permission", st.st_size)
    return CorpusFile(path, source, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=UTC))


# ---------------------------------------------------------------------------------------------
# Reading one file


def read_bytes(file: CorpusFile, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    if file.size_bytes > max_bytes:
        raise DocumentRejected(
            RejectReason.TOO_LARGE,
            f"{file.size_bytes / 1e6:.1f} MB is over the {max_bytes / 1e6:.1f} MB limit per file",
        )
    try:
        with open(file.path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except PermissionError as err:
        raise DocumentRejected(
            RejectReason.UNREADABLE, f"permission denied: {err.strerror}"
        ) from err
    except OSError as err:
        raise DocumentRejected(RejectReason.UNREADABLE, f"cannot read: {err}") from err
    if len(data) > max_bytes:  # grew since the scan
        raise DocumentRejected(
            RejectReason.TOO_LARGE, f"over the {max_bytes / 1e6:.1f} MB limit per file"
        )
    return data


def parse_bytes(file: CorpusFile, data: bytes) -> ParsedDocument:
    """Extract and normalize the text of one file; raise ``DocumentRejected`` with the reason."""
    fmt = FORMATS[file.path.suffix.lower()]
    if not data.strip():
        raise DocumentRejected(RejectReason.EMPTY, "the file is empty")
    meta: dict[str, Any] = {}
    if fmt == "pdf":
        text, title, pages = _pdf_text(data)
        meta["pages"] = pages
    else:
        raw = _decode_text(data)
        if fmt == "html":
            text, title = _html_text(raw)
        else:
            text, title = normalize_text(raw), None
    if not text.strip():
        raise DocumentRejected(RejectReason.NO_TEXT, "no text could be extracted")
    return ParsedDocument(
        source=file.source,
        title=(title or _first_line_title(text) or Path(file.source).stem)[:200],
        format=fmt,
        text=text,
        file_hash=sha256_hex(data),
        content_hash=sha256_hex(text),
        size_bytes=len(data),
        modified_at=file.modified_at,
        meta=meta,
    )


def parse_file(file: CorpusFile, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> ParsedDocument:
    return parse_bytes(file, read_bytes(file, max_bytes))


def _decode_text(data: bytes) -> str:
    for magic, kind in _BINARY_MAGIC.items():
        if data.startswith(magic):
            raise DocumentRejected(RejectReason.BINARY, f"binary content ({kind}) in a text file")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise DocumentRejected(
                RejectReason.INVALID_UTF8, f"broken UTF-16 text: {err.reason}"
            ) from err
    nul = data.count(b"\x00")
    if nul:
        if _mostly_control_bytes(data):
            raise DocumentRejected(RejectReason.BINARY, "binary content: mostly control bytes")
        first = data.index(0)
        raise DocumentRejected(
            RejectReason.NUL_BYTES, f"{nul} NUL byte(s), first at byte {first}: not a text file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if _mostly_control_bytes(data):
            raise DocumentRejected(
                RejectReason.BINARY, "binary content: mostly control bytes"
            ) from err
        raise DocumentRejected(
            RejectReason.INVALID_UTF8,
            f"invalid UTF-8 at byte {err.start} (0x{data[err.start]:02x}); save the file as UTF-8",
        ) from err


def _mostly_control_bytes(data: bytes, sample: int = 8192) -> bool:
    head = data[:sample]
    control = sum(1 for b in head if b < 9 or 13 < b < 32)
    return control > 0.05 * len(head)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, no control characters, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _first_line_title(text: str) -> str | None:
    for line in text.split("\n"):
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return None


# HTML ---------------------------------------------------------------------------------------

_HTML_DROP = (
    "script",
    "style",
    "noscript",
    "template",
    "nav",
    "footer",
    "aside",
    "form",
    "iframe",
    "svg",
)
_HTML_BLOCKS = (
    "p", "div", "section", "article", "main", "header", "blockquote", "pre", "table", "tr",
    "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "address", "hr",
)  # fmt: skip


def _html_text(raw: str) -> tuple[str, str | None]:
    """Readable text of an HTML page, with headings and list items kept as Markdown."""
    from bs4 import BeautifulSoup, NavigableString

    soup = BeautifulSoup(raw, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup.find_all(_HTML_DROP):
        tag.decompose()
    if soup.head:
        soup.head.decompose()
    # Whitespace inside text nodes is layout, not content (except in <pre>).
    for node in soup.find_all(string=True):
        if isinstance(node, NavigableString) and not node.find_parent("pre"):
            node.replace_with(re.sub(r"\s+", " ", str(node)))
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for level in range(1, 7):
        for h in soup.find_all(f"h{level}"):
            h.insert_before("\n\n" + "#" * level + " ")
            h.insert_after("\n\n")
    for li in soup.find_all("li"):
        li.insert_before("\n- ")
        li.insert_after("\n")
    for cell in soup.find_all(["td", "th"]):
        cell.insert_after(" | ")
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    body = soup.body or soup
    text = normalize_text(body.get_text(""))
    if not title:
        h1 = re.search(r"^# (.+)$", text, flags=re.MULTILINE)
        title = h1.group(1) if h1 else None
    return text, title


# PDF ----------------------------------------------------------------------------------------


def _pdf_text(data: bytes) -> tuple[str, str | None, list[list[int]]]:
    """Text of a PDF's pages and the character span of each page in that text."""
    import logging

    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    if not data.lstrip().startswith(b"%PDF-"):
        raise DocumentRejected(RejectReason.CORRUPT_PDF, "not a PDF: the %PDF- header is missing")
    if b"%%EOF" not in data[-2048:]:
        raise DocumentRejected(
            RejectReason.CORRUPT_PDF, "truncated PDF: no %%EOF marker at the end"
        )
    logging.getLogger("pypdf").setLevel(
        logging.ERROR
    )  # pypdf warns loudly about recoverable quirks
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except (DependencyError, NotImplementedError) as err:
                raise DocumentRejected(RejectReason.ENCRYPTED_PDF, f"encrypted PDF: {err}") from err
            if not opened:
                raise DocumentRejected(
                    RejectReason.ENCRYPTED_PDF, "encrypted PDF: needs a password"
                )
        pages: list[str] = [normalize_text(page.extract_text() or "") for page in reader.pages]
        meta_title = reader.metadata.title if reader.metadata else None
    except DocumentRejected:
        raise
    except FileNotDecryptedError as err:
        raise DocumentRejected(RejectReason.ENCRYPTED_PDF, f"encrypted PDF: {err}") from err
    except (
        PdfReadError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RecursionError,
        OSError,
    ) as err:
        raise DocumentRejected(RejectReason.CORRUPT_PDF, f"unreadable PDF: {err}") from err
    spans: list[list[int]] = []
    parts: list[str] = []
    offset = 0
    for page_text in pages:
        if parts:
            offset += 2  # the "\n\n" joining pages
        spans.append([offset, offset + len(page_text)])
        parts.append(page_text)
        offset += len(page_text)
    text = "\n\n".join(parts)
    if not text.strip():
        raise DocumentRejected(
            RejectReason.NO_TEXT, "the PDF has no text layer (a scan?); OCR is not configured"
        )
    title = str(meta_title).strip() if meta_title and str(meta_title).strip() else None
    return text, title, spans
