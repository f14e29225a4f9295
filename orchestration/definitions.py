"""The one Definitions object: every asset, check, job and resource, and the run policy."""

from __future__ import annotations

import dagster as dg

from assets import evaluation, images, ingestion, monitoring, serving, training
from assets.handoff import HandoffIOManager
from assets.resources import (
    EmbeddingModelResource,
    HomeResource,
    MLflowResource,
    PostgresResource,
    PromotionPolicy,
)
from orchestration.automation import (
    MODEL_JOB_TAGS,
    corpus_sensor,
    daily_drift_schedule,
    human_ratings_sensor,
    monitor_job,
    promote_job,
    retrain_job,
    retraining_sensor,
    weekly_retraining_schedule,
)
from orchestration.logs import console

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
    training.openvino_model,
    training.candidate_model,
]
EVALUATION_ASSETS = [
    evaluation.automatic_evaluation,
    evaluation.human_evaluation,
    evaluation.champion_model,
]
IMAGE_ASSETS = [images.image_dataset, images.image_model, images.image_evaluation]
SERVING_ASSETS = [serving.bento]
MONITORING_ASSETS = [monitoring.traffic_log, monitoring.drift_report, monitoring.cost_report]
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
    tags=MODEL_JOB_TAGS,
    description="Base model → SFT data → LoRA → merged → quantized → registered challenger.",
)
# `refinery evaluate`: evaluate the challenger, queue it for review, gate, promote.
evaluate_job = dg.define_asset_job(
    "evaluate",
    selection=dg.AssetSelection.groups(evaluation.GROUP),
    tags=MODEL_JOB_TAGS,
    description="Automatic and human evaluation, the promotion gate, the champion alias.",
)
# `refinery images`: image data set → image model (registered) → evaluation, gate, champion.
images_job = dg.define_asset_job(
    "images",
    selection=dg.AssetSelection.groups(images.GROUP),
    tags=MODEL_JOB_TAGS,
    description="Image data set → diffusers image model (refinery-image) → judged evaluation "
    "and the promotion gate.",
)
# `refinery bento`: package the champion as a Bento. (A job may not share the asset's name.)
bento_job = dg.define_asset_job(
    "package",
    selection=dg.AssetSelection.groups(serving.GROUP),
    description="A Bento of the model version the champion alias points to.",
)
# `make run` / `refinery run`: the whole lineage graph (monitoring runs on its own schedule:
# a fresh install has no traffic to report on).
refinery_job = dg.define_asset_job(
    "refinery",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups(monitoring.GROUP),
    description="The whole lineage graph, from corpus files to the served model.",
)

# Declarative automation: assets that simply follow their inputs (the Bento follows the
# champion; the cost report refreshes hourly) are kept up to date by this one sensor.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "refinery_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
)

# The one place the home is set (empty path: REFINERY_HOME, else .refinery/): every resource
# that keeps something under the home takes this one.
home = HomeResource()

defs = dg.Definitions(
    assets=[
        *INGESTION_ASSETS,
        *TRAINING_ASSETS,
        *EVALUATION_ASSETS,
        *IMAGE_ASSETS,
        *SERVING_ASSETS,
        *MONITORING_ASSETS,
    ],
    asset_checks=ASSET_CHECKS,
    jobs=[
        ingest_job,
        train_job,
        evaluate_job,
        images_job,
        promote_job,
        bento_job,
        refinery_job,
        monitor_job,
        retrain_job,
    ],
    sensors=[human_ratings_sensor, corpus_sensor, retraining_sensor, automation_sensor],
    schedules=[daily_drift_schedule, weekly_retraining_schedule],
    resources={
        # Assets hand their values (small frozen dataclasses) to each other as JSON files.
        "io_manager": HandoffIOManager(home=home),
        "home": home,
        "postgres": PostgresResource(home=home),
        "mlflow": MLflowResource(home=home),
        "embedding_model": EmbeddingModelResource(),
        # The human gate is required by default; `make run` waives it explicitly (configs/demo.yaml).
        "promotion_policy": PromotionPolicy(),
    },
    # One process per run: a 2-core machine gains nothing from a process per step, and every
    # step would pay the model and library imports again. At scale: the k8s executor.
    executor=dg.in_process_executor,
    # A line per step on the terminal; the full event log in <home>/logs and the Dagster UI.
    loggers={"console": console},
)
