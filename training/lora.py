"""LoRA fine-tuning with peft and the Hugging Face Trainer, resumable from checkpoints.

Per-step metrics go to an MLflow run (loss, eval loss, learning rate, tokens/s), so the loss
curve shows in the MLflow UI; a PNG of it is logged too. The adapter is saved as safetensors.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from refinery.core.lineage import sha256_hex
from refinery.generation.scoring import tokenize_for_sft

log = logging.getLogger(__name__)

# Attention projections per architecture (config.model_type): where LoRA pays most per parameter.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn", "c_proj"),
    "gpt_neox": ("query_key_value", "dense"),
}

METRICS_LOG_NAME = "loss_curve.png"


class Quantization(enum.StrEnum):
    """How the base model is held while the adapter trains."""

    none = "none"  # LoRA on the full-precision base
    nf4 = "nf4"  # QLoRA: LoRA on a 4-bit NF4 base (bitsandbytes)


class Optimizer(enum.StrEnum):
    auto = "auto"  # 8-bit AdamW on CUDA, AdamW on CPU
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"  # bitsandbytes; needs CUDA


class Device(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TrainingConfigError(ValueError):
    """The training configuration cannot work; the message says what to change."""


@dataclass(frozen=True)
class LoraTrainingConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()  # empty: DEFAULT_TARGET_MODULES for the architecture
    learning_rate: float = 5e-4
    max_steps: int = 60  # > 0: train this many optimizer steps; 0: train `epochs` epochs
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    warmup_steps: int = 5
    eval_every: int = 10
    save_every: int = 10
    seed: int = 42
    max_tokens: int = 1024  # prompt + answer; RAG-format rows hold three chunks
    quantization: Literal["none", "nf4"] = "none"  # nf4: QLoRA, LoRA on a 4-bit base
    optimizer: Literal["auto", "adamw", "adamw_8bit"] = "auto"  # auto: 8-bit AdamW on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Training processes on this node, one per GPU: > 1 starts `accelerate launch` (DDP; the
    # effective batch is batch_size x grad_accum x processes). Configuration, not code.
    processes: int = 1

    def validate(self, cuda_available: bool) -> None:
        problems = []
        if self.r <= 0:
            problems.append(f"r must be > 0 (got {self.r})")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.learning_rate <= 0 or self.learning_rate > 1:
            problems.append(f"learning_rate must be in (0, 1] (got {self.learning_rate})")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            problems.append("set max_steps > 0, or max_steps = 0 and epochs > 0")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append("batch_size and grad_accum must be >= 1")
        if self.processes < 1:
            problems.append(f"processes must be >= 1 (got {self.processes})")
        if self.processes > 1 and not cuda_available:
            problems.append(
                f"processes={self.processes} starts one process per GPU, and no CUDA device is present"
            )
        if self.eval_every < 1 or self.save_every < 1:
            problems.append("eval_every and save_every must be >= 1")
        if not cuda_available:
            if self.device == "cuda":
                problems.append("device='cuda' but no CUDA device is present: use 'auto' or 'cpu'")
            if self.optimizer == "adamw_8bit":
                problems.append(
                    "optimizer='adamw_8bit' (bitsandbytes) needs CUDA: use 'auto' or 'adamw' here"
                )
        if problems:
            raise TrainingConfigError("; ".join(problems))

    def use_cuda(self, cuda_available: bool) -> bool:
        return cuda_available and self.device != "cpu"

    def fingerprint(self) -> str:
        fields = asdict(self)
        if fields["processes"] == 1:  # one process: the key of the runs before this field existed
            del fields["processes"]
        return sha256_hex(json.dumps(fields, sort_keys=True))


def resolve_target_modules(model: Any, config: LoraTrainingConfig) -> list[str]:
    """The configured modules, checked against the model; or the architecture's default."""
    import torch

    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    # bitsandbytes layers subclass torch.nn.Linear too, so QLoRA models list the same names.
    wanted = list(config.target_modules) or list(
        DEFAULT_TARGET_MODULES.get(model.config.model_type, ())
    )
    if not wanted:
        raise TrainingConfigError(
            f"no default LoRA target modules for architecture {model.config.model_type!r}; "
            f"set target_modules from: {sorted(linear_names)}"
        )
    unknown = [m for m in wanted if m not in linear_names]
    if unknown:
        raise TrainingConfigError(
            f"unknown LoRA target modules {unknown} for {model.config.model_type!r}; "
            f"linear layers are: {sorted(linear_names)}"
        )
    return wanted


@dataclass
class TrainingResult:
    adapter_dir: str
    steps: int
    resumed_from_step: int
    train_loss: float
    eval_loss_before: float
    eval_loss_after: float
    trainable_parameters: int
    total_parameters: int
    seconds: float
    tokens_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def eval_loss_reduction(self) -> float:
        return self.eval_loss_before - self.eval_loss_after

    def metrics(self) -> dict[str, float]:
        return {
            "train_loss_final": self.train_loss,
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "eval_loss_reduction": self.eval_loss_reduction,
            "eval_perplexity_before": math.exp(min(self.eval_loss_before, 50)),
            "eval_perplexity_after": math.exp(min(self.eval_loss_after, 50)),
            "trainable_parameters": float(self.trainable_parameters),
            "trainable_fraction": self.trainable_parameters / max(1, self.total_parameters),
            "train_seconds": self.seconds,
            "train_tokens_per_second": self.tokens_per_second,
            "steps": float(self.steps),
        }


MetricSink = Callable[[dict[str, float], int], None]


def _local_rank() -> int:
    """This process's GPU under `accelerate launch` / torchrun (0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def load_base_for_training(
    base_dir: str, config: LoraTrainingConfig, cuda: bool
) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": torch.float32}
    if config.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
        )
        kwargs["device_map"] = f"cuda:{_local_rank()}" if cuda else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if cuda and config.quantization == "none":
        model = model.to(f"cuda:{_local_rank()}")
    return model, tokenizer


def train_lora(
    base_dir: str,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    config: LoraTrainingConfig,
    work_dir: Path,
    *,
    on_metrics: MetricSink | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainingResult:
    """Train a LoRA adapter; resume from the newest checkpoint in ``work_dir`` if there is one.

    ``work_dir`` should be specific to (base model, data, config): a checkpoint of other
    training would otherwise be resumed.
    """
    import torch

    cuda = torch.cuda.is_available()
    config.validate(cuda)
    use_cuda = config.use_cuda(cuda)
    torch.manual_seed(config.seed)
    model, tokenizer = load_base_for_training(base_dir, config, use_cuda)
    peft_model = _attach_lora(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    checkpoints = work_dir / "checkpoints"
    history: list[dict[str, float]] = []
    trainer = _make_trainer(
        peft_model, tokenizer, train_rows, eval_rows, config, checkpoints, use_cuda,
        _MetricsTarget(history, on_metrics, progress),
    )  # fmt: skip
    resume = _latest_checkpoint(checkpoints)
    resumed_from = int(resume.name.split("-")[-1]) if resume else 0
    eval_before = _eval_loss_before(trainer, work_dir)
    if progress:
        progress(
            f"held-out loss before training: {eval_before:.4f}"
            + (f"; resuming from step {resumed_from}" if resume else "")
        )
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    eval_after = float(trainer.evaluate()["eval_loss"])
    adapter_dir = work_dir / "adapter"
    if trainer.is_world_process_zero():  # one writer when several processes train
        peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(adapter_dir))
    return TrainingResult(
        adapter_dir=str(adapter_dir),
        steps=trainer.state.global_step,
        resumed_from_step=resumed_from,
        train_loss=_last_train_loss(history, output.training_loss),
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        seconds=seconds,
        tokens_per_second=_median_tokens_per_second(history),
        history=history,
    )


def _last_train_loss(history: list[dict[str, float]], mean_loss: float) -> float:
    """The loss of the last logged step; the Trainer's mean over the run if none was logged."""
    return float(next((h["loss"] for h in reversed(history) if "loss" in h), mean_loss))


def _median_tokens_per_second(history: list[dict[str, float]]) -> float:
    """Median tokens/s over the logged training steps (0 when none was timed)."""
    rates = sorted(h["tokens_per_second"] for h in history if "tokens_per_second" in h)
    return rates[len(rates) // 2] if rates else 0.0


@dataclass
class _MetricsTarget:
    """Where the Trainer's log rows go: kept in ``history``, passed to the sink and progress."""

    history: list[dict[str, float]]
    on_metrics: MetricSink | None
    progress: Callable[[str], None] | None


def _make_trainer(
    peft_model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    config: LoraTrainingConfig,
    checkpoints: Path,
    use_cuda: bool,
    metrics: _MetricsTarget,
) -> Any:
    """A Trainer over the tokenized rows that reports through ``metrics`` only."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    train_ds = Dataset.from_list(tokenize_for_sft(train_rows, tokenizer, config.max_tokens))
    eval_ds = Dataset.from_list(tokenize_for_sft(eval_rows, tokenizer, config.max_tokens))
    trainer = Trainer(
        model=peft_model,
        args=_training_arguments(config, checkpoints, use_cuda),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_metrics_callback(metrics)],
    )
    # Progress goes to the metric sink and the log, not to stdout dictionaries.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _attach_lora(model: Any, config: LoraTrainingConfig) -> Any:
    """Wrap the base model in a peft model whose only trainable weights are the LoRA pairs."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_target_modules(model, config)
    if config.quantization == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(
        model,
        LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )


def _training_arguments(config: LoraTrainingConfig, checkpoints: Path, use_cuda: bool) -> Any:
    from transformers import TrainingArguments

    optim = "adamw_torch"
    if config.optimizer == "adamw_8bit" or (config.optimizer == "auto" and use_cuda):
        optim = "adamw_bnb_8bit"
    return TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 2,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=config.eval_every,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        optim=optim,
        use_cpu=not use_cuda,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )


def _metrics_callback(target: _MetricsTarget) -> Any:
    """A Trainer callback that appends each log row to the history and passes it on."""
    from transformers import TrainerCallback

    history, on_metrics, progress = target.history, target.on_metrics, target.progress

    clock = {"t": time.perf_counter(), "tokens": 0}
    started = time.perf_counter()

    class _Metrics(TrainerCallback):
        def on_log(
            self,
            args: Any,
            state: Any,
            control: Any,
            logs: dict[str, float] | None = None,
            **kw: Any,
        ) -> None:
            if not logs:
                return
            row = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            now, seen = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            if "loss" in row and now > clock["t"]:
                row["tokens_per_second"] = (seen - clock["tokens"]) / (now - clock["t"])
                clock["t"], clock["tokens"] = now, seen
            row["step"] = float(state.global_step)
            row["elapsed"] = now - started
            history.append(row)
            if on_metrics:
                on_metrics(
                    {k: v for k, v in row.items() if k not in ("step", "epoch", "elapsed")},
                    state.global_step,
                )
            if progress and ("eval_loss" in row or ("loss" in row and state.global_step % 10 == 0)):
                progress(_progress_line(row, state.global_step, state.max_steps))

    return _Metrics()


def _progress_line(row: dict[str, float], step: int, max_steps: int) -> str:
    return f"step {step}/{max_steps}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in row.items() if k in ("loss", "eval_loss", "learning_rate")
    )


def _eval_loss_before(trainer: Any, work_dir: Path) -> float:
    """The held-out loss of the untrained adapter, measured once and kept for resumed runs."""
    before_file = work_dir / "eval_before.json"
    if before_file.exists():
        return float(json.loads(before_file.read_text())["eval_loss"])
    # LoRA's B matrices start at zero: before training the model is exactly the base model.
    eval_before = float(trainer.evaluate()["eval_loss"])
    if trainer.is_world_process_zero():  # one writer when several processes train
        work_dir.mkdir(parents=True, exist_ok=True)
        before_file.write_text(json.dumps({"eval_loss": eval_before}))
    return eval_before


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def plot_loss_curve(
    history: list[dict[str, float]], path: Path, title: str = "LoRA fine-tuning"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss", lw=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
