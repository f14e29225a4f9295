"""The training steps with content-addressed work folders, so that a rerun with unchanged
inputs reuses what was made instead of making it again.

Folder of one training lineage: <models_dir>/runs/<key>/, where key hashes the base model's
checksum, the SFT dataset's hash and the LoRA config (not the code version: a commit that does
not change inputs should not retrain; the code version is recorded as a tag instead).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from refinery.lineage import sha256_hex
from training.lora import LoraTrainingConfig, MetricSink, TrainingResult, train_lora
from training.merge import MergeResult, merge_adapter
from training.quantize import QuantizeConfig, VariantReport, quantize_and_measure

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
        if data.get("adapter_hash") == adapter_hash and data["result"]["tolerance"] >= tolerance:
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
