"""The pure parts of retrieval: the text query, reciprocal rank fusion (as reranking and the
vector-only mode use it; the hybrid statement's own fusion and per-document cap are checked
against Postgres in tests/integration/test_hybrid_search.py), modes, reranking order, and the
`--explain` line."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from refinery.retrieval.search import (
    Fusion,
    Hit,
    Mode,
    RetrievalError,
    parse_mode,
    rerank,
    rrf,
)


def test_the_question_reaches_sql_only_as_a_bound_value():
    from sqlalchemy.dialects import postgresql

    from refinery.retrieval.search import _text_query_cte

    question = "x' | !y:* & (z) -- DROP TABLE chunks;"
    stmt = sa.select(_text_query_cte(question, 0.5).c.q)
    compiled = stmt.compile(dialect=postgresql.dialect())
    assert "DROP TABLE" not in str(compiled)
    assert question in compiled.params.values()
    assert "to_tsvector" in str(compiled) and "lexeme_stats" in str(compiled)


def test_reciprocal_rank_fusion():
    assert rrf([1, 1], [1.0, 1.0], 60) == pytest.approx(2 / 61)
    assert rrf([1, None], [1.0, 1.0], 60) == pytest.approx(1 / 61)
    assert rrf([None, None], [1.0, 1.0], 60) == 0.0
    # in both lists beats first in one list only
    assert rrf([3, 3], [1.0, 1.0], 60) > rrf([1, None], [1.0, 1.0], 60)
    # a zero weight drops a list; a heavier weight counts more
    assert rrf([1, 1], [1.0, 0.0], 60) == pytest.approx(1 / 61)
    assert rrf([None, 2], [1.0, 2.0], 10) == pytest.approx(2 / 12)


def test_modes_and_fusion_settings_are_checked():
    assert parse_mode("hybrid+rerank") is Mode.RERANK
    assert parse_mode(Mode.TEXT) is Mode.TEXT
    with pytest.raises(RetrievalError, match="unknown retrieval mode"):
        parse_mode("semantic")
    with pytest.raises(RetrievalError):
        Fusion(candidates=0)
    with pytest.raises(RetrievalError):
        Fusion(text_weight=-1)
    with pytest.raises(RetrievalError):
        Fusion(normalization=64)


class ByLength:
    name = "by-length"

    def score(self, question, passages):
        return [float(len(p)) for p in passages]


def test_rerank_fuses_the_rerankers_order_with_the_hybrid_order():
    hits = [
        Hit("c0", "a", "a.md", "A", 0, "short", 0.5, {}),
        Hit("c1", "b", "b.md", "B", 0, "a much longer passage", 0.5, {}),
        Hit("c2", "c", "c.md", "C", 0, "medium one", 0.5, {}),
    ]
    out = rerank("q", hits, ByLength(), rrf_k=1)
    # hybrid ranks 1,2,3; reranker ranks c1,c2,c0 -> fused: c1 1/3+1/2, c0 1/2+1/4, c2 1/4+1/3
    assert [h.chunk_id for h in out] == ["c1", "c0", "c2"]
    assert out[0].rerank_score == len("a much longer passage")
    assert out[0].fused == pytest.approx(1 / 3 + 1 / 2)


def test_explain_line_shows_both_ranks_and_the_fused_score():
    from orchestration.cli import explain_line

    line = explain_line(Hit("c", "d", "s", "t", 0, "x", 0.61234, {}, 3, None, None, 0.0161))
    assert "vector rank #3 (cosine 0.612)" in line
    assert "text rank —" in line
    assert "fused 0.01610" in line
    both = explain_line(Hit("c", "d", "s", "t", 0, "x", 0.5, {}, 1, 2, 0.25, 0.0325, 1.5))
    assert "text rank #2 (ts_rank_cd 0.2500)" in both and "rerank 1.500" in both
