"""Hybrid retrieval against the embedded Postgres: full-text and vector search in one SQL
statement, the filters on both, diversity, the statement's reciprocal-rank fusion and
per-document cap against a plain reference (``reference_fusion``), the tsvector kept in step
by upserts and edits, contextual embeddings re-made when a heading changes, the ONNX query
embedder, `refinery query --explain`, and a RAG answer that says it does not know."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import sqlalchemy as sa

from refinery.core import schema
from refinery.corpus.chunking import ChunkingConfig
from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
from refinery.retrieval.search import Filters, Fusion, Mode, RetrievalError, Retriever, search

pytestmark = pytest.mark.integration

CHUNKS = ChunkingConfig(max_tokens=96, overlap_tokens=16)


def ingest(store, corpus, embedder, config=CHUNKS):
    sync_documents(store, corpus)
    sync_chunks(store, make_chunker(config, embedder))
    sync_embeddings(store, embedder, batch_size=16)
    return store.find_space(embedder.name)


def tsv_matches(store, word: str) -> set[str]:
    c = schema.chunks
    q = sa.func.to_tsquery(sa.text("'english'::regconfig"), word)
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(c.c.chunk_id).where(c.c.tsv.op("@@")(q))).scalars())


@pytest.mark.parametrize("mode", [Mode.VECTOR, Mode.TEXT, Mode.HYBRID])
def test_each_mode_returns_k_rows_with_filters_applied_to_both_lists(
    store, small_corpus, embedder, mode
):
    space = ingest(store, small_corpus, embedder)
    retriever = Retriever(store, embedder, mode=mode)
    hits = retriever.search("When does a virgin queen take her mating flight?", k=5)
    assert len(hits) == 5
    assert hits[0].source == "queen-mating-flight.txt"
    # a filter that excludes the best document applies to both lists: all PDFs, and k rows
    # wherever vectors take part (full text alone returns only chunks holding a query word that
    # is rare enough to be kept: Fusion.max_df)
    pdf = retriever.search(
        "queen mating flight colony hive", k=4, filters=Filters(formats=("pdf",))
    )
    assert pdf and {h.source for h in pdf} <= {"siting-an-apiary.pdf", "splitting-colonies.pdf"}
    assert len(pdf) == 4 if mode is not Mode.TEXT else len(pdf) <= 4
    only = retriever.search("queen", k=3, filters=Filters(sources=("*.md",)))
    assert only and all(h.source.endswith(".md") for h in only)
    if mode is Mode.HYBRID:
        assert any(h.vector_rank and h.text_rank for h in hits)
        assert all(h.fused is not None and h.fused > 0 for h in hits)
        assert [h.fused for h in hits] == sorted((h.fused for h in hits), reverse=True)
    if mode is Mode.TEXT:
        assert all(h.text_rank is not None and h.vector_rank is None for h in hits)
    assert space is not None


def test_text_search_finds_a_rare_exact_word_that_vectors_rank_lower(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    q = "spermatheca"
    vector = embedder.encode([q])[0]
    space = store.find_space(embedder.name)
    text = search(store.engine, space, None, q, 3, mode="text")  # no vector needed
    assert text and all("spermatheca" in h.text.lower() for h in text)
    assert text[0].score == 0.0  # no vector was given
    hybrid = search(store.engine, space, vector, q, 3, mode="hybrid")
    assert "spermatheca" in hybrid[0].text.lower()


def test_at_most_n_chunks_per_document(store, small_corpus, embedder):
    space = ingest(store, small_corpus, embedder)
    q = "varroa mites monitoring sugar roll alcohol wash"
    vector = embedder.encode([q])[0]
    free = search(store.engine, space, vector, q, 6)
    assert max(sum(h.doc_id == d for h in free) for d in {h.doc_id for h in free}) > 1
    for mode in (Mode.HYBRID, Mode.VECTOR, Mode.TEXT):
        capped = search(store.engine, space, vector, q, 6, mode=mode, max_per_doc=1)
        assert len({h.doc_id for h in capped}) == len(capped) >= (4 if mode is not Mode.TEXT else 2)
    with pytest.raises(RetrievalError):
        search(store.engine, space, vector, q, 6, max_per_doc=0)


def reference_fusion(
    lists: list[tuple[list[str], float]],
    doc_of: dict[str, str],
    rrf_k: int,
    k: int,
    max_per_doc: int | None,
) -> list[tuple[str, list[int | None], float]]:
    """What the hybrid statement should return, computed plainly: each candidate list is
    (chunk ids in rank order, weight); a chunk's fused score is the sum over the lists it is in
    of ``weight / (rrf_k + rank)``; best first (ties by chunk id), at most ``max_per_doc`` per
    document, the first k. Rows: (chunk id, its rank in each list, fused score)."""
    ranks: dict[str, list[int | None]] = {}
    for i, (ids, _) in enumerate(lists):
        for rank, chunk_id in enumerate(ids, start=1):
            ranks.setdefault(chunk_id, [None] * len(lists))[i] = rank
    fused = {
        chunk_id: sum(w / (rrf_k + r) for r, (_, w) in zip(rs, lists, strict=True) if r is not None)
        for chunk_id, rs in ranks.items()
    }
    kept: list[str] = []
    per_doc: dict[str, int] = {}
    for chunk_id in sorted(fused, key=lambda c: (-fused[c], c)):
        doc = doc_of[chunk_id]
        if max_per_doc is None or per_doc.get(doc, 0) < max_per_doc:
            per_doc[doc] = per_doc.get(doc, 0) + 1
            kept.append(chunk_id)
    return [(c, ranks[c], fused[c]) for c in kept[:k]]


def text_candidates(store, question: str, fusion: Fusion, n: int) -> list[str]:
    """The full-text candidate list on its own: chunks matching the question's tsquery, by
    ts_rank_cd, ties by chunk id."""
    from refinery.retrieval.search import _text_query_cte

    c = schema.chunks
    query = _text_query_cte(question, fusion.max_df)
    rank = sa.func.ts_rank_cd(c.c.tsv, query.c.q, fusion.normalization)
    stmt = (
        sa.select(c.c.chunk_id)
        .select_from(c.join(query, sa.true()))
        .where(c.c.tsv.op("@@")(query.c.q))
        .order_by(rank.desc(), c.c.chunk_id)
        .limit(n)
    )
    with store.engine.connect() as conn:
        return list(conn.execute(stmt).scalars())


def test_the_sql_fuses_by_reciprocal_rank_and_caps_each_document_as_the_reference_does(
    store, small_corpus, embedder
):
    from refinery.retrieval.search import search_vector

    space = ingest(store, small_corpus, embedder)
    c = schema.chunks
    with store.engine.connect() as conn:
        doc_of = dict(conn.execute(sa.select(c.c.chunk_id, c.c.doc_id)).all())
    k, checked = 6, 0
    questions = [
        "varroa mites monitoring sugar roll alcohol wash",
        "When does a virgin queen take her mating flight?",
    ]
    fusions = [Fusion(), Fusion(rrf_k=3, vector_weight=0.6, text_weight=1.0, candidates=8)]
    for question, fusion, max_per_doc in itertools.product(questions, fusions, (None, 1, 2)):
        vector = embedder.encode([question])[0]
        n = max(fusion.candidates, k * (3 if max_per_doc else 1))  # the statement's list length
        found = search_vector(store.engine, space, vector, n, exact=True)
        by_vector, by_text = (
            [h.chunk_id for h in found],
            text_candidates(store, question, fusion, n),
        )
        assert by_vector and by_text
        cases = {
            Mode.HYBRID: [(by_vector, fusion.vector_weight), (by_text, fusion.text_weight)],
            Mode.TEXT: [(by_text, 1.0)],  # one list: weight 1
        }
        if max_per_doc is not None:  # vector mode runs the statement only with a cap
            cases[Mode.VECTOR] = [(by_vector, 1.0)]
        for mode, lists in cases.items():
            hits = search(
                store.engine, space, vector, question, k, mode=mode, fusion=fusion,
                max_per_doc=max_per_doc, exact=True,
            )  # fmt: skip
            want = reference_fusion(lists, doc_of, fusion.rrf_k, k, max_per_doc)
            where = f"{question!r} {mode} {fusion} max_per_doc={max_per_doc}"
            assert [h.chunk_id for h in hits] == [chunk_id for chunk_id, _, _ in want], where
            for hit, (_, ranks, fused) in zip(hits, want, strict=True):
                assert hit.fused == pytest.approx(fused, rel=1e-9), where
                if mode is Mode.HYBRID:
                    assert [hit.vector_rank, hit.text_rank] == ranks, where
            checked += 1
    assert checked == len(questions) * len(fusions) * (2 + 3 + 3)


def test_tsvector_stays_in_step_after_upserts_and_edits(store, small_corpus, embedder):
    ingest(store, small_corpus, embedder)
    assert tsv_matches(store, "spermatheca")
    assert not tsv_matches(store, "zyzzyva")
    target = small_corpus / "queen-mating-flight.txt"
    target.write_text(
        target.read_text().replace("spermatheca", "zyzzyva organ")
        + "\n\nA late note about the zyzzyva.\n"
    )
    ingest(store, small_corpus, embedder)
    assert not tsv_matches(store, "spermatheca")
    found = tsv_matches(store, "zyzzyva")
    c = schema.chunks
    with store.engine.connect() as conn:
        texts = conn.execute(sa.select(c.c.text).where(c.c.chunk_id.in_(found))).scalars().all()
    assert found and all("zyzzyva" in t for t in texts)
    # every chunk's tsv is the one its current text and context give
    with store.engine.connect() as conn:
        stale = conn.execute(
            sa.text(
                "SELECT count(*) FROM chunks WHERE tsv IS DISTINCT FROM "
                "setweight(to_tsvector('english', context), 'B') || setweight(to_tsvector('english', text), 'A')"
            )
        ).scalar_one()
    assert stale == 0


def test_a_changed_heading_re_embeds_only_the_chunks_under_it(store, tmp_path, embedder):
    corpus = tmp_path / "c"
    corpus.mkdir()
    doc = corpus / "guide.md"
    smoke = "\n\n".join(
        f"Paragraph {i} about the smoker: light it with dry grass, keep it cool and puff gently."
        for i in range(4)
    )
    doc.write_text(f"# Guide\n\n## Feeding\n\nFeed sugar syrup in autumn.\n\n## Smoke\n\n{smoke}\n")
    config = ChunkingConfig(max_tokens=32, overlap_tokens=0)
    space = ingest(store, corpus, embedder, config)
    c = schema.chunks
    with store.engine.connect() as conn:
        before = dict(conn.execute(sa.select(c.c.chunk_id, c.c.context)).all())
    under_smoke = {cid for cid, ctx in before.items() if ctx == "Guide > Smoke"}
    assert len(under_smoke) >= 3
    doc.write_text(doc.read_text().replace("## Smoke", "## Using the smoker"))
    sync_documents(store, corpus)
    sync_chunks(store, make_chunker(config, embedder))
    with store.engine.connect() as conn:
        after = dict(conn.execute(sa.select(c.c.chunk_id, c.c.context)).all())
    kept = under_smoke & set(after)  # same text, same id: only the context changed
    assert len(kept) >= 2 and all(after[cid] == "Guide > Using the smoker" for cid in kept)
    stale = store.count_missing(space)
    assert stale >= len(kept)  # their vectors were made with the old heading
    assert sync_embeddings(store, embedder).embedded == stale
    assert store.integrity(space).stale == 0


def test_switching_context_off_is_a_new_index_version(store, small_corpus, embedder):
    space = ingest(store, small_corpus, embedder)
    n = store.count_chunks()
    plain = ChunkingConfig(max_tokens=96, overlap_tokens=16, contextual=False)
    result = sync_chunks(store, make_chunker(plain, embedder))
    assert result.documents_chunked == 6  # every document re-chunked
    assert store.count_chunks() == n  # same text, same ids
    assert store.count_missing(space) == n  # but every vector is stale: re-embedded
    assert sync_embeddings(store, embedder, batch_size=32).embedded == n


def test_onnx_query_embedder_agrees_with_the_model(tmp_path, embedder):
    from refinery.retrieval.onnx_embedding import OnnxEmbedder, ensure_export, find_export

    texts = ["How do I count varroa mites?", "short", "a longer text about bees " * 40]
    before = embedder.encode(texts)
    folder = ensure_export(tmp_path, embedder)
    # Exporting leaves the model as it was (in eval mode: no dropout, the same vectors).
    assert not embedder.transformer.training
    assert np.sum(embedder.encode(texts) * before, axis=1).min() > 0.9999
    assert find_export(tmp_path, embedder.ref) == folder
    assert ensure_export(tmp_path, embedder) == folder  # made once
    onnx = OnnxEmbedder(folder)
    cos = np.sum(onnx.encode(texts) * embedder.encode(texts), axis=1)
    assert cos.min() > 0.9999
    assert onnx.name == embedder.name and onnx.dim == 384


def test_query_explain_from_the_command_line(tmp_path, small_corpus):
    from tests.support import refinery

    home = tmp_path / "home"
    refinery("ingest", "--corpus", str(small_corpus), home=home, timeout=600)
    out = refinery("query", "When do queens mate?", "-k", "3", "--explain", home=home).stdout
    assert out.count("vector rank") == 3 and "text rank" in out and "fused" in out
    assert "queen-mating-flight.txt" in out
    # vector-only stays selectable
    only = refinery("query", "When do queens mate?", "--mode", "vector", "--json", home=home).stdout
    import json

    rows = json.loads(only)
    assert rows and all(r["text_rank"] is None for r in rows)


def test_rag_answer_below_the_threshold_says_it_does_not_know(store, small_corpus, embedder):
    from refinery.rag.answer import make_answer
    from refinery.rag.confidence import load_calibration

    ingest(store, small_corpus, embedder)
    hits = Retriever(store, embedder).search("What is the airspeed of an unladen swallow?", k=3)
    calibration = load_calibration()
    assert calibration is not None
    answer = make_answer(
        "What is the airspeed of an unladen swallow?", hits, "About 24 mph.", 50, 5,
        calibration=calibration, min_confidence=0.99,
    )  # fmt: skip
    assert answer.abstained and answer.answer.startswith("I don't know")
    assert answer.sources and all(s.source in answer.answer for s in answer.sources)
    never = make_answer(
        "q", hits, "About 24 mph.", 50, 5, calibration=calibration, min_confidence=0
    )
    assert never.answer == "About 24 mph."
