"""Fine-tuning rows in the served RAG format (training/rag_sft.py), over a small in-memory
index that stands in for the retriever: which chunks each row shows, what it is taught to
say, and that evaluation questions stay out."""

from __future__ import annotations

from collections import Counter

import pytest

from refinery.rag.prompt import SYSTEM_PROMPT
from refinery.rag.text import content_words
from refinery.retrieval.search import Filters, Hit
from training.rag_sft import NO_ANSWER, RagSFTConfig, first_sentence, rag_rows

CHUNKS = [
    ("queen.md", "A virgin queen takes her first mating flight when she is 5 to 10 days old."),
    ("queen.md", "The queen stores sperm in her spermatheca for the rest of her life."),
    ("wax.md", "Beeswax is rendered by melting old comb in hot water and straining it."),
    ("wax.md", "Wax moths lay eggs in stored comb; freezing the frames kills them."),
    ("swarm.md", "Swarms leave the hive with the old queen in late spring."),
    ("feeding.md", "Feed a 2:1 sugar syrup in autumn so that colonies store it for winter."),
    ("feeding.md", "Fondant is fed in late winter when a colony is short of stores."),
]


class Index:
    """Ranks chunks by content words shared with the query (ties: index order)."""

    def __init__(self) -> None:
        self.hits = [
            Hit(f"c{i}", source, source, source.removesuffix(".md"), i, text, 0.5, {})
            for i, (source, text) in enumerate(CHUNKS)
        ]
        self.calls: list[tuple[str, int, Filters | None]] = []

    def search(self, query: str, k: int, filters: Filters | None) -> list[Hit]:
        self.calls.append((query, k, filters))
        words = set(content_words(query))
        pool = [h for h in self.hits if not filters or h.source in filters.sources]
        ranked = sorted(pool, key=lambda h: -len(words & set(content_words(h.text))))
        return ranked[:k]


ROWS = [
    {"id": "q1", "instruction": "How old is a virgin queen on her first mating flight?",
     "response": "She is usually 5 to 10 days old. Weather can delay it.", "source": "queen.md"},
    {"id": "q2", "instruction": "How is beeswax rendered from old comb?",
     "response": "By melting old comb in hot water and straining it.", "source": "wax.md"},
    {"id": "q3", "instruction": "What syrup should be fed in autumn?",
     "response": "A 2:1 sugar syrup.", "source": "feeding.md"},
]  # fmt: skip


def test_answer_rows_show_the_served_prompt_with_the_answering_chunk():
    rows, dropped = rag_rows(ROWS, Index().search, RagSFTConfig(k=2, no_answer_fraction=0.0))
    assert not dropped and [r["id"] for r in rows] == ["q1", "q2", "q3"]
    for row, source in zip(rows, ("queen.md", "wax.md", "feeding.md"), strict=True):
        system, user = row["prompt"]
        assert system["role"] == "system" and system["content"].startswith(SYSTEM_PROMPT)
        assert "confidential" in system["content"]  # a canary, as the service adds
        assert user["content"].startswith("Documents:\n[1] (")
        assert user["content"].endswith(f"Question: {row['instruction']}")
        assert row["kind"] == "answer" and len(row["chunk_ids"]) == 2
        assert source.removesuffix(".md") in user["content"]  # the answering document is there
    # The target is the answer's first sentence, numbers as the document gives them.
    assert rows[0]["response"] == "She is usually 5 to 10 days old."


def test_a_missed_answering_chunk_is_fetched_from_its_document():
    index = Index()
    row = {**ROWS[0], "instruction": "Which syrup do colonies store for winter?",
           "source": "queen.md"}  # fmt: skip
    (out,), _ = rag_rows([row], index.search, RagSFTConfig(k=2, no_answer_fraction=0.0))
    # The retriever's own top 2 hold no queen.md chunk: the best one for the answer is added.
    assert "c0" in out["chunk_ids"] and out["chunk_ids"][0] != "c0"
    assert any(f and f.sources == ("queen.md",) for _, _, f in index.calls)


def test_no_answer_rows_drop_the_whole_source_document_and_say_so():
    rows, _ = rag_rows(ROWS * 1, Index().search, RagSFTConfig(k=3, no_answer_fraction=0.999))
    assert rows and all(r["kind"] == "no_answer" for r in rows)
    for row in rows:
        assert row["response"] == NO_ANSWER
        source = row["source"].removesuffix(".md")
        assert f"({source})" not in row["prompt"][1]["content"]


def test_the_mix_follows_the_seed_and_the_fraction():
    many = [{**r, "id": f"{r['id']}-{i}", "instruction": f"{r['instruction']} ({i})"}
            for i in range(40) for r in ROWS]  # fmt: skip
    config = RagSFTConfig(k=2, no_answer_fraction=0.25, seed=7)
    first, _ = rag_rows(many, Index().search, config)
    again, _ = rag_rows(many, Index().search, config)
    assert first == again  # canaries included: drawn from the seed
    kinds = Counter(r["kind"] for r in first)
    assert 0.15 < kinds["no_answer"] / len(first) < 0.35
    other, _ = rag_rows(many, Index().search, RagSFTConfig(k=2, no_answer_fraction=0.25, seed=8))
    assert [r["kind"] for r in other] != [r["kind"] for r in first]


def test_questions_close_to_evaluation_questions_are_held_out():
    held_out = ["At what age does a virgin queen take her first mating flight?"]
    rows, dropped = rag_rows(ROWS, Index().search, RagSFTConfig(), held_out_questions=held_out)
    assert [r["id"] for r in rows] == ["q2", "q3"]
    assert dropped == Counter({"close_to_an_evaluation_question": 1})


def test_rows_without_any_chunk_are_dropped_and_counted():
    def empty(query: str, k: int, filters: Filters | None) -> list[Hit]:
        return []

    rows, dropped = rag_rows(ROWS, empty, RagSFTConfig(no_answer_fraction=0.0))
    assert rows == [] and dropped == Counter({"no_chunk_for_the_source": 3})


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("About 16 days. The cell is capped on day 8.", "About 16 days."),
        (
            "Drones, at about 24 days from egg to adult.",
            "Drones, at about 24 days from egg to adult.",
        ),
        ("Use a 2.5 mm mesh. It keeps mice out.", "Use a 2.5 mm mesh."),
    ],
)
def test_first_sentence(text, first):
    assert first_sentence(text) == first


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="no_answer_fraction"):
        RagSFTConfig(no_answer_fraction=1.0)
    with pytest.raises(ValueError, match="k must be"):
        RagSFTConfig(k=0)
