"""Token-aware splitting and stable chunk ids, with the default embedding model's tokenizer."""

from __future__ import annotations

import itertools

import pytest

from refinery.corpus.chunking import Chunker, ChunkingConfig, chunk_id
from refinery.retrieval.embedding import Embedder
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
    # A paragraph added at the top changes the first chunks, not the ids of the others: they
    # keep their ids although every one of them moved (new position, new offsets).
    preface = "# New preface\n\nA short new paragraph about hive scales.\n\n"
    edited = split(chunker, preface + TEXT)
    old = {c.chunk_id: c for c in first}
    kept = [c for c in edited if c.chunk_id in old]
    new = [c.chunk_id for c in edited if c.chunk_id not in old]
    assert 1 <= len(new) <= 3 and len(kept) >= len(first) - 3
    assert [c.chunk_id for c in edited[: len(new)]] == new  # only the top changed
    shift = len(edited) - len(first)  # chunks added at the top, less those they replaced
    for c in kept:
        was = old[c.chunk_id]
        assert c.text == was.text
        assert (c.position, c.char_start) == (was.position + shift, was.char_start + len(preface))


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
    from refinery.ingestion.sync import make_chunker

    with pytest.raises(ValueError, match="truncated"):
        make_chunker(ChunkingConfig(max_tokens=300, overlap_tokens=0), Embedder())


# ---- contextual chunks --------------------------------------------------------------------------


def test_headings_of_markdown_skip_code_fences_and_read_underlines():
    from refinery.corpus.chunking import headings

    text = (
        "Guide\n=====\n\nIntro.\n\n## Setup\n\nText.\n\n```\n# not a heading\n```\n\n"
        "Details\n-------\n\n### Deep one ##\n\nMore."
    )
    assert [(h.level, h.text) for h in headings(text, "markdown")] == [
        (1, "Guide"),
        (2, "Setup"),
        (2, "Details"),
        (3, "Deep one"),
    ]
    assert all(
        text[h.offset :].startswith(h.text.split()[0]) or text[h.offset] == "#"
        for h in headings(text, "markdown")
    )


def test_plain_text_headings_are_short_title_lines_standing_alone():
    from refinery.corpus.chunking import headings

    text = (
        "Storing Sperm\n\nThe queen stores sperm.\n\n- A list item\n\n"
        "A sentence that ends with a period.\n\nWhen to expect eggs\n\nAfter two weeks."
    )
    assert [h.text for h in headings(text, "text")] == ["Storing Sperm", "When to expect eggs"]
    # Markdown documents only take marked headings.
    assert headings(text, "markdown") == []


def test_section_path_follows_the_heading_levels():
    from refinery.corpus.chunking import section_path

    text = "# A\n\nx\n\n## B\n\ny\n\n### C\n\nz\n\n## D\n\nw"
    assert section_path(text, "markdown", text.index("x")) == ["A"]
    assert section_path(text, "markdown", text.index("z")) == ["A", "B", "C"]
    assert section_path(text, "markdown", text.index("w")) == ["A", "D"]


def test_contextual_chunks_keep_clean_text_and_embed_title_and_section(tokenizer):
    from refinery.core.lineage import sha256_hex
    from refinery.corpus.chunking import embedding_text

    chunker = make(tokenizer, max_tokens=64, overlap=8)
    chunks = chunker.split(
        doc_id="d1",
        source="a.md",
        text=TEXT,
        format="markdown",
        title="Colony Castes and Development Times",
    )
    queen = next(
        c
        for c in chunks
        if "## The queen" in TEXT[: c.char_start + 1] and c.char_start > TEXT.index("## The queen")
    )
    assert queen.context == "Colony Castes and Development Times > The queen"  # title not repeated
    assert TEXT[queen.char_start : queen.char_end] == queen.text  # the text stays clean
    assert (
        queen.embedded
        == embedding_text(queen.context, queen.text)
        == f"{queen.context}\n\n{queen.text}"
    )
    assert queen.content_hash == sha256_hex(queen.embedded)
    assert all(chunker.count_tokens(c.context) <= chunker.config.context_tokens for c in chunks)


def test_context_is_cut_to_its_token_budget(tokenizer):
    chunker = Chunker(ChunkingConfig(64, 8, context_tokens=8), tokenizer, "m")
    context = chunker.context(
        "A very long document title about many things", ["One", "Two", "Three"]
    )
    assert chunker.count_tokens(context) <= 8
    assert context.startswith("A very long")


def test_plain_chunks_have_no_context_and_hash_their_text(tokenizer):
    from refinery.core.lineage import sha256_hex

    chunks = Chunker(ChunkingConfig(64, 8, contextual=False), tokenizer, "m").split(
        doc_id="d1", source="a.md", text=TEXT, format="markdown", title="T"
    )
    assert all(c.context == "" and c.content_hash == sha256_hex(c.text) for c in chunks)


def test_contextual_config_is_a_new_index_version():
    plain, contextual = ChunkingConfig(200, 32, contextual=False), ChunkingConfig(200, 32)
    assert plain.fingerprint("m") != contextual.fingerprint("m")
    assert contextual.fingerprint("m") != ChunkingConfig(200, 32, context_tokens=20).fingerprint(
        "m"
    )
    assert contextual.embedded_tokens == 200 + contextual.context_tokens
    with pytest.raises(ValueError, match="context_tokens"):
        ChunkingConfig(200, 32, context_tokens=2)


def test_pdf_headings_are_short_lines_between_sentences():
    from refinery.corpus.chunking import headings

    text = (
        "Siting an Apiary\nWhere you put hives matters, and\nhow you get on with neighbours.\n"
        "Sun and shelter\nBees like the morning sun. Shelter from\nthe wind helps.\nWater\n"
        "Colonies need water.\n- a list item\nends here"
    )
    assert [h.text for h in headings(text, "pdf")] == [
        "Siting an Apiary",
        "Sun and shelter",
        "Water",
    ]
    # the same lines in plain text are not headings: they do not stand alone
    assert headings(text, "text") == []
