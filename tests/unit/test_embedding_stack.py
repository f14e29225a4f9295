"""The default embedding model runs on plain transformers, exactly as sentence-transformers
computes it, without importing sentence-transformers (whose trainer imports peft and
bitsandbytes; on CPUs with AVX-512 BF16 bitsandbytes then looks for hub kernels at import)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from refinery.retrieval.embedding import Embedder, PooledEncoder, plain_stack

TEXTS = [
    "Worker bees develop from egg to adult in 21 days.",
    "smoker",
    "A much longer passage about hives, " * 60,  # past the 256-token window: truncated
]


def test_the_default_model_needs_neither_sentence_transformers_nor_bitsandbytes():
    code = (
        "import sys, json\n"
        "from refinery.retrieval.embedding import Embedder\n"
        "e = Embedder(); v = e.encode(['hello world'])\n"
        "print(json.dumps({'shape': list(v.shape), 'mods': sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('sentence_transformers', 'bitsandbytes', 'peft'))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"shape": [1, 384], "mods": []}
    assert "bitsandbytes" not in out.stderr


def test_pooled_encoder_matches_sentence_transformers():
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    embedder = Embedder()
    assert isinstance(embedder.model, PooledEncoder)
    ours = embedder.encode(TEXTS, batch_size=2)
    reference = SentenceTransformer(embedder.ref.location, device="cpu").encode(
        TEXTS, normalize_embeddings=True, batch_size=2
    )
    assert ours.shape == reference.shape == (3, 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert embedder.max_seq_length == 256


def test_other_stacks_are_left_to_sentence_transformers(tmp_path):
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"path": "", "type": "sentence_transformers.models.Transformer"},
                {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            ]
        )
    )
    assert plain_stack(tmp_path) is None
    assert plain_stack(tmp_path / "missing") is None
