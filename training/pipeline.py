"""The training steps with content-addressed work folders, so that a rerun with unchanged
inputs reuses what was made instead of making it again.

Folder of one training lineage: <models_dir>/runs/<key>/, where key hashes the base model's
checksum, the SFT dataset's hash and the LoRA config (not the code version: a commit that does
not change inputs should not retrain; the code version is recorded as a tag instead).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refinery.core.artifacts import ARTIFACT
from refinery.core.lineage import sha256_hex
from refinery.core.tracking import RunOpener, TrackedRun
from training.base_model import BaseModelInfo
from training.lora import (
    LoraTrainingConfig,
    MetricSink,
    TrainingResult,
    plot_loss_curve,
    train_lora,
)
from training.merge import MergeResult, merge_adapter
from training.quantize import QuantizeConfig, VariantReport, markdown_table, quantize_and_measure
from training.sft_data import SFTDatasetRef

RESULT = "result.json"


def training_key(base_checksum: str, dataset_hash: str, config: LoraTrainingConfig) -> str:
    return sha256_hex(f"{base_checksum}\x00{dataset_hash}\x00{config.fingerprint()}")[:20]


def work_dir(models_dir: Path, key: str) -> Path:
    return models_dir / "runs" / key


def load_training(folder: Path) -> tuple[TrainingResult, dict[str, Any]] | None:
    path = folder / RESULT
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return TrainingResult(**data["result"]), data.get("extra", {})


def train(
    base_dir: str,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    config: LoraTrainingConfig,
    folder: Path,
    *,
    extra: dict[str, Any] | None = None,
    on_metrics: MetricSink | None = None,
    progress: Any = None,
) -> TrainingResult:
    """Train (resuming any checkpoint in ``folder``) and record the result for reuse.

    ``config.processes`` > 1: one process per GPU through ``accelerate launch``
    (training/distributed.py); its per-step metrics reach ``on_metrics`` when it ends."""
    if config.processes > 1:
        from training.distributed import run

        result = run(base_dir, train_rows, eval_rows, config, folder, progress=progress)
        for row in result.history:
            if on_metrics is not None:
                skip = ("step", "epoch", "elapsed")
                on_metrics({k: v for k, v in row.items() if k not in skip}, int(row["step"]))
    else:
        result = train_lora(
            base_dir,
            train_rows,
            eval_rows,
            config,
            folder,
            on_metrics=on_metrics,
            progress=progress,
        )
    (folder / RESULT).write_text(
        json.dumps({"result": asdict(result), "extra": extra or {}}, indent=2)
    )
    return result


def merge(
    base_dir: str, adapter_dir: str, folder: Path, eval_rows: list[dict[str, Any]], tolerance: float
) -> tuple[MergeResult, bool]:
    """Merged model in ``folder/merged``; reused when it was made from this very adapter."""
    out = folder / "merged"
    stamp = folder / "merge.json"
    adapter_hash = sha256_hex((Path(adapter_dir) / "adapter_model.safetensors").read_bytes())
    if stamp.exists() and out.exists():
        data = json.loads(stamp.read_text())
        same = data.get("adapter_hash") == adapter_hash and "max_abs_logit" in data["result"]
        if same and data["result"]["tolerance"] >= tolerance:  # (older stamps: absolute)
            return MergeResult(**data["result"]), True
    result = merge_adapter(base_dir, adapter_dir, out, eval_rows, tolerance)
    stamp.write_text(json.dumps({"adapter_hash": adapter_hash, "result": asdict(result)}, indent=2))
    return result, False


def quantize(
    merged_dir: Path,
    folder: Path,
    eval_rows: list[dict[str, Any]],
    config: QuantizeConfig,
    progress: Any = None,
) -> tuple[VariantReport, list[VariantReport], bool]:
    """Variants in ``folder/quantized``; reused when made from this merged model with this config."""
    out = folder / "quantized"
    stamp = folder / "quantize.json"
    fingerprint = sha256_hex(
        json.dumps({**asdict(config), "merged": str(merged_dir)}, sort_keys=True)
    )
    if stamp.exists():
        data = json.loads(stamp.read_text())
        if data.get("fingerprint") == fingerprint and all(
            Path(r["path"]).exists() for r in data["reports"]
        ):
            reports = [VariantReport(**r) for r in data["reports"]]
            return reports[0], reports[1:], True
    out.mkdir(parents=True, exist_ok=True)
    reference, reports = quantize_and_measure(merged_dir, out, eval_rows, config, progress)
    stamp.write_text(
        json.dumps(
            {"fingerprint": fingerprint, "reports": [r.row() for r in [reference, *reports]]},
            indent=2,
        )
    )
    return reference, reports, False


# --- the steps as the graph runs them, with their hand-offs --------------------------------
Progress = Callable[[str], None]


@dataclass(frozen=True)
class AdapterRef:
    """The hand-off of ``lora_adapter``: the trained adapter, its work folder (named by the
    training key) and the MLflow run that the later steps add to."""

    adapter_dir: str = field(metadata=ARTIFACT)
    work_dir: str  # where it was trained; later steps work in their own home's folder
    training_key: str
    lora_config: dict[str, Any]
    reused: bool
    steps: int
    resumed_from_step: int
    eval_loss_before: float
    eval_loss_after: float
    trainable_parameters: int
    train_seconds: float
    mlflow_run_id: str
    mlflow_run_url: str

    def metadata(self) -> dict[str, Any]:
        return {
            "path": self.adapter_dir,
            "work_dir": self.work_dir,
            "training_key": self.training_key,
            "reused": self.reused,
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
            "eval_loss_before": round(self.eval_loss_before, 4),
            "eval_loss_after": round(self.eval_loss_after, 4),
            "eval_loss_reduction": round(self.eval_loss_before - self.eval_loss_after, 4),
            "eval_perplexity_after": round(math.exp(min(self.eval_loss_after, 50)), 3),
            "trainable_parameters": self.trainable_parameters,
            "train_seconds": round(self.train_seconds, 1),
            "lora_config": self.lora_config,
        }


def config_record(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples as lists), for params and tags."""
    return json.loads(json.dumps(asdict(config), default=list))


def train_adapter(
    base: BaseModelInfo,
    sft: SFTDatasetRef,
    config: LoraTrainingConfig,
    models_dir: Path,
    open_run: RunOpener,
    progress: Progress | None = None,
) -> AdapterRef:
    """Train the adapter in its content-addressed folder, or reuse the one already trained
    there (then no MLflow run is opened); a killed run resumes from its newest checkpoint."""
    key = training_key(base.checksum, sft.content_hash, config)
    folder = work_dir(models_dir, key)
    previous = load_training(folder)
    if previous is not None:
        result, extra = previous
        if progress:
            progress(
                f"inputs unchanged (key {key}): reusing the adapter of MLflow run {extra.get('mlflow_run_id')}"
            )
        return _adapter_ref(
            result, folder, key, config, True, extra["mlflow_run_id"], extra["mlflow_run_url"]
        )
    params = {**config_record(config), "base_model": base.name}
    tags = {
        "refinery.base_model": base.name,
        "refinery.base_model_checksum": base.checksum,
        "refinery.sft_dataset_hash": sft.content_hash,
        "refinery.training_key": key,
    }
    with open_run(params, tags) as run:
        result = train(
            base.path, sft.split("train"), sft.split("eval"), config, folder,
            extra={"mlflow_run_id": run.run_id, "mlflow_run_url": run.url},
            on_metrics=lambda m, step: run.log_metrics(m, step=step), progress=progress,
        )  # fmt: skip
        _log_training_run(run, result, sft, folder)
    return _adapter_ref(result, folder, key, config, False, run.run_id, run.url)


def _adapter_ref(
    result: TrainingResult,
    folder: Path,
    key: str,
    config: LoraTrainingConfig,
    reused: bool,
    run_id: str,
    run_url: str,
) -> AdapterRef:
    return AdapterRef(
        adapter_dir=result.adapter_dir,
        work_dir=str(folder),
        training_key=key,
        lora_config=config_record(config),
        reused=reused,
        steps=result.steps,
        resumed_from_step=result.resumed_from_step,
        eval_loss_before=result.eval_loss_before,
        eval_loss_after=result.eval_loss_after,
        trainable_parameters=result.trainable_parameters,
        train_seconds=result.seconds,
        mlflow_run_id=run_id,
        mlflow_run_url=run_url,
    )


def _log_training_run(
    run: TrackedRun, result: TrainingResult, sft: SFTDatasetRef, folder: Path
) -> None:
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    # Per-step metrics were logged live by the training callback; these summarize the run.
    run.log_metrics(result.metrics(), step=result.steps)
    run.log_artifact(plot_loss_curve(result.history, folder / "loss_curve.png"))
    run.log_artifact(Path(result.adapter_dir), "adapter")
    for split in ("train", "eval"):
        ds = mlflow.data.from_pandas(  # type: ignore[attr-defined]
            pd.DataFrame(sft.split(split)),
            source=sft.source,
            name=f"sft-{split}",
            digest=sft.content_hash[:16],
        )
        run.client.log_inputs(
            run.run_id,
            datasets=[
                DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)])
            ],
        )


@dataclass(frozen=True)
class MergedModelRef:
    """The hand-off of ``merged_model``: the merged safetensors folder and its merge check."""

    path: str = field(metadata=ARTIFACT)
    training_key: str
    reused: bool
    max_abs_logit_diff: float
    tolerance: float
    size_bytes: int


def merge_model(
    base: BaseModelInfo,
    sft: SFTDatasetRef,
    adapter: AdapterRef,
    tolerance: float,
    run: TrackedRun,
    models_dir: Path,
) -> MergedModelRef:
    """Merge the adapter into the base (reused when made from this very adapter) in this
    home's work folder of the adapter's training key, and record the merge check in the
    training run."""
    folder = work_dir(models_dir, adapter.training_key)
    result, reused = merge(base.path, adapter.adapter_dir, folder, sft.split("eval"), tolerance)
    if not reused:
        run.log_metrics(
            {
                "merge_max_abs_logit_diff": result.max_abs_logit_diff,
                "merge_mean_abs_logit_diff": result.mean_abs_logit_diff,
            }
        )
    return MergedModelRef(
        result.path, adapter.training_key, reused, result.max_abs_logit_diff, result.tolerance,
        result.size_bytes,
    )  # fmt: skip


@dataclass(frozen=True)
class QuantizedModels:
    """The hand-off of ``quantized_models``: each variant's folder and the comparison."""

    variants: dict[str, str] = field(metadata=ARTIFACT)  # variant -> folder
    quantize_config: dict[str, Any]
    comparison: str  # Markdown table against the merged model
    reused: bool


def quantize_models(
    merged: MergedModelRef,
    sft: SFTDatasetRef,
    adapter: AdapterRef,
    config: QuantizeConfig,
    run: TrackedRun,
    models_dir: Path,
    progress: Progress | None = None,
) -> QuantizedModels:
    """Build and measure the variants (reused when made from this merged model with this
    config); metrics and the comparison table go to the training run."""
    reference, reports, reused = quantize(
        Path(merged.path),
        work_dir(models_dir, adapter.training_key),
        sft.split("eval"),
        config,
        progress,
    )
    table = markdown_table(reference, reports)
    if not reused:
        for r in [reference, *reports]:
            name = "merged" if r.variant == "none" else r.variant.replace("-", "_")
            run.log_metrics(
                {
                    f"{name}_size_mb": r.size_mb,
                    f"{name}_tokens_per_second": r.tokens_per_second,
                    f"{name}_perplexity": r.perplexity,
                    f"{name}_logit_cosine": r.logit_cosine,
                    f"{name}_top1_agreement": r.top1_agreement,
                }
            )
        run.log_text(table, "quantization.md")
        run.log_dict([r.row() for r in [reference, *reports]], "quantization.json")
    return QuantizedModels(
        {r.variant: r.path for r in reports}, config_record(config), table, reused
    )


def lineage_tags(
    base: BaseModelInfo,
    sft: SFTDatasetRef,
    adapter: AdapterRef,
    quantized: QuantizedModels,
    corpus_hash: str,
) -> dict[str, str]:
    """What made a registered version: base model, data, configs and the RAG index."""
    from refinery.core.lineage import TAG_CORPUS_HASH

    return {
        "dagster.asset_keys": "base_model,sft_dataset,lora_adapter,merged_model,quantized_models,candidate_model",
        "refinery.base_model": base.name,
        "refinery.base_model_checksum": base.checksum,
        "refinery.sft_dataset_hash": sft.content_hash,
        TAG_CORPUS_HASH: corpus_hash,
        "refinery.lora_config": json.dumps(adapter.lora_config, sort_keys=True),
        "refinery.quantize_config": json.dumps(quantized.quantize_config, sort_keys=True),
        "refinery.training_key": adapter.training_key,
        "refinery.eval_loss_after": str(round(adapter.eval_loss_after, 4)),
    }


@dataclass(frozen=True)
class OpenVINOModelRef:
    """The hand-off of ``openvino_model``: the merged model exported for the CPU engine, and
    optionally a layer-truncated draft of it for speculative decoding."""

    path: str = field(metadata=ARTIFACT)
    weight_format: str
    reused: bool
    size_mb: float
    draft_path: str = field(default="", metadata=ARTIFACT)
    draft_layers: int = 0


def export_for_serving(
    merged: MergedModelRef,
    adapter: AdapterRef,
    weight_format: str,
    run: TrackedRun,
    models_dir: Path,
    progress: Progress | None = None,
    draft_layers: int = 0,
    python: Path | None = None,
) -> OpenVINOModelRef:
    """The merged model as an OpenVINO model (``<work dir>/openvino-<format>``), reused when it
    was made from the same weights; its size goes to the training run. ``draft_layers`` > 0:
    also a draft for speculative decoding, the first that many layers, exported the same way.
    ``python``: the exporter's interpreter (``RunSettings.openvino_python``; None: its own)."""
    from training.openvino_export import export_openvino, truncated_copy
    from training.quantize import folder_mb

    work = work_dir(models_dir, adapter.training_key)
    folder, reused = export_openvino(
        Path(merged.path), work / f"openvino-{weight_format}", weight_format, progress, python
    )
    draft = ""
    if draft_layers:
        copy = truncated_copy(Path(merged.path), work / f"draft-{draft_layers}", draft_layers)
        draft_folder, _ = export_openvino(
            copy, work / f"openvino-draft-{draft_layers}-{weight_format}", weight_format,
            progress, python,
        )  # fmt: skip
        draft = str(draft_folder)
    size = folder_mb(folder)
    if not reused:
        run.log_metrics({f"openvino_{weight_format}_size_mb": size})
    return OpenVINOModelRef(str(folder), weight_format, reused, round(size, 1), draft, draft_layers)
