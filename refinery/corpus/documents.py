"""Corpus files → normalized text, or a clear reason why a file was rejected.

Formats: Markdown, plain text, HTML (boilerplate stripped) and PDF (text layer). A bad file
never stops a scan: ``scan_corpus`` yields a ``Rejection`` for it and goes on.

Every parser works within ``ParseLimits`` (nesting depth, elements, pages, objects, decompressed
size) checked by linear scans before the expensive work starts; a file over a limit is rejected
with its reason. The time budget per file cannot be enforced from inside a parser (a regex or
a C extension does not stop when asked), so ``refinery.corpus.isolation`` runs ``parse_bytes`` in
a worker process that is killed at the deadline.
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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refinery.core.lineage import sha256_hex

FORMATS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    # images: read by OCR (refinery.corpus.ocr)
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".webp": "image",
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
    CHANGED_WHILE_READING = "changed_while_reading"
    TOO_DEEP = "too_deep"
    TOO_MANY_ELEMENTS = "too_many_elements"
    TOO_MANY_PAGES = "too_many_pages"
    TOO_MANY_OBJECTS = "too_many_objects"
    DECOMPRESSION_BOMB = "decompression_bomb"
    ENTITY_EXPANSION = "entity_expansion"
    PARSE_TIMEOUT = "parse_timeout"
    TOO_MUCH_MEMORY = "too_much_memory"
    PARSER_CRASHED = "parser_crashed"
    CORRUPT_IMAGE = "corrupt_image"  # truncated, or not an image at all
    WRONG_TYPE = "wrong_type"  # a JPEG named .png
    OCR_UNAVAILABLE = "ocr_unavailable"  # an image, and no OCR engine on this machine
    SUSPICIOUS = "suspicious"  # the injection screen flagged a passage (refinery.safety.screening)


@dataclass(frozen=True)
class ParseLimits:
    """What one file may cost. Each limit is far above what real documents need (the sample
    corpus: HTML depth under 15, a few hundred elements, PDFs of a few pages)."""

    max_depth: int = (
        512  # HTML element nesting (browsers' parsers stop at 512 too); Markdown quotes
    )
    max_elements: int = 200_000  # HTML start tags
    max_pages: int = 2_000  # PDF pages
    max_objects: int = 200_000  # PDF objects, declared (/Size) or present
    max_decompressed_bytes: int = 64 * 1024 * 1024  # per PDF stream, and text extracted in all
    timeout_s: float = 60.0  # wall clock per file, enforced by the worker pool
    max_memory_mb: int = 2048  # address space of a parser worker
    max_image_pixels: int = 40_000_000  # per image (a 6000×6000 scan is 36 M)
    ocr_timeout_s: float = 45.0  # per image or scanned page, below the file's budget
    max_ocr_pages: int = 50  # PDF pages without a text layer that are OCR'd, per file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    mtime_ns: int | None = (
        None  # as the scan saw it: a file that moves on before it is read changed
    )


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
    return CorpusFile(
        path, source, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=UTC), st.st_mtime_ns
    )


# ---------------------------------------------------------------------------------------------
# Reading one file


def read_bytes(file: CorpusFile, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The file's bytes, read once. A file that is still being written (its size or modification
    time moved since the scan, or during the read) is rejected rather than parsed half-written:
    its new state is seen by the next run."""
    if file.size_bytes > max_bytes:
        raise DocumentRejected(
            RejectReason.TOO_LARGE,
            f"{file.size_bytes / 1e6:.1f} MB is over the {max_bytes / 1e6:.1f} MB limit per file",
        )
    try:
        with open(file.path, "rb") as fh:
            before = os.fstat(fh.fileno())
            data = fh.read(max_bytes + 1)
            after = os.fstat(fh.fileno())
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
    state = (after.st_size, after.st_mtime_ns)
    if state != (before.st_size, before.st_mtime_ns) or len(data) != after.st_size:
        raise DocumentRejected(
            RejectReason.CHANGED_WHILE_READING,
            f"the file changed while it was read ({before.st_size} → {after.st_size} bytes); "
            "it is read again once it stops changing",
        )
    if file.mtime_ns is not None and state != (file.size_bytes, file.mtime_ns):
        raise DocumentRejected(
            RejectReason.CHANGED_WHILE_READING,
            f"the file changed between the scan and the read ({file.size_bytes} → "
            f"{after.st_size} bytes); it is still being written? The next run reads it again",
        )
    return data


def parse_bytes(file: CorpusFile, data: bytes, limits: ParseLimits | None = None) -> ParsedDocument:
    """Extract and normalize the text of one file; raise ``DocumentRejected`` with the reason.

    Runs in the calling process: the limits are checked, the time budget is not (see
    ``refinery.corpus.isolation`` for that)."""
    limits = limits or ParseLimits()
    fmt = FORMATS[file.path.suffix.lower()]
    if not data.strip():
        raise DocumentRejected(RejectReason.EMPTY, "the file is empty")
    meta: dict[str, Any] = {}
    if fmt == "pdf":
        text, title, pages, ocr = _pdf_text(data, limits)
        meta["pages"] = pages
        if ocr:
            meta["ocr"] = {"engine": "tesseract", "regions": ocr}
    elif fmt == "image":
        from refinery.corpus.ocr import image_document

        text, meta = image_document(data, file.path.suffix, limits)
        title = None
    else:
        raw = _decode_text(data)
        _check_entities(raw, fmt)
        if fmt == "html":
            text, title = _html_text(raw, limits)
        else:
            if fmt == "markdown":
                _check_markdown_depth(raw, limits)
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


def parse_file(
    file: CorpusFile, max_bytes: int = DEFAULT_MAX_FILE_BYTES, limits: ParseLimits | None = None
) -> ParsedDocument:
    return parse_bytes(file, read_bytes(file, max_bytes), limits)


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


_VOID = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
        "keygen",
    ]
)
_RAW_TEXT = frozenset(("script", "style", "textarea", "title", "xmp", "plaintext"))
# Tags whose end tag may be left out: a new one closes the open one (a page of unclosed <p>
# or <li> is ordinary HTML, not deep nesting).
_OPTIONAL_END = frozenset(
    ["p", "li", "dt", "dd", "tr", "td", "th", "option", "thead", "tbody", "tfoot", "rb", "rt", "rp"]
)
_TAG_NAME = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:_-]*)")
_ENTITY_DECL = re.compile(r"<!ENTITY\s", re.IGNORECASE)
_MD_NESTING = re.compile(r"^[ \t]*((?:>[ \t]?)+)", re.MULTILINE)


def check_html_shape(raw: str, limits: ParseLimits) -> tuple[int, int]:
    """(elements, deepest nesting) of an HTML page, from one linear pass over its tags, before
    any tree is built; raises ``DocumentRejected`` past ``max_depth`` or ``max_elements``.

    Close to what html.parser builds: void elements and ``<x/>`` do not nest; an end tag closes
    back to its open element (and is ignored when none is open); comments and the contents of
    raw-text elements (script, style) hold no tags."""
    stack: list[str] = []
    open_count: dict[str, int] = {}
    elements = deepest = 0
    for closing, name, self_closing in _html_tags(raw):
        if closing:
            if open_count.get(name):
                _close_back_to(name, stack, open_count)
            continue
        elements += 1
        if elements > limits.max_elements:
            raise DocumentRejected(
                RejectReason.TOO_MANY_ELEMENTS,
                f"more than {limits.max_elements} HTML elements",
            )
        if name in _RAW_TEXT or name in _VOID or self_closing:
            continue
        if name in _OPTIONAL_END and open_count.get(name):
            # html.parser nests them; a browser closes the open one
            _close_back_to(name, stack, open_count)
        stack.append(name)
        open_count[name] = open_count.get(name, 0) + 1
        if len(stack) > deepest:
            deepest = len(stack)
            if deepest > limits.max_depth:
                raise DocumentRejected(
                    RejectReason.TOO_DEEP,
                    f"HTML elements nested more than {limits.max_depth} deep",
                )
    return elements, deepest


def _html_tags(raw: str) -> Iterator[tuple[bool, str, bool]]:
    """(closing, lowercase name, self-closing) of each tag of a page, in order, skipping
    comments and the contents of raw-text elements. Each ``<`` and ``>`` is searched for once,
    so unclosed comments or tags cannot make it quadratic."""
    lower = raw.lower()
    n = len(raw)
    pos = 0
    next_gt = -1
    while True:
        lt = raw.find("<", pos)
        if lt < 0 or lt + 1 >= n:
            return
        if raw.startswith("<!--", lt):
            end = raw.find("-->", lt + 4)
            if end < 0:
                return  # the rest of the page is a comment
            pos = end + 3
            continue
        if next_gt < lt:
            next_gt = raw.find(">", lt)
            if next_gt < 0:
                return  # no tag can close any more
        m = _TAG_NAME.match(raw, lt)
        if m is None or m.end() > next_gt + 1:
            pos = lt + 1
            continue
        closing, name = bool(m.group(1)), m.group(2).lower()
        pos = next_gt + 1
        yield closing, name, raw[next_gt - 1] == "/"
        if not closing and name in _RAW_TEXT:
            end = lower.find("</" + name, pos)
            if end < 0:
                return
            pos = end


def _close_back_to(name: str, stack: list[str], open_count: dict[str, int]) -> None:
    """Pop open elements down to and including the innermost ``name``."""
    while stack:
        top = stack.pop()
        open_count[top] -= 1
        if top == name:
            break


def _check_entities(raw: str, fmt: str) -> None:
    """HTML has no user-defined entities: a page that declares some is an XML entity-expansion
    bomb ("billion laughs") or not HTML at all. For text and Markdown only a file that starts
    as an XML document with declarations counts (prose may quote ``<!ENTITY``)."""
    head = raw.lstrip()[:64].lower()
    if fmt != "html" and not head.startswith(("<?xml", "<!doctype")):
        return
    found = len(_ENTITY_DECL.findall(raw, 0, 1_000_000))
    if found:
        raise DocumentRejected(
            RejectReason.ENTITY_EXPANSION,
            f"declares {found} XML entit{'y' if found == 1 else 'ies'} (an entity-expansion "
            "pattern); entities are not expanded and the file is not indexed",
        )


def _check_markdown_depth(raw: str, limits: ParseLimits) -> None:
    """Block quotes nested past ``max_depth`` (``>>>>…``): no document needs them."""
    for m in _MD_NESTING.finditer(raw):
        depth = m.group(1).count(">")
        if depth > limits.max_depth:
            raise DocumentRejected(
                RejectReason.TOO_DEEP, f"Markdown block quotes nested {depth} deep"
            )


def _affixes(name: str) -> tuple[str, str]:
    """What a tag adds around its text: headings and list items as Markdown, blocks as
    paragraphs, table cells separated by bars."""
    if len(name) == 2 and name[0] == "h" and name[1] in "123456":
        return "\n\n" + "#" * int(name[1]) + " ", "\n\n"
    if name == "li":
        return "\n- ", "\n"
    if name in ("td", "th"):
        return "", " | "
    if name in _HTML_BLOCKS:
        return "\n\n", "\n\n"
    return "", ""


def _html_text(raw: str, limits: ParseLimits | None = None) -> tuple[str, str | None]:
    """Readable text of an HTML page, with headings and list items kept as Markdown.

    One iterative walk over the tree, never modifying it: linear in the page whatever its
    depth (inserting markers into the tree, as this used to, walks the subtree at each insert
    and took minutes on 200,000 nested elements)."""
    from bs4 import BeautifulSoup, CData, NavigableString, Tag

    check_html_shape(raw, limits or ParseLimits())
    soup = BeautifulSoup(raw, "html.parser")
    title_tag = soup.find("title")
    title = title_tag.get_text(" ", strip=True) if title_tag else None
    root = soup.body or soup
    out: list[str] = []
    # Items: a (node, inside <pre>) pair to visit, or a string to emit on the way back up.
    stack: list[tuple[Any, bool] | str] = [(root, False)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        node, in_pre = item
        if isinstance(node, NavigableString):
            if type(node) is NavigableString or type(node) is CData:  # not comments, doctypes
                # Whitespace inside text nodes is layout, not content (except in <pre>).
                out.append(str(node) if in_pre else _WS.sub(" ", str(node)))
            continue
        if not isinstance(node, Tag):
            continue
        name = node.name
        if node is not root and (name in _HTML_DROP or name == "head"):
            continue
        if name == "br":
            out.append("\n")
            continue
        before, after = _affixes(name)
        out.append(before)
        stack.append(after)
        in_pre = in_pre or name == "pre"
        stack.extend((child, in_pre) for child in reversed(node.contents))
    text = normalize_text("".join(out))
    if not title:
        h1 = re.search(r"^# (.+)$", text, flags=re.MULTILINE)
        title = h1.group(1) if h1 else None
    return text, title


_WS = re.compile(r"\s+")


# PDF ----------------------------------------------------------------------------------------


_PDF_SIZE = re.compile(rb"/Size\s+(\d{1,15})")
_PDF_OBJ = re.compile(rb"\d{1,10}\s+\d{1,5}\s+obj\b")


def check_pdf_shape(data: bytes, limits: ParseLimits) -> int:
    """Objects a PDF declares (trailer /Size) or holds (``N G obj`` headers), from a scan of the
    raw bytes before pypdf reads it; raises past ``max_objects``."""
    declared = max((int(m) for m in _PDF_SIZE.findall(data)), default=0)
    present = sum(1 for _ in _PDF_OBJ.finditer(data))
    worst = max(declared - 1, present)  # /Size counts object 0, the free-list head
    if worst > limits.max_objects:
        raise DocumentRejected(
            RejectReason.TOO_MANY_OBJECTS,
            f"the PDF declares or holds {worst} objects; the limit is {limits.max_objects}",
        )
    return worst


def _limit_reason(err: Exception) -> RejectReason:
    """Which of our reasons a pypdf LimitReachedError is."""
    message = str(err).lower()
    if any(w in message for w in ("decompress", "output length", "stream length", "decoding work")):
        return RejectReason.DECOMPRESSION_BOMB
    if any(w in message for w in ("cycle", "loop", "self reference", "recovery")):
        return RejectReason.CORRUPT_PDF
    if "depth" in message:
        return RejectReason.TOO_DEEP
    return RejectReason.TOO_MANY_ELEMENTS


def _pdf_text(
    data: bytes, limits: ParseLimits | None = None
) -> tuple[str, str | None, list[list[int]], list[dict[str, Any]]]:
    """Text of a PDF's pages, the character span of each page in that text, and the OCR
    regions of the pages that had no text layer (scans), with spans relative to their page."""
    import logging

    limits = limits or ParseLimits()
    if not data.lstrip().startswith(b"%PDF-"):
        raise DocumentRejected(RejectReason.CORRUPT_PDF, "not a PDF: the %PDF- header is missing")
    if b"%%EOF" not in data[-2048:]:
        raise DocumentRejected(
            RejectReason.CORRUPT_PDF, "truncated PDF: no %%EOF marker at the end"
        )
    check_pdf_shape(data, limits)
    logging.getLogger("pypdf").setLevel(
        logging.ERROR
    )  # pypdf warns loudly about recoverable quirks
    pages, page_regions, meta_title = _read_pdf_pages(data, limits)
    text, spans, ocr = _join_pages(pages, page_regions)
    if not text.strip():
        raise DocumentRejected(
            RejectReason.NO_TEXT, "the PDF has no text layer, and OCR found no text in its images"
        )
    title = str(meta_title).strip() if meta_title and str(meta_title).strip() else None
    return text, title, spans, ocr


def _read_pdf_pages(
    data: bytes, limits: ParseLimits
) -> tuple[list[str], list[list[dict[str, Any]]], Any]:
    """(text of each page, OCR regions of each page, metadata title) as pypdf reads them under
    our limits; every pypdf failure becomes a ``DocumentRejected`` with its reason."""
    import pypdf
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, LimitReachedError, PdfReadError

    cap = limits.max_decompressed_bytes
    # pypdf's own per-stream limits, at ours (its defaults are 75 MB per stream).
    config = pypdf.get_configuration().with_overwrites(
        zlib_maximum_output_length=cap,
        lzw_maximum_output_length=cap,
        run_length_maximum_output_length=cap,
        array_based_stream_maximum_output_length=cap,
        maximum_declared_stream_length=cap,
        brotli_maximum_output_length=cap,
    )
    try:
        with pypdf.apply_configuration(config):
            reader = PdfReader(io.BytesIO(data), strict=False)
            _decrypt_unprotected(reader)
            n_pages = len(reader.pages)
            if n_pages > limits.max_pages:
                raise DocumentRejected(
                    RejectReason.TOO_MANY_PAGES,
                    f"{n_pages} pages; the limit is {limits.max_pages}",
                )
            pages, page_regions = _extract_pages(reader, limits, len(data))
            meta_title = reader.metadata.title if reader.metadata else None
    except DocumentRejected:
        raise
    except FileNotDecryptedError as err:
        raise DocumentRejected(RejectReason.ENCRYPTED_PDF, f"encrypted PDF: {err}") from err
    except LimitReachedError as err:
        raise DocumentRejected(_limit_reason(err), f"over a PDF limit: {err}") from err
    except MemoryError as err:
        raise DocumentRejected(
            RejectReason.TOO_MUCH_MEMORY, "the PDF needs more memory than a parser may use"
        ) from err
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
    return pages, page_regions, meta_title


def _decrypt_unprotected(reader: Any) -> None:
    """Open an encrypted PDF whose password is empty; reject one that needs a real password."""
    from pypdf.errors import DependencyError

    if not reader.is_encrypted:
        return
    try:
        opened = reader.decrypt("")
    except (DependencyError, NotImplementedError) as err:
        raise DocumentRejected(RejectReason.ENCRYPTED_PDF, f"encrypted PDF: {err}") from err
    if not opened:
        raise DocumentRejected(RejectReason.ENCRYPTED_PDF, "encrypted PDF: needs a password")


def _extract_pages(
    reader: Any, limits: ParseLimits, file_bytes: int
) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """Text of each page, OCR'd within ``max_ocr_pages`` where a page has no text layer; stops
    once the text outgrows ``max_decompressed_bytes`` (a small file that expands is a bomb)."""
    cap = limits.max_decompressed_bytes
    pages: list[str] = []
    page_regions: list[list[dict[str, Any]]] = []
    extracted = 0
    ocr_budget = limits.max_ocr_pages
    for number, page in enumerate(reader.pages, start=1):
        page_text = normalize_text(page.extract_text() or "")
        regions: list[dict[str, Any]] = []
        if not page_text.strip() and ocr_budget > 0:
            ocr_budget -= 1
            page_text, regions = _ocr_pdf_page(page, number, limits)
        pages.append(page_text)
        page_regions.append(regions)
        extracted += len(pages[-1])
        if extracted > cap:
            raise DocumentRejected(
                RejectReason.DECOMPRESSION_BOMB,
                f"more than {cap / 1e6:.0f} MB of text from a {file_bytes / 1e6:.1f} MB file",
            )
    return pages, page_regions


def _join_pages(
    pages: list[str], page_regions: list[list[dict[str, Any]]]
) -> tuple[str, list[list[int]], list[dict[str, Any]]]:
    """Pages joined by blank lines, each page's span in the joined text, and the OCR regions
    with their spans moved from page to document offsets."""
    spans: list[list[int]] = []
    parts: list[str] = []
    ocr: list[dict[str, Any]] = []
    offset = 0
    for page_text, regions in zip(pages, page_regions, strict=True):
        if parts:
            offset += 2  # the "\n\n" joining pages
        spans.append([offset, offset + len(page_text)])
        ocr += [{**r, "chars": [offset + r["chars"][0], offset + r["chars"][1]]} for r in regions]
        parts.append(page_text)
        offset += len(page_text)
    return "\n\n".join(parts), spans, ocr


def _ocr_pdf_page(page: Any, number: int, limits: ParseLimits) -> tuple[str, list[dict[str, Any]]]:
    """OCR text of a page without a text layer: its images, largest first (a scan is one image
    per page). Images that are not readable are skipped; the page may stay empty."""
    from refinery.corpus.ocr import lines_text, ocr_available, ocr_lines

    if not ocr_available():
        return "", []
    images = []
    try:
        for image_file in page.images:
            img = image_file.image
            if img is not None and img.width * img.height <= limits.max_image_pixels:
                images.append(img)
    except Exception:  # noqa: BLE001 - pypdf raises many kinds for broken image streams
        return "", []
    lines = []
    for img in sorted(images, key=lambda i: -i.width * i.height):
        lines += ocr_lines(img, timeout_s=limits.ocr_timeout_s)
    return lines_text(lines, page=number)
