"""Token-aware recursive splitting with overlap, and the stable ids of the chunks it makes.

Splitting is done by ``semantic-text-splitter`` (Rust): it splits at the largest semantic
boundary that fits (Markdown sections, paragraphs, sentences, words), measuring size in tokens
of the embedding model's own tokenizer, so no chunk is truncated by the embedder.

Contextual chunks: what is embedded for a chunk is its context, the document's title and the
headings above the chunk ("Title > Section > Subsection"), then a blank line, then the chunk's
text (``embedding_text``). The stored chunk text stays clean for prompts and display; the
context is stored beside it (``chunks.context``), so the embedded form is always derivable, and
``content_hash`` is the hash of that embedded form (a changed heading re-embeds the chunk).
Headings come from Markdown (``#`` and underlined), from HTML (extracted as Markdown), and in
plain text and PDF text from short title-like lines standing alone between blank lines.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from refinery.core.lineage import sha256_hex


@dataclass(frozen=True)
class ChunkingConfig:
    max_tokens: int = 128
    overlap_tokens: int = 24
    # Embed title + section path in front of each chunk (see the module docstring).
    contextual: bool = True
    # At most this many tokens of context; the chunk itself keeps its max_tokens.
    context_tokens: int = 40

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be at least 16, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens:
            raise ValueError(
                f"overlap_tokens must be >= 0 and < max_tokens ({self.max_tokens}), "
                f"got {self.overlap_tokens}"
            )
        if self.contextual and not 4 <= self.context_tokens <= 128:
            raise ValueError(f"context_tokens must be between 4 and 128, got {self.context_tokens}")

    @property
    def embedded_tokens(self) -> int:
        """The most tokens one embedded chunk can hold (context and chunk)."""
        return self.max_tokens + (self.context_tokens if self.contextual else 0)

    def fingerprint(self, tokenizer_name: str) -> str:
        """Changes when re-chunking would give different chunks (config, tokenizer, splitter)."""
        payload: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "overlap_tokens": self.overlap_tokens,
            "tokenizer": tokenizer_name,
            "splitter": SPLITTER_VERSION,
        }
        if self.contextual:  # a new way of building the context is a new index version
            payload["context"] = [CONTEXT_VERSION, self.context_tokens]
        return sha256_hex(json.dumps(payload, sort_keys=True))


SPLITTER_VERSION = "semantic-text-splitter/1"
CONTEXT_VERSION = "title+headings/1"
CONTEXT_SEPARATOR = " > "


def embedding_text(context: str, text: str) -> str:
    """What the embedding model reads for a chunk: its context, a blank line, its text."""
    return f"{context}\n\n{text}" if context else text


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    source: str
    position: int
    text: str
    content_hash: str  # sha256 of embedding_text(context, text)
    token_count: int
    char_start: int
    char_end: int
    meta: dict[str, Any]
    context: str = ""

    @property
    def embedded(self) -> str:
        return embedding_text(self.context, self.text)


def chunk_id(doc_id: str, text: str, occurrence: int = 0) -> str:
    """Id from the document and the chunk's own text (and which repeat of that text it is).

    Not from its position: inserting a paragraph near the top of a document changes the ids of
    the chunks it touches, not of every chunk after it, so their embeddings are kept.
    """
    return sha256_hex(f"chunk\x00{doc_id}\x00{occurrence}\x00{text}")[:32]


class Chunker:
    """Splits documents into chunks of at most ``max_tokens`` tokens with ``overlap_tokens``."""

    def __init__(self, config: ChunkingConfig, tokenizer: Any, tokenizer_name: str = ""):
        self.config = config
        self.tokenizer_name = tokenizer_name
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer: the embedding model's own
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @cached_property
    def _text_splitter(self) -> Any:
        from semantic_text_splitter import TextSplitter

        return TextSplitter.from_huggingface_tokenizer(
            self.tokenizer, self.config.max_tokens, self.config.overlap_tokens
        )

    @cached_property
    def _markdown_splitter(self) -> Any:
        from semantic_text_splitter import MarkdownSplitter

        return MarkdownSplitter.from_huggingface_tokenizer(
            self.tokenizer, self.config.max_tokens, self.config.overlap_tokens
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def split(
        self,
        *,
        doc_id: str,
        source: str,
        text: str,
        format: str,
        title: str = "",
        pages: list[list[int]] | None = None,
        regions: list[dict[str, Any]] | None = None,
    ) -> list[Chunk]:
        """``regions``: where OCR'd lines were on their page (``chars``: their span in
        ``text``); a chunk lists the regions its text came from."""
        # HTML is extracted to Markdown-like text (headings, lists), so it splits the same way.
        splitter = (
            self._markdown_splitter if format in ("markdown", "html") else self._text_splitter
        )
        page_starts = [start for start, _ in pages] if pages else None
        chunks: list[Chunk] = []
        seen: dict[str, int] = {}
        paths = SectionPaths(headings(text, format)) if self.config.contextual else None
        for position, (start, piece) in enumerate(splitter.chunk_indices(text)):
            occurrence = seen.get(piece, 0)
            seen[piece] = occurrence + 1
            meta: dict[str, Any] = {"title": title, "format": format}
            if page_starts:
                # 1-based page numbers the chunk spans.
                first = bisect.bisect_right(page_starts, start)
                last = bisect.bisect_right(page_starts, start + len(piece) - 1)
                meta["pages"] = list(range(first, last + 1))
            if regions:
                end = start + len(piece)
                meta["regions"] = [
                    {"page": r["page"], "box": r["box"]}
                    for r in regions
                    if r["chars"][0] < end and r["chars"][1] > start
                ]
            context = self.context(title, paths.at(start)) if paths is not None else ""
            chunks.append(
                Chunk(
                    chunk_id=chunk_id(doc_id, piece, occurrence),
                    doc_id=doc_id,
                    source=source,
                    position=position,
                    text=piece,
                    content_hash=sha256_hex(embedding_text(context, piece)),
                    token_count=self.count_tokens(piece),
                    char_start=start,
                    char_end=start + len(piece),
                    meta=meta,
                    context=context,
                )
            )
        return chunks

    def context(self, title: str, path: list[str]) -> str:
        """``Title > Section > Subsection``, within ``context_tokens`` (middle headings go
        first, then the end is cut)."""
        parts = [p for p in [title.strip(), *path] if p]
        # A first heading that repeats the title adds nothing.
        if len(parts) > 1 and _same_words(parts[0], parts[1]):
            del parts[1]
        budget = self.config.context_tokens
        context = CONTEXT_SEPARATOR.join(parts)
        while len(parts) > 2 and self.count_tokens(context) > budget:
            del parts[1]
            context = CONTEXT_SEPARATOR.join(parts)
        enc = self.tokenizer.encode(context, add_special_tokens=False)
        if len(enc.ids) > budget:
            context = context[: enc.offsets[budget - 1][1]]
        return context


def _same_words(a: str, b: str) -> bool:
    return re.findall(r"\w+", a.lower()) == re.findall(r"\w+", b.lower())


@dataclass(frozen=True)
class Heading:
    offset: int  # where the heading's line starts in the text
    level: int  # 1 = top
    text: str


_ATX = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_SETEXT_RULE = re.compile(r"^(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^(```|~~~)")
_SENTENCE_END = re.compile(r"[.,;:!?)\]\"']$")
_LIST_ITEM = re.compile(r"^([-*+•]|\d+[.)])\s")


def headings(text: str, format: str) -> list[Heading]:
    """The headings of a document's text, in order. Markdown (and HTML, extracted as Markdown):
    ``#`` headings and underlined ones. Plain text and PDF: a short title-like line (no final
    punctuation, not a list item, at most 12 words) alone between blank lines, or underlined;
    in PDF text also such a line (at most 60 characters) between a finished sentence and the
    start of the next."""
    lines = text.split("\n")
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    out: list[Heading] = []
    in_fence = False
    markdown = format in ("markdown", "html")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if _FENCE.match(stripped):
            in_fence = not in_fence
            continue
        if in_fence or not stripped:
            continue
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        prev = lines[i - 1].strip() if i > 0 else ""
        atx = _ATX.match(stripped)
        if atx:
            out.append(Heading(offsets[i], len(atx.group(1)), atx.group(2).strip()))
        elif nxt and _SETEXT_RULE.match(nxt) and len(stripped) <= 120 and not prev:
            out.append(Heading(offsets[i], 1 if nxt.startswith("=") else 2, stripped))
        elif not markdown and _title_like(stripped):
            alone = not prev and not nxt
            # PDF text has no blank line around a heading: a short line after a finished
            # sentence, followed by the start of one.
            pdf_line = (
                format == "pdf"
                and len(stripped) <= 60
                and (not prev or prev.endswith((".", "!", "?", ":")))
                and bool(nxt)
                and (nxt[0].isupper() or nxt.startswith("- "))
            )
            if alone or pdf_line:
                out.append(Heading(offsets[i], 2, stripped))
    return out


def _title_like(line: str) -> bool:
    return (
        len(line) <= 80
        and len(line.split()) <= 12
        and not _SENTENCE_END.search(line)
        and not _LIST_ITEM.match(line)
        and not _SETEXT_RULE.match(line)
        and line[0].isupper()
    )


class SectionPaths:
    """The headings in force at increasing offsets of one text (chunks come in order)."""

    def __init__(self, found: list[Heading]):
        self._headings = found
        self._next = 0
        self._stack: list[Heading] = []

    def at(self, offset: int) -> list[str]:
        if offset < (self._stack[-1].offset if self._stack else -1):
            self._next, self._stack = 0, []  # went back: rebuild from the top
        while self._next < len(self._headings) and self._headings[self._next].offset <= offset:
            heading = self._headings[self._next]
            while self._stack and self._stack[-1].level >= heading.level:
                self._stack.pop()
            self._stack.append(heading)
            self._next += 1
        return [h.text for h in self._stack]


def section_path(text: str, format: str, offset: int) -> list[str]:
    """The headings above ``offset`` in ``text`` (outermost first)."""
    return SectionPaths(headings(text, format)).at(offset)
