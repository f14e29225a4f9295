"""Token-aware recursive splitting with overlap, and the stable ids of the chunks it makes.

Splitting is done by ``semantic-text-splitter`` (Rust): it splits at the largest semantic
boundary that fits (Markdown sections, paragraphs, sentences, words), measuring size in tokens
of the embedding model's own tokenizer, so no chunk is truncated by the embedder.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from refinery.lineage import sha256_hex


@dataclass(frozen=True)
class ChunkingConfig:
    max_tokens: int = 200
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be at least 16, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens:
            raise ValueError(
                f"overlap_tokens must be >= 0 and < max_tokens ({self.max_tokens}), "
                f"got {self.overlap_tokens}"
            )

    def fingerprint(self, tokenizer_name: str) -> str:
        """Changes when re-chunking would give different chunks (config, tokenizer, splitter)."""
        payload = {**asdict(self), "tokenizer": tokenizer_name, "splitter": SPLITTER_VERSION}
        return sha256_hex(json.dumps(payload, sort_keys=True))


SPLITTER_VERSION = "semantic-text-splitter/1"


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    source: str
    position: int
    text: str
    content_hash: str
    token_count: int
    char_start: int
    char_end: int
    meta: dict[str, Any]


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
    ) -> list[Chunk]:
        # HTML is extracted to Markdown-like text (headings, lists), so it splits the same way.
        splitter = (
            self._markdown_splitter if format in ("markdown", "html") else self._text_splitter
        )
        page_starts = [start for start, _ in pages] if pages else None
        chunks: list[Chunk] = []
        seen: dict[str, int] = {}
        for position, (start, piece) in enumerate(splitter.chunk_indices(text)):
            occurrence = seen.get(piece, 0)
            seen[piece] = occurrence + 1
            meta: dict[str, Any] = {"title": title, "format": format}
            if page_starts:
                # 1-based page numbers the chunk spans.
                first = bisect.bisect_right(page_starts, start)
                last = bisect.bisect_right(page_starts, start + len(piece) - 1)
                meta["pages"] = list(range(first, last + 1))
            chunks.append(
                Chunk(
                    chunk_id=chunk_id(doc_id, piece, occurrence),
                    doc_id=doc_id,
                    source=source,
                    position=position,
                    text=piece,
                    content_hash=sha256_hex(piece),
                    token_count=self.count_tokens(piece),
                    char_start=start,
                    char_end=start + len(piece),
                    meta=meta,
                )
            )
        return chunks
