"""The CPU generation engine on the real model: SmolLM2-135M exported to OpenVINO (int8
weights) by the project's exporter, run with continuous batching."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from refinery.generation.engine.base import SamplingParams

# The export (when the session has none yet) and compiling the engine: a minute or more.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAG_PROMPT = [
    {"role": "system", "content": "Answer using only the documents."},
    {
        "role": "user",
        "content": "Documents:\n[1] Worker bees develop from egg to adult in 21 days. Queens "
        "take 16 days and drones 24 days.\n\nQuestion: How many days does a worker bee take?",
    },
]


@pytest.fixture(scope="module")
def base(settings) -> Path:
    from training.base_model import resolve_base_model

    return Path(resolve_base_model(None, settings.models_dir).path)


@pytest.fixture(scope="module")
def exported(base, settings) -> Path:
    from training.openvino_export import export_openvino

    folder, _ = export_openvino(base, settings.models_dir / "openvino-int8")
    return folder


@pytest.fixture(scope="module")
def engine(base, exported):
    from refinery.generation.engine.loader import load_engine

    e = load_engine(base, backend="openvino", openvino_dir=exported, max_batch=8)
    yield e
    e.close()


def test_the_export_is_reused_and_answers_like_the_model(base, exported, engine):
    from training.openvino_export import export_openvino

    assert export_openvino(base, exported) == (exported, True)  # same weights: not made again
    assert (exported / "openvino_model.xml").exists()
    (out,) = engine.generate(["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_requests_join_the_running_batch_and_each_keeps_its_limits(engine):
    async def run():
        async def one(i: int, delay: float):
            await asyncio.sleep(delay)  # arrive while others are already generating
            params = SamplingParams(max_tokens=[5, 12, 20, 3][i % 4])
            return await engine.complete(f"Tell me fact {i} about honey bees.", params)

        return await asyncio.gather(*(one(i, 0.05 * i) for i in range(8)))

    outs = asyncio.run(run())
    for i, out in enumerate(outs):
        assert out.completion_tokens <= [5, 12, 20, 3][i % 4]
        assert out.finish_reason in ("stop", "length") and out.text
    stats = engine.stats()
    assert stats.steps > 0 and stats.mean_batch > 1.5  # requests really shared steps


def test_stop_strings_end_the_answer_inside_the_batch(engine):
    (plain,) = engine.generate([RAG_PROMPT], max_new_tokens=32)
    assert "21" in plain.text
    cut = plain.text.split("21")[0]
    out = asyncio.run(engine.complete(RAG_PROMPT, SamplingParams(max_tokens=32, stop=("21",))))
    assert out.text == cut.strip() and out.finish_reason == "stop"


def test_a_client_that_leaves_stops_using_the_engine(engine):
    async def run():
        async for _ in engine.stream(
            "Write a long story about bees.", SamplingParams(max_tokens=400)
        ):
            return

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats().running == 0 and engine.cancelled >= 1


@pytest.fixture(scope="module")
def exact_engine(base, exported):
    """A plain engine with the numerics speculation runs with (``precision="exact"``)."""
    from refinery.generation.engine.loader import load_engine

    e = load_engine(base, backend="openvino", openvino_dir=exported, max_batch=8, precision="exact")
    yield e
    e.close()


def test_prompt_lookup_gives_token_identical_greedy_answers(base, exported, exact_engine):
    """The claim: with speculation, greedy answers are those of the plain engine at the same
    (exact) numerics, on every CPU. With bf16 or int8 activations (the CPU plugin's defaults
    where it has them) a step over several tokens rounds differently from one-token steps."""
    from refinery.generation.engine.loader import load_engine

    prompts = [
        RAG_PROMPT,
        "Repeat after me: the hive needs water, pollen and nectar every day.",
        "Tell me about the life cycle of a honey bee colony.",
    ]
    plain = exact_engine.generate(prompts, max_new_tokens=48)
    spec = load_engine(base, backend="openvino", openvino_dir=exported, speculation="prompt_lookup")
    try:
        assert spec.backend.precision == "exact"  # speculation picks the exact numerics itself
        fast = spec.generate(prompts, max_new_tokens=48)
        stats = spec.stats()
    finally:
        spec.close()
    assert [o.text for o in fast] == [o.text for o in plain]
    assert [o.completion_tokens for o in fast] == [o.completion_tokens for o in plain]
    assert stats.draft_proposed > 0 and 0 < stats.acceptance_rate <= 1
    assert stats.steps < stats.generated_tokens  # some steps produced more than one token


def test_a_layer_truncated_draft_model_keeps_greedy_answers_identical(
    base, exported, exact_engine, tmp_path
):
    from refinery.generation.engine.loader import load_engine
    from training.openvino_export import export_openvino, truncated_copy

    draft = truncated_copy(base, tmp_path / "draft", 8)
    assert truncated_copy(base, tmp_path / "draft", 8) == draft  # reused
    draft_ov, _ = export_openvino(draft, tmp_path / "draft-ov")
    prompts = [RAG_PROMPT, "What is the capital of France?"]
    plain = exact_engine.generate(prompts, max_new_tokens=24)
    spec = load_engine(
        base, backend="openvino", openvino_dir=exported, speculation="draft_model",
        draft_dir=draft_ov,
    )  # fmt: skip
    try:
        fast = spec.generate(prompts, max_new_tokens=24)
        stats = spec.stats()
    finally:
        spec.close()
    assert [o.text for o in fast] == [o.text for o in plain]
    assert stats.draft_proposed > 0 and 0 <= stats.acceptance_rate <= 1
