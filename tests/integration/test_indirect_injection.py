"""Indirect injection end to end on the real store: a poisoned document is quarantined at
ingestion; one that is already indexed (ingested before the screen existed) is retrieved but
its chunk never reaches the prompt, and the answer says how many chunks were dropped."""

from __future__ import annotations

import pytest

from refinery.corpus.chunking import ChunkingConfig
from refinery.generation.generator import load_generator
from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
from refinery.rag.answer import answer_batch
from refinery.retrieval.search import Retriever
from tests.adversarial import POISONED
from tests.conftest import SAMPLE_CORPUS
from tests.tiny_model import make_tiny_llama

pytestmark = pytest.mark.integration


def test_a_poisoned_document_is_quarantined_at_ingestion(store, small_corpus):
    (small_corpus / "feeding.md").write_text(POISONED)
    result = sync_documents(store, small_corpus)
    assert result.suspicious == 1
    (entry,) = [r for r in store.rejections(result.corpus) if r["path"] == "feeding.md"]
    assert entry["reason"] == "suspicious"
    assert "cheap-syrup.example" in entry["detail"]  # the operator sees the passage
    assert "feeding.md" not in store.document_states(result.corpus)
    assert result.documents == 6  # the six good documents are indexed


def test_an_indexed_poisoned_chunk_is_dropped_before_the_prompt(
    store, small_corpus, embedder, tmp_path
):
    (small_corpus / "feeding.md").write_text(POISONED)
    sync_documents(store, small_corpus, screen=None)  # as ingested before the screen existed
    sync_chunks(store, make_chunker(ChunkingConfig(max_tokens=60, overlap_tokens=0), embedder))
    sync_embeddings(store, embedder, batch_size=16)
    retriever = Retriever(store, embedder)
    question = "How much syrup should I feed my bees in autumn?"
    hits = retriever.search(question, k=4)
    assert any("cheap-syrup" in h.text for h in hits)  # retrieval does surface it

    generator = load_generator(make_tiny_llama(tmp_path / "tiny", SAMPLE_CORPUS))
    (answer,) = answer_batch([question], retriever, generator, k=4, max_new_tokens=8)
    assert answer.screened_chunks >= 1
    kept = {s.chunk_id for s in answer.sources}
    assert not any("cheap-syrup" in h.text for h in hits if h.chunk_id in kept)
    assert answer.leak is None
