"""Merge a LoRA adapter into its base model and check that nothing changed on the way."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinery.generation.scoring import row_messages


class MergeCheckError(RuntimeError):
    pass


@dataclass(frozen=True)
class MergeResult:
    path: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    tolerance: float
    size_bytes: int


def sample_batch(tokenizer: Any, rows: list[dict[str, Any]], n: int = 8) -> dict[str, Any]:
    """A left-padded batch of chat-formatted examples (prompt + reference answer)."""
    texts = [tokenizer.apply_chat_template(row_messages(r), tokenize=False) for r in rows[:n]]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def merge_adapter(
    base_dir: str,
    adapter_dir: str,
    out_dir: Path,
    check_rows: list[dict[str, Any]],
    tolerance: float = 1e-3,
) -> MergeResult:
    """``merge_and_unload``; fail unless merged logits match the adapter model's within tolerance."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval()
    batch = sample_batch(tokenizer, check_rows)
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        with_adapter = model(**batch).logits[mask]  # (tokens, vocab), padding dropped
        merged = model.merge_and_unload().eval()
        after = merged(**batch).logits[mask]
    diff = (with_adapter - after).abs()
    max_diff, mean_diff = float(diff.max()), float(diff.mean())
    if not max_diff <= tolerance:
        raise MergeCheckError(
            f"merged logits differ from the adapter model's by {max_diff:.2e} > {tolerance:.0e}"
        )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return MergeResult(str(out_dir), max_diff, mean_diff, tolerance, size)
