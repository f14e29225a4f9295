"""The one Definitions object: every asset, check, job and resource, and the run policy."""

from __future__ import annotations

import dagster as dg

from assets import evaluation, ingestion, serving, training
from assets.resources import (
    EmbeddingModelResource,
    MLflowResource,
    PostgresResource,
    PromotionPolicy,
)
from orchestration.automation import human_ratings_sensor, promote_job

INGESTION_ASSETS = [
    ingestion.source_documents,
    ingestion.document_chunks,
    ingestion.chunk_embeddings,
]
TRAINING_ASSETS = [
    training.base_model,
    training.sft_dataset,
    training.lora_adapter,
    training.merged_model,
    training.quantized_models,
    training.candidate_model,
]
EVALUATION_ASSETS = [
    evaluation.automatic_evaluation,
    evaluation.human_evaluation,
    evaluation.champion_model,
]
SERVING_ASSETS = [serving.bento]
ASSET_CHECKS = [
    ingestion.no_rejected_files,
    ingestion.chunk_embeddings_integrity,
    evaluation.promotion_gate,
]

# `refinery ingest`: documents → chunks → embeddings, with their checks.
ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.groups(ingestion.GROUP),
    description="Documents → chunks → embeddings for the configured corpus.",
)
# `refinery train`: base model → … → candidate model (registered, alias "challenger").
train_job = dg.define_asset_job(
    "train",
    selection=dg.AssetSelection.groups(training.GROUP),
    description="Base model → SFT data → LoRA → merged → quantized → registered challenger.",
)
# `refinery evaluate`: evaluate the challenger, queue it for review, gate, promote.
evaluate_job = dg.define_asset_job(
    "evaluate",
    selection=dg.AssetSelection.groups(evaluation.GROUP),
    description="Automatic and human evaluation, the promotion gate, the champion alias.",
)
# `refinery bento`: package the champion as a Bento. (A job may not share the asset's name.)
bento_job = dg.define_asset_job(
    "package",
    selection=dg.AssetSelection.groups(serving.GROUP),
    description="A Bento of the model version the champion alias points to.",
)
# `make run` / `refinery run`: the whole lineage graph.
refinery_job = dg.define_asset_job(
    "refinery",
    selection=dg.AssetSelection.all(),
    description="The whole lineage graph, from corpus files to the served model.",
)

defs = dg.Definitions(
    assets=[*INGESTION_ASSETS, *TRAINING_ASSETS, *EVALUATION_ASSETS, *SERVING_ASSETS],
    asset_checks=ASSET_CHECKS,
    jobs=[ingest_job, train_job, evaluate_job, promote_job, bento_job, refinery_job],
    sensors=[human_ratings_sensor],
    resources={
        "postgres": PostgresResource(),
        "mlflow": MLflowResource(),
        "embedding_model": EmbeddingModelResource(),
        # The human gate is required by default; `make run` waives it explicitly (configs/demo.yaml).
        "promotion_policy": PromotionPolicy(),
    },
    # One process per run: a 2-core machine gains nothing from a process per step, and every
    # step would pay the model and library imports again. At scale: the k8s executor.
    executor=dg.in_process_executor,
)
