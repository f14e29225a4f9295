"""Token-aware splitting and stable chunk ids, with the default embedding model's tokenizer."""

from __future__ import annotations

import itertools

import pytest

from serving.corpus.chunking import Chunker, ChunkingConfig, chunk_id
from serving.corpus.embedding import Embedder
from tests.conftest import SAMPLE_CORPUS


@pytest.fixture(scope="module")
def tokenizer():
    return Embedder().tokenizer()  # from tokenizer.json on disk: the model is not loaded


def make(tokenizer, max_tokens=64, overlap=8) -> Chunker:
    return Chunker(
        ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap), tokenizer, "minilm"
    )


TEXT = (SAMPLE_CORPUS / "colony-castes-and-development.md").read_text()


def split(chunker: Chunker, text: str = TEXT, fmt: str = "markdown", doc_id: str = "d1"):
    return chunker.split(doc_id=doc_id, source="a.md", text=text, format=fmt, title="T")


def test_chunks_fit_the_token_budget_and_cover_the_text(tokenizer):
    chunker = make(tokenizer, max_tokens=64, overlap=8)
    chunks = split(chunker)
    assert len(chunks) > 5
    assert all(c.token_count <= 64 for c in chunks)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert TEXT[c.char_start : c.char_end] == c.text
    # every word of the document lands in some chunk
    covered = set()
    for c in chunks:
        covered.update(range(c.char_start, c.char_end))
    words_missing = [i for i, ch in enumerate(TEXT) if not ch.isspace() and i not in covered]
    assert not words_missing


def test_neighbouring_chunks_overlap_by_at_most_the_budget(tokenizer):
    chunker = make(tokenizer, max_tokens=48, overlap=16)
    chunks = split(chunker, fmt="text")
    shared = [
        TEXT[b.char_start : a.char_end]
        for a, b in itertools.pairwise(chunks)
        if b.char_start < a.char_end
    ]
    # Overlap is a budget: whole sentences or words that fit in it are repeated at a boundary.
    assert len(shared) >= 3
    assert all(chunker.count_tokens(s) <= 16 for s in shared)


def test_no_overlap_when_zero(tokenizer):
    chunks = split(make(tokenizer, max_tokens=48, overlap=0), fmt="text")
    assert all(b.char_start >= a.char_end for a, b in itertools.pairwise(chunks))


def test_ids_are_stable_and_depend_on_text_not_position(tokenizer):
    chunker = make(tokenizer)
    first = split(chunker)
    again = split(chunker)
    assert [c.chunk_id for c in first] == [c.chunk_id for c in again]
    # A paragraph added at the top changes the first chunks, not the ids of the others.
    edited = split(chunker, "# New preface\n\nA short new paragraph about hive scales.\n\n" + TEXT)
    old_ids = {c.chunk_id for c in first}
    kept = [c for c in edited if c.chunk_id in old_ids]
    assert len(kept) >= len(first) - 3
    assert [c.position for c in kept] != [c.position for c in first[: len(kept)]] or len(
        kept
    ) < len(first)


def test_repeated_text_gets_distinct_ids(tokenizer):
    text = "\n\n".join(["Bees make honey from nectar. " * 10] * 3)
    chunks = split(make(tokenizer, max_tokens=32, overlap=0), text, fmt="text")
    ids = [c.chunk_id for c in chunks]
    assert len(ids) == len(set(ids))
    assert chunk_id("d", "x", 0) != chunk_id("d", "x", 1) != chunk_id("e", "x", 1)


def test_pdf_chunks_know_their_pages(tokenizer):
    one = "Page one talks about hive stands, their height, their level and their drainage."
    two = "Page two talks about water sources, their distance, their safety and the neighbours."
    text = f"{one}\n\n{two}"
    pages = [[0, len(one)], [len(one) + 2, len(text)]]
    chunks = make(tokenizer, max_tokens=16, overlap=0).split(
        doc_id="d", source="x.pdf", text=text, format="pdf", pages=pages
    )
    assert chunks[0].meta["pages"] == [1]
    assert chunks[-1].meta["pages"] == [2]


@pytest.mark.parametrize(("size", "overlap"), [(8, 0), (64, 64), (64, 100), (64, -1)])
def test_impossible_configs_are_refused(size, overlap):
    with pytest.raises(ValueError, match=r"max_tokens|overlap_tokens"):
        ChunkingConfig(max_tokens=size, overlap_tokens=overlap)


def test_fingerprint_changes_with_config_and_tokenizer():
    a = ChunkingConfig(200, 32)
    assert a.fingerprint("m") == ChunkingConfig(200, 32).fingerprint("m")
    assert a.fingerprint("m") != ChunkingConfig(200, 16).fingerprint("m")
    assert a.fingerprint("m") != a.fingerprint("other-model")


def test_chunks_longer_than_the_model_reads_are_refused():
    from serving.corpus.ingestion import make_chunker

    with pytest.raises(ValueError, match="truncated"):
        make_chunker(ChunkingConfig(max_tokens=300, overlap_tokens=0), Embedder())
