"""Serving: the Bento that packages the champion, pinned by registry version."""

import dagster as dg
from pydantic import Field

from assets.evaluation import champion_model
from assets.images import image_evaluation
from assets.resources import EmbeddingModelResource, MLflowResource
from refinery.core.registry import CHAMPION, ModelNotFoundError
from serving.bento import BentoBuildError, build_bento

GROUP = "serving"


class BentoConfig(dg.Config):
    registered_model: str = "refinery-chat"
    alias: str = Field(default=CHAMPION, description="Alias (or version number) to package.")


@dg.asset(
    group_name=GROUP,
    # image_evaluation: the image champion it serves beside the chat model (when one exists).
    deps=[champion_model, image_evaluation],
    kinds={"bentoml"},
    # Follows the champion: rebuilt (or reused) after each promotion run, by the automation sensor.
    # A deployment that never ran the image lineage has no image_evaluation: not a reason to wait.
    automation_condition=(
        dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())
        & ~dg.AutomationCondition.any_deps_missing().ignore(
            dg.AssetSelection.assets("image_evaluation")
        )
    ).with_label("eager, image model optional"),
    description="A Bento of the model version the champion alias points to (pinned by version "
    "and recorded in its labels), with the embedding model; `make serve` serves it.",
)
def bento(
    context: dg.AssetExecutionContext,
    config: BentoConfig,
    mlflow: MLflowResource,
    embedding_model: EmbeddingModelResource,
) -> dg.MaterializeResult:
    try:
        built = build_bento(
            mlflow.store_settings,
            mlflow.resolved_tracking_uri,
            config.registered_model,
            config.alias,
            embedding_model=embedding_model.model or None,
        )
    except (ModelNotFoundError, BentoBuildError) as err:
        raise dg.Failure(description=str(err), allow_retries=False) from err
    pins = built.pins
    context.log.info(
        f"Bento {built.tag} serves {pins.model_label}"
        + (f" and {pins.image_label}" if pins.image_label else "")
        + (" (reused)" if built.reused else "")
    )
    return dg.MaterializeResult(
        metadata={
            "bento": built.tag,
            # What a deployment of this champion runs (`refinery deploy render` uses it).
            "image": built.image,
            "bento_path": dg.MetadataValue.path(built.path),
            "model_version": pins.model_label,
            "variant": pins.variant,
            "embedding_model": pins.embedding_model,
            "image_model": pins.image_label or "none",
            "reused": built.reused,
            "mlflow_model_version": dg.MetadataValue.url(
                f"{mlflow.ui_base}/#/models/{pins.registered_model}/versions/{pins.model_version}"
            ),
            "serve": dg.MetadataValue.md(f"`make serve` (or `refinery serve {built.tag}`)"),
        },
        data_version=dg.DataVersion(built.tag),
    )
