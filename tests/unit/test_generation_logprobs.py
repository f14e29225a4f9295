"""Per-token log-probabilities from generation (asked for, never by default), checked against
a teacher-forced forward pass; and the query-likelihood reranker on the same tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_CORPUS
from tests.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from refinery.generation.generator import Generator

    folder: Path = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", SAMPLE_CORPUS)
    return Generator(folder)


def test_logprobs_only_when_asked_and_equal_to_a_forward_pass(generator):
    import torch

    prompts = ["How do bees make honey?", "What is a drone?"]
    plain = generator.generate(prompts, max_new_tokens=6)
    assert all(c.token_logprobs is None for c in plain)
    scored = generator.generate(prompts, max_new_tokens=6, logprobs=True)
    assert [c.text for c in scored] == [c.text for c in plain]  # same greedy answers
    for prompt, c in zip(prompts, scored, strict=True):
        assert c.token_logprobs is not None and len(c.token_logprobs) == c.completion_tokens
        assert all(lp <= 0 for lp in c.token_logprobs)
        # teacher forcing: the generated tokens' log-probabilities from one forward pass
        enc = generator.tokenizer(
            [generator.chat_text(prompt)], return_tensors="pt", add_special_tokens=False
        )
        with torch.inference_mode():
            out = generator.model.generate(**enc, **generator._decoding(6, 0.0, 1.0))
        new = out[0, enc["input_ids"].shape[1] :][: c.completion_tokens]  # (tokens,)
        ids = out[:, : enc["input_ids"].shape[1] + len(new)]
        logits = generator.logits(ids, torch.ones_like(ids))  # (1, seq, vocab)
        logp = torch.log_softmax(logits[0, enc["input_ids"].shape[1] - 1 : -1], dim=-1)
        expected = logp.gather(1, new[:, None]).squeeze(1).tolist()
        assert len(expected) == c.completion_tokens > 0
        assert c.token_logprobs == pytest.approx(expected, abs=1e-3)


def test_query_likelihood_reranker_scores_every_passage(generator):
    from refinery.generation.scoring import QueryLikelihoodReranker

    reranker = QueryLikelihoodReranker(generator)
    scores = reranker.score(
        "How do bees make honey?", ["Bees make honey from nectar.", "x" * 50, ""]
    )
    assert len(scores) == 3 and all(math.isfinite(s) and s <= 0 for s in scores)
    assert reranker.score("q", []) == []
