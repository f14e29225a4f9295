"""Training library on a tiny random Llama with a locally trained tokenizer: seconds, not minutes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.runtime.scoring import tokenize_for_sft
from tests.conftest import SAMPLE_CORPUS
from tests.tiny_model import make_tiny_llama
from training.base_model import BaseModelError, resolve_base_model
from training.lora import (
    LoraTrainingConfig,
    TrainingConfigError,
    resolve_target_modules,
    train_lora,
)
from training.merge import MergeCheckError, merge_adapter
from training.quantize import QuantizationConfigError, QuantizeConfig, quantize_and_measure
from training.sft_data import DatasetError, SFTConfig, build_dataset, read_rows

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
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", SAMPLE_CORPUS)


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def dataset(tokenizer):
    return build_dataset(SFTConfig(max_tokens=512), tokenizer)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# --- base model ---------------------------------------------------------------------------


def test_local_base_model_is_described(tiny_base):
    info = resolve_base_model(str(tiny_base), tiny_base.parent / "models")
    assert info.source == "local folder" and info.architecture == "LlamaForCausalLM"
    assert info.parameters > 10_000 and len(info.checksum) == 64
    assert info.checksum == resolve_base_model(str(tiny_base), tiny_base.parent / "models").checksum


def test_pickled_weights_are_refused(tmp_path, tiny_base):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_base / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(BaseModelError, match=r"pytorch_model\.bin: pickle formats are refused"):
        resolve_base_model(str(folder), tmp_path)


def test_corrupt_and_missing_base_models_are_refused(tmp_path, tiny_base):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_base / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"garbage that is not safetensors")
    with pytest.raises(BaseModelError, match="corrupt weights file"):
        resolve_base_model(str(folder), tmp_path)
    with pytest.raises(BaseModelError, match="neither a local folder"):
        resolve_base_model("no-such-model-folder", tmp_path)
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        resolve_base_model(str(tmp_path), tmp_path)


def test_hub_ids_fail_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="cannot fetch 'someone/some-model'"):
        resolve_base_model("someone/some-model", tmp_path)


# --- SFT dataset --------------------------------------------------------------------------


def test_bad_rows_are_dropped_and_counted_by_reason(tmp_path, tokenizer):
    good = [
        {"instruction": f"Question {i} about bees?", "response": f"Answer {i}."} for i in range(6)
    ]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            *good,
            "{not json",
            "[1, 2]",
            {"instruction": "no response"},
            {"instruction": "  ", "response": "empty instruction"},
            {"instruction": "Question 0 about bees?", "response": "duplicate"},
            {"instruction": "x" * 2000, "response": "too long"},
            {"instruction": "many tokens", "response": "word " * 400},
        ],
    )
    ds = build_dataset(SFTConfig(path=str(path), max_tokens=64), tokenizer)
    assert ds.rows_read == 13 and ds.rows_kept == 6
    assert dict(ds.dropped) == {
        "malformed_json": 1, "not_an_object": 1, "missing_field": 1, "empty_field": 1,
        "duplicate": 1, "too_long": 1, "too_many_tokens": 1,
    }  # fmt: skip


def test_unusable_datasets_fail_with_what_to_fix(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="is empty"):
        read_rows(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DatasetError, match="JSON Lines"):
        read_rows(write_jsonl(tmp_path / "data.csv", ["a,b"]))
    few = write_jsonl(tmp_path / "few.jsonl", [{"instruction": "q?", "response": "a"}, "{oops"])
    with pytest.raises(
        DatasetError, match=r"only 1 usable rows of 2 \(dropped: \{'malformed_json': 1\}\)"
    ):
        build_dataset(SFTConfig(path=str(few)), tokenizer)
    with pytest.raises(DatasetError, match="eval_fraction"):
        SFTConfig(eval_fraction=0.9)


def test_split_is_seeded_and_the_hash_follows_content(tmp_path, tokenizer, dataset):
    again = build_dataset(SFTConfig(max_tokens=512), tokenizer)
    assert [r["id"] for r in again.eval] == [r["id"] for r in dataset.eval]
    assert again.content_hash == dataset.content_hash
    other_seed = build_dataset(SFTConfig(max_tokens=512, seed=7), tokenizer)
    assert other_seed.content_hash != dataset.content_hash
    assert len(dataset.eval) == 30 and len(dataset.train) == 270
    assert not {r["id"] for r in dataset.eval} & {r["id"] for r in dataset.train}


def test_only_answer_tokens_are_learned(tokenizer):
    (ex,) = tokenize_for_sft(
        [{"instruction": "What do drones do?", "response": "They mate with queens."}],
        tokenizer,
        512,
    )
    masked = [i for i, label in enumerate(ex["labels"]) if label == -100]
    assert masked == list(range(len(masked))) and 0 < len(masked) < len(ex["labels"])
    answer = tokenizer.decode([t for t in ex["labels"] if t != -100])
    assert "They mate with queens." in answer and "<|im_end|>" in answer


# --- LoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraTrainingConfig(r=0), "r must be > 0"),
        (LoraTrainingConfig(dropout=1.5), "dropout"),
        (LoraTrainingConfig(max_steps=0, epochs=0), "max_steps"),
        (LoraTrainingConfig(device="cuda"), "no CUDA device"),
        (LoraTrainingConfig(optimizer="adamw_8bit"), "needs CUDA"),
    ],
)
def test_impossible_training_configs_fail_early(config, message):
    with pytest.raises(TrainingConfigError, match=message):
        config.validate(cuda_available=False)


def test_unknown_target_modules_list_the_real_ones(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert resolve_target_modules(model, LoraTrainingConfig()) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    with pytest.raises(
        TrainingConfigError, match=r"unknown LoRA target modules \['qkv'\].*'down_proj'"
    ):
        resolve_target_modules(model, LoraTrainingConfig(target_modules=("qkv",)))


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
    assert merged.max_abs_logit_diff <= merged.tolerance
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


def test_unknown_variant_is_refused():
    with pytest.raises(QuantizationConfigError, match=r"unknown variants \['gptq'\]"):
        QuantizeConfig(variants=("gptq",)).validate(cuda_available=False)


# --- registry -----------------------------------------------------------------------------


def test_registered_model_loads_in_a_fresh_process(merged, mlflow_uri, tmp_path):
    from refinery.tracking import client_for, tracked_run
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
