"""The real default base model, a few real fine-tuning steps, quantization and registration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from refinery.core.tracking import tracked_run
from training.base_model import DEFAULT_BASE_MODEL, resolve_base_model
from training.lora import LoraTrainingConfig, train_lora
from training.merge import merge_adapter
from training.quantize import QuantizeConfig, quantize_and_measure
from training.registry import register
from training.sft_data import SFTConfig, build_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def smollm2(settings):
    """SmolLM2-135M-Instruct converted from the packaged GGUF once per test session."""
    return resolve_base_model(None, settings.models_dir)


def test_packaged_base_model_converts_once_to_safetensors(smollm2, settings):
    assert smollm2.name == DEFAULT_BASE_MODEL and smollm2.architecture == "LlamaForCausalLM"
    assert smollm2.parameters == 134_515_008
    folder = Path(smollm2.path)
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    again = resolve_base_model("", settings.models_dir)  # converted before: reused, same checksum
    assert again == smollm2


@pytest.mark.slow  # real fine-tuning steps, quantization and a fresh-process load
def test_few_steps_of_smollm2_fine_tuning_quantized_and_registered(smollm2, tmp_path, mlflow_uri):
    from transformers import AutoTokenizer

    ds = build_dataset(SFTConfig(), AutoTokenizer.from_pretrained(smollm2.path))
    config = LoraTrainingConfig(max_steps=4, eval_every=4, save_every=4, warmup_steps=1)
    result = train_lora(smollm2.path, ds.train[:32], ds.eval[:8], config, tmp_path / "run")
    assert result.steps == 4 and result.eval_loss_after < result.eval_loss_before
    merged = merge_adapter(smollm2.path, result.adapter_dir, tmp_path / "run" / "merged", ds.eval)
    assert merged.max_abs_logit_diff < 1e-3
    qconfig = QuantizeConfig(variants=("torch-int8",), eval_rows=8, gen_prompts=1, gen_tokens=8)
    reference, (int8,) = quantize_and_measure(
        Path(merged.path), tmp_path / "run" / "q", ds.eval, qconfig
    )
    assert int8.size_mb < 0.7 * reference.size_mb and int8.logit_cosine > 0.8
    with tracked_run(mlflow_uri, "t", run_name="train", artifact_root=tmp_path / "art") as run:
        pass
    version = register(
        mlflow_uri,
        run_id=run.run_id,
        name="smol-chat",
        model_dir=Path(merged.path),
        variant="none",
        lineage_key="k",
        tags={},
    )
    script = (
        f"import json, mlflow; mlflow.set_tracking_uri({mlflow_uri!r}); "
        "m = mlflow.pyfunc.load_model('models:/smol-chat@challenger'); "
        "print(json.dumps(m.predict(['What is the capital of France?'], params={'max_new_tokens': 12})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (answer,) = json.loads(proc.stdout.strip().splitlines()[-1])
    # The registered model answers exactly as the merged folder does in this process (greedy).
    from refinery.generation.generator import Generator

    (expected,) = Generator(merged.path).generate(
        ["What is the capital of France?"], max_new_tokens=12
    )
    assert answer == expected.text and answer.strip()
    assert version.version == "1"
