"""The engine's CUDA path (transformers' continuous batching in bf16/fp16 with SDPA): runs
where a GPU is lent, skipped with that reason elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


def test_continuous_batching_on_cuda_answers_and_keeps_each_requests_limits(settings):
    import torch

    from refinery.generation.engine.hf import best_dtype
    from refinery.generation.engine.loader import load_engine
    from training.base_model import resolve_base_model

    base = Path(resolve_base_model(None, settings.models_dir).path)
    engine = load_engine(base, backend="hf", device="cuda", max_batch=16)
    try:
        assert engine.backend.dtype == best_dtype("cuda") != torch.float32
        outs = engine.generate(
            ["What is the capital of France?", "Name a bee product.", "Hello"],
            max_new_tokens=[16, 8, 4],
        )
        assert "Paris" in outs[0].text
        assert [o.completion_tokens <= m for o, m in zip(outs, [16, 8, 4], strict=True)] == [
            True
        ] * 3
    finally:
        engine.close()
