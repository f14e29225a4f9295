"""Images out: image data set → image model (diffusers, registered as ``refinery-image``,
alias challenger) → automatic evaluation and the promotion gate (alias champion). The Bento
serves the image champion beside the chat model."""

import dagster as dg
from pydantic import Field

from assets.resources import (
    HomeResource,
    MLflowResource,
    PromotionPolicy,
    as_metadata,
    fails_on,
    mlflow_metadata,
)
from evaluation.images import DigitJudge, evaluate_image_model, record_and_promote
from refinery.vision.diffusion import ImageGenerator, ImageModelError
from training.images import (
    ImageDataError,
    ImageDatasetRef,
    ImageModelRef,
    ImageTrainingConfig,
    load_split,
    prepare_digits,
    train_and_register,
)

GROUP = "images"
EXPERIMENT = "refinery-images"
IMAGE_MODEL = "refinery-image"


class ImageDatasetConfig(dg.Config):
    test_fraction: float = 0.2
    seed: int = 42


@dg.asset(
    group_name=GROUP,
    kinds={"scikitlearn"},
    description="scikit-learn's handwritten digits (8×8, ten classes) in [-1, 1], split "
    "train/test with a fixed seed, stored as safetensors and content-hashed.",
)
def image_dataset(
    context: dg.AssetExecutionContext, config: ImageDatasetConfig, home: HomeResource
) -> dg.MaterializeResult[ImageDatasetRef]:
    with fails_on(ImageDataError):
        ref = prepare_digits(home.folder("datasets"), config.test_fraction, config.seed)
    context.log.info(f"{ref.n_train} train / {ref.n_test} test images, {len(ref.classes)} classes")
    return dg.MaterializeResult(
        value=ref,
        metadata=as_metadata({k: v for k, v in vars(ref).items() if k != "classes"}),
        data_version=dg.DataVersion(ref.content_hash[:32]),
    )


class ImageModelConfig(dg.Config):
    max_steps: int = Field(default=600, description="Optimizer steps (batch_size images each).")
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 42
    sample_steps: int = Field(default=25, description="DDIM steps the model samples with.")
    checkpoint: str = Field(
        default="",
        description="A diffusers pipeline folder (e.g. SD-Turbo saved locally) to register "
        "instead of training; empty: train the class-conditioned UNet.",
    )
    registered_model: str = IMAGE_MODEL


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "mlflow"},
    description="A class-conditioned diffusers UNet2DModel trained with the DDPM objective "
    "(loss curve and sample grid in MLflow), registered with alias challenger.",
)
def image_model(
    context: dg.AssetExecutionContext,
    config: ImageModelConfig,
    image_dataset: ImageDatasetRef,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult[ImageModelRef]:
    train_config = ImageTrainingConfig(
        max_steps=config.max_steps, batch_size=config.batch_size,
        learning_rate=config.learning_rate, seed=config.seed, sample_steps=config.sample_steps,
    )  # fmt: skip
    with fails_on(ImageDataError, ImageModelError), mlflow.asset_run(context, EXPERIMENT) as run:
        ref = train_and_register(
            image_dataset, train_config, checkpoint=config.checkpoint,
            models_dir=home.models_dir, run=run, tracking_uri=mlflow.resolved_tracking_uri,
            registered_model=config.registered_model, tags=mlflow.lineage_tags(context),
            on_log=lambda step, loss: context.log.info(f"step {step}/{config.max_steps} loss {loss:.4f}"),
        )  # fmt: skip
    return dg.MaterializeResult(
        value=ref,
        metadata={
            **as_metadata({k: v for k, v in vars(ref).items() if not k.startswith("mlflow")}),
            "mlflow_model_version": dg.MetadataValue.url(
                mlflow.model_version_url(ref.registered_model, ref.version)
            ),
            **mlflow_metadata(run),
        },
        data_version=dg.DataVersion(f"{ref.registered_model}-{ref.version}"),
    )


class ImageEvaluationConfig(dg.Config):
    per_class: int = Field(default=10, description="Images generated per class for the judge.")
    min_accuracy: float = Field(
        default=0.6, description="A model below this classifier-judged accuracy is never promoted."
    )


@dg.asset(
    group_name=GROUP,
    kinds={"mlflow"},
    description="Generated images of every class read by a classifier trained on the same data "
    "(accuracy per class), a sample sheet for review, and the promotion gate: alias champion.",
)
def image_evaluation(
    context: dg.AssetExecutionContext,
    config: ImageEvaluationConfig,
    image_dataset: ImageDatasetRef,
    image_model: ImageModelRef,
    mlflow: MLflowResource,
    home: HomeResource,
    promotion_policy: PromotionPolicy,
) -> dg.MaterializeResult:
    with fails_on(ValueError), mlflow.asset_run(context, EXPERIMENT) as run:
        judge = DigitJudge(load_split(image_dataset, "train"), load_split(image_dataset, "test"))
        evaluation = evaluate_image_model(
            ImageGenerator(image_model.path), judge,
            home.folder("reports") / f"image-{image_model.version}", per_class=config.per_class,
        )  # fmt: skip
        outcome = record_and_promote(
            mlflow.resolved_tracking_uri, image_model.registered_model, image_model.version,
            evaluation, promotion_policy.policy(), min_accuracy=config.min_accuracy, run=run,
        )  # fmt: skip
    context.log.info(f"{image_model.label}: " + "; ".join(outcome.reasons))
    return dg.MaterializeResult(
        metadata={
            "model_version": image_model.label,
            "classifier_accuracy": evaluation.accuracy,
            "judge_test_accuracy": evaluation.judge_test_accuracy,
            "promoted": outcome.promoted,
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in outcome.reasons)),
            "sample_sheet": dg.MetadataValue.path(evaluation.sheet),
            **mlflow_metadata(run),
        },
    )
