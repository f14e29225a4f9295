"""The engine's torch backends on the tiny random Llama: transformers' continuous batching
gives the same greedy tokens as fixed padded batches (starting its batch manager takes tens
of seconds on 2 cores, hence this tier)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_engines(tiny_base):
    from refinery.generation.engine.loader import load_engine

    engines = {name: load_engine(tiny_base, backend=name, max_batch=8) for name in ("static", "hf")}
    yield engines
    for e in engines.values():
        e.close()


def test_continuous_batching_gives_the_same_greedy_tokens_as_fixed_batches(tiny_engines):
    prompts = ["How do bees fly?", "What is a drone?", "Why do bees swarm in spring?"]
    limits = [6, 11, 3]
    static = tiny_engines["static"].generate(prompts, max_new_tokens=limits)
    continuous = tiny_engines["hf"].generate(prompts, max_new_tokens=limits)
    assert [c.completion_tokens for c in static] == limits  # random weights: never an end token
    assert [c.text for c in continuous] == [c.text for c in static]
    assert [c.completion_tokens for c in continuous] == limits
    assert tiny_engines["hf"].stats().requests >= 3
