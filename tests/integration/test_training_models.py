"""The training library's model steps on the tiny random Llama: LoRA training (and a SIGKILL
in the middle of it), merging, quantization with ONNX export, and a registered model loaded in
a fresh process. Real training and exports: tens of seconds, so not in the unit tier."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.lora import LoraTrainingConfig, train_lora
from training.merge import MergeCheckError, merge_adapter
from training.quantize import QuantizeConfig, quantize_and_measure

pytestmark = pytest.mark.integration

FAST = LoraTrainingConfig(
    r=4,
    alpha=8,
    max_steps=6,
    batch_size=4,
    eval_every=3,
    save_every=2,
    warmup_steps=1,
    learning_rate=1e-2,
)


@pytest.fixture(scope="session")
def trained(tiny_base, dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    steps = []
    result = train_lora(
        str(tiny_base),
        dataset.train[:64],
        dataset.eval[:8],
        FAST,
        work,
        on_metrics=lambda m, s: steps.append((s, m)),
    )
    return result, work, steps


def test_lora_trains_logs_every_step_and_saves_safetensors(trained):
    result, _, steps = trained
    assert result.steps == 6 and result.resumed_from_step == 0
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").exists()
    assert not list(Path(result.adapter_dir).glob("*.bin"))
    logged = {s for s, m in steps if "loss" in m}
    assert logged == set(range(1, 7))
    assert any("eval_loss" in m for _, m in steps) and any(
        "tokens_per_second" in m for _, m in steps
    )
    assert result.eval_loss_after < result.eval_loss_before  # lr 1e-2 on a random model: it learns
    assert 0 < result.trainable_parameters < result.total_parameters


def test_killed_training_resumes_from_its_checkpoint(tiny_base, dataset, tmp_path):
    rows = tmp_path / "rows.json"
    config = {k: v for k, v in FAST.__dict__.items() if k != "target_modules"}
    rows.write_text(
        json.dumps({"train": dataset.train[:64], "eval": dataset.eval[:8], "config": config})
    )
    script = f"""
import json, os, signal
from pathlib import Path
from training.lora import LoraTrainingConfig, train_lora
data = json.loads(Path({str(rows)!r}).read_text())
config = LoraTrainingConfig(**data["config"])
def die(metrics, step):
    if step >= 3 and "loss" in metrics:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no atexit
train_lora({str(tiny_base)!r}, data["train"], data["eval"], config, Path({str(tmp_path / "work")!r}), on_metrics=die)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "work" / "checkpoints" / "checkpoint-2").is_dir()
    result = train_lora(
        str(tiny_base), dataset.train[:64], dataset.eval[:8], FAST, tmp_path / "work"
    )
    assert result.resumed_from_step == 2 and result.steps == 6


# --- merge, quantize ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def merged(tiny_base, trained, dataset):
    result, work, _ = trained
    return merge_adapter(str(tiny_base), result.adapter_dir, work / "merged", dataset.eval[:8])


def test_merge_matches_the_adapter_model(merged):
    assert merged.max_abs_logit_diff <= merged.tolerance * max(1.0, merged.max_abs_logit)
    assert (Path(merged.path) / "model.safetensors").exists()


def test_merge_check_fails_loudly(tiny_base, trained, dataset, tmp_path):
    result, _, _ = trained
    with pytest.raises(MergeCheckError, match="merged logits differ"):
        merge_adapter(
            str(tiny_base), result.adapter_dir, tmp_path / "m", dataset.eval[:8], tolerance=1e-30
        )
    assert not (tmp_path / "m").exists()


def test_quantized_variants_are_measured_against_the_merged_model(merged, dataset, tmp_path):
    config = QuantizeConfig(
        variants=("torch-int8", "onnx-int8"), eval_rows=8, gen_prompts=1, gen_tokens=4
    )
    reference, reports = quantize_and_measure(
        Path(merged.path), tmp_path / "q", dataset.eval, config
    )
    assert reference.variant == "none" and reference.logit_cosine == 1.0
    assert [r.variant for r in reports] == ["torch-int8", "onnx-int8"]
    for r in reports:
        assert r.size_mb > 0 and r.memory_mb > 0 and r.tokens_per_second > 0
        assert (
            math.isfinite(r.perplexity) and -1 <= r.logit_cosine <= 1 and 0 <= r.top1_agreement <= 1
        )
    assert (tmp_path / "q" / "onnx-int8" / "model.onnx").exists()
    assert json.loads((tmp_path / "q" / "report.json").read_text())[0]["variant"] == "none"


# --- registry -----------------------------------------------------------------------------


def test_registered_model_loads_in_a_fresh_process(merged, mlflow_uri, tmp_path):
    from refinery.core.tracking import client_for, tracked_run
    from training.registry import register

    with tracked_run(mlflow_uri, "t", run_name="train", artifact_root=tmp_path / "art") as run:
        pass
    first = register(
        mlflow_uri,
        run_id=run.run_id,
        name="tiny-chat",
        model_dir=Path(merged.path),
        variant="none",
        lineage_key="k1",
        tags={"refinery.base_model": "tiny"},
    )
    again = register(
        mlflow_uri,
        run_id=run.run_id,
        name="tiny-chat",
        model_dir=Path(merged.path),
        variant="none",
        lineage_key="k1",
        tags={},
    )
    assert (first.version, first.reused) == ("1", False) and (again.version, again.reused) == (
        "1",
        True,
    )
    client = client_for(mlflow_uri)
    mv = client.get_model_version_by_alias("tiny-chat", "challenger")
    assert (
        str(mv.version) == "1"
        and mv.tags["refinery.base_model"] == "tiny"
        and mv.tags["refinery.variant"] == "none"
    )
    script = (
        f"import json, mlflow; mlflow.set_tracking_uri({mlflow_uri!r}); "
        "m = mlflow.pyfunc.load_model('models:/tiny-chat@challenger'); "
        "out = m.predict(['How do bees fly?', 'What is a drone?'], params={'max_new_tokens': 5}); "
        "print(json.dumps(out))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(x, str) for x in out)
