"""Quantized variants of the merged model, each measured against it on held-out data.

For each variant: size on disk, weights in memory, generation tokens/s, held-out perplexity
(answer tokens), and agreement of its logits with the merged fp32 model's.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refinery.generation.generator import ONNX_FILE, VARIANTS, load_generator
from refinery.generation.scoring import answer_nll, row_prompt
from training.merge import sample_batch

QUANTIZED = tuple(v for v in VARIANTS if v != "none")


class QuantizationConfigError(ValueError):
    pass


@dataclass(frozen=True)
class QuantizeConfig:
    variants: tuple[str, ...] = QUANTIZED
    eval_rows: int = 32  # held-out rows for perplexity
    agreement_rows: int = 8  # rows whose logits are compared with the merged model's
    gen_prompts: int = 2
    gen_tokens: int = 32
    threads: int | None = None

    def validate(self, cuda_available: bool) -> None:
        unknown = [v for v in self.variants if v not in QUANTIZED]
        if unknown:
            raise QuantizationConfigError(
                f"unknown variants {unknown}; choose from {list(QUANTIZED)}"
            )
        if (
            self.eval_rows < 1
            or self.agreement_rows < 1
            or self.gen_prompts < 1
            or self.gen_tokens < 1
        ):
            raise QuantizationConfigError(
                "eval_rows, agreement_rows, gen_prompts and gen_tokens must be >= 1"
            )


@dataclass
class VariantReport:
    variant: str
    path: str  # the folder to register and serve
    size_mb: float
    memory_mb: float
    tokens_per_second: float
    perplexity: float
    perplexity_change: float  # relative to the merged model (0.05 = +5%)
    logit_cosine: float
    top1_agreement: float
    seconds_to_build: float

    def row(self) -> dict[str, Any]:
        return asdict(self)


def folder_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def build_variant(variant: str, merged_dir: Path, out_root: Path) -> Path:
    """Write the variant's folder (or return the merged folder for load-time recipes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if variant == "torch-int8":
        return merged_dir  # quantized at load: torch's int8 modules only save as pickles
    out = out_root / variant
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(tmp)
    if variant in ("bnb-nf4", "bnb-int8"):
        quant = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )
            if variant == "bnb-nf4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            merged_dir, quantization_config=quant, device_map=device, use_safetensors=True
        )
        model.save_pretrained(tmp, safe_serialization=True)
    elif variant == "onnx-int8":
        export_onnx_int8(merged_dir, tmp / ONNX_FILE, tmp / "fp32")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export_onnx_int8(merged_dir: Path, target: Path, scratch: Path) -> None:
    """torch.onnx.export (dynamo) of logits(input_ids, attention_mask), then onnxruntime's
    weight-only block quantization: MatMul weights to int8 (blocks of 32, symmetric), the
    embedding table to int4. Activations stay float.

    Measured on SmolLM2-135M (see docs/decisions.md): onnxruntime's ``quantize_dynamic`` with
    per-channel weights gives garbage logits (cosine -0.39) in this version, per-tensor loses
    half the top-1 tokens; weight-only blocks keep cosine 0.999.
    """
    model = _load_untied(merged_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    fp32 = scratch / "model.onnx"
    _export_logits(model, fp32)
    del model  # freed before quantization loads the graph
    _quantize_weights(fp32, target)
    shutil.rmtree(scratch, ignore_errors=True)


def _load_untied(merged_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, use_safetensors=True
    ).eval()
    if model.config.tie_word_embeddings:
        # Untie: a tied lm_head is exported as Transpose(embedding), which no quantizer touches.
        model.lm_head.weight = torch.nn.Parameter(
            model.get_input_embeddings().weight.detach().clone()
        )
        model.config.tie_word_embeddings = False
    return model


def _export_logits(model: Any, fp32: Path) -> None:
    """The float32 ONNX graph of logits(input_ids, attention_mask), batch and length dynamic."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    ids = torch.ones((2, 8), dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=4096)
    torch.onnx.export(
        LogitsOnly(model),
        (ids, torch.ones_like(ids)),
        str(fp32),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        external_data=True,
    )


def _quantize_weights(fp32: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph: Any = onnx.load(str(fp32))
    # accuracy_level 4: int8 compute in the kernel, 2.5x faster than level 0 here (measured).
    for bits, ops in ((8, ("MatMul",)), (4, ("Gather",))):
        quantizer = MatMulNBitsQuantizer(
            graph,
            bits=bits,
            block_size=32,
            is_symmetric=True,
            accuracy_level=4,
            op_types_to_quantize=ops,
        )
        quantizer.process()
        graph = quantizer.model.model
    onnx.save_model(graph, str(target))


def memory_mb(generator: Any) -> float:
    """Bytes the weights take in memory (the ONNX model: its file, which is what ORT maps)."""
    if not hasattr(generator, "model"):
        return folder_mb(generator.model_dir / ONNX_FILE)
    model = generator.model
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # torch's dynamic int8 Linear keeps its packed weights outside parameters(): add them.
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(module, "weight") and callable(module.weight):
            w = module.weight()
            total += w.numel() * w.element_size()
    return total / 2**20


def serialized_mb(generator: Any) -> float:
    import torch

    buf = io.BytesIO()
    torch.save(generator.model.state_dict(), buf)  # in memory only: never written, never loaded
    return len(buf.getvalue()) / 2**20


def agreement(reference: Any, other: Any) -> tuple[float, float]:
    """Mean cosine of the logit vectors and how often the top-1 token agrees. Shapes (n, vocab)."""
    import torch

    cos = torch.nn.functional.cosine_similarity(reference, other, dim=-1).mean()
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    return float(cos), float(top1)


def tokens_per_second(generator: Any, prompts: Sequence[Any], max_new_tokens: int) -> float:
    generator.generate(prompts[:1], max_new_tokens=4)  # warm up
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        (out,) = generator.generate([prompt], max_new_tokens=max_new_tokens)
        seconds += time.perf_counter() - t0
        tokens += out.completion_tokens
    return tokens / seconds if seconds else 0.0


def measure(
    generator: Any, rows: list[dict[str, Any]], config: QuantizeConfig, ref_logits: Any | None
) -> dict[str, Any]:
    nll, n = answer_nll(generator, rows[: config.eval_rows])
    batch = sample_batch(generator.tokenizer, rows, config.agreement_rows)
    logits = generator.logits(batch["input_ids"], batch["attention_mask"])[
        batch["attention_mask"].bool()
    ]
    prompts = [row_prompt(r) for r in rows[: config.gen_prompts]]
    result = {
        "perplexity": math.exp(nll / max(1, n)),
        "tokens_per_second": tokens_per_second(generator, prompts, config.gen_tokens),
        "memory_mb": memory_mb(generator),
        "logits": logits,
    }
    if ref_logits is not None:
        result["logit_cosine"], result["top1_agreement"] = agreement(ref_logits, logits)
    return result


@contextlib.contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    """bitsandbytes logs a warning on every 8-bit matmul of float32 inputs on CPU."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_and_measure(
    merged_dir: Path,
    out_root: Path,
    eval_rows: list[dict[str, Any]],
    config: QuantizeConfig,
    progress: Callable[[str], None] | None = None,
) -> tuple[VariantReport, list[VariantReport]]:
    """The merged model's own figures (the reference row) and one report per variant."""
    import torch

    config.validate(torch.cuda.is_available())
    out_root.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _m: None)
    say("measuring the merged fp32 model (reference)")
    ref_gen = load_generator(merged_dir, "none", threads=config.threads)
    ref = measure(ref_gen, eval_rows, config, None)
    reference = VariantReport(
        "none", str(merged_dir), folder_mb(merged_dir), ref["memory_mb"], ref["tokens_per_second"],
        ref["perplexity"], 0.0, 1.0, 1.0, 0.0,
    )  # fmt: skip
    del ref_gen
    reports = []
    for variant in config.variants:
        say(f"building {variant}")
        t0 = time.perf_counter()
        folder = build_variant(variant, merged_dir, out_root)
        built = time.perf_counter() - t0
        say(f"measuring {variant}")
        with _quiet_bitsandbytes():
            gen = load_generator(folder, variant, threads=config.threads)
            m = measure(gen, eval_rows, config, ref["logits"])
        size = serialized_mb(gen) if variant == "torch-int8" else folder_mb(folder)
        reports.append(
            VariantReport(
                variant,
                str(folder),
                size,
                m["memory_mb"],
                m["tokens_per_second"],
                m["perplexity"],
                m["perplexity"] / ref["perplexity"] - 1.0,
                m["logit_cosine"],
                m["top1_agreement"],
                built,
            )
        )
        del gen
        gc.collect()
    (out_root / "report.json").write_text(
        json.dumps([r.row() for r in [reference, *reports]], indent=2)
    )
    return reference, reports


def markdown_table(reference: VariantReport, reports: list[VariantReport]) -> str:
    rows = [
        "| variant | size MB | weights in memory MB | tokens/s | held-out perplexity | vs merged | logit cosine | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [reference, *reports]:
        name = "merged fp32 (reference)" if r.variant == "none" else r.variant
        rows.append(
            f"| {name} | {r.size_mb:.0f} | {r.memory_mb:.0f} | {r.tokens_per_second:.1f} | {r.perplexity:.3f} "
            f"| {r.perplexity_change:+.1%} | {r.logit_cosine:.4f} | {r.top1_agreement:.1%} |"
        )
    return "\n".join(rows)
