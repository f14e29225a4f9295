"""Evaluation and promotion: automatic evaluation of challenger and champion, the blind
human review queue and its aggregate, the blocking promotion gate, and the champion alias."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.resources import (
    EmbeddingModelResource,
    HomeResource,
    MLflowResource,
    PostgresResource,
    PromotionPolicy,
    as_metadata,
    fails_on,
    mlflow_metadata,
)
from evaluation import review
from evaluation.automatic import EvaluationError
from evaluation.challenge import (
    EvaluationOutcome,
    decide_promotion,
    plan_evaluation,
    run_evaluation,
)
from evaluation.datasets import DEFAULT_RAG_QUESTIONS, EvaluationDataError
from evaluation.promotion import ChampionRef, promote
from evaluation.review import HumanEvaluation
from refinery.core.registry import ModelNotFoundError
from refinery.retrieval.search import Retriever
from training.registry import CandidateRef
from training.sft_data import SFTDatasetRef

GROUP = "evaluation"
EXPERIMENT = "refinery-evaluation"


class AutomaticEvaluationConfig(dg.Config):
    rag_path: str = Field(
        default="", description=f"RAG question set (JSONL); empty: {DEFAULT_RAG_QUESTIONS.name}."
    )
    heldout_limit: int = Field(
        default=30, ge=0, description="Held-out SFT rows to answer (0: none)."
    )
    rag_limit: int = Field(default=60, ge=0, description="RAG questions to answer (0: none).")
    k: int = Field(default=3, ge=1, le=20)
    max_new_tokens: int = Field(default=48, ge=1, le=512)
    batch_size: int = Field(default=8, ge=1, le=64)


@dg.asset(
    group_name=GROUP,
    deps=[dg.AssetKey("chunk_embeddings")],
    kinds={"mlflow", "evidently"},
    description="The challenger and the current champion on the held-out SFT split and the RAG question "
    "set: perplexity, exact match, token F1, ROUGE-L, retrieval hit@k and MRR, groundedness, latency. "
    "Every example is an MLflow trace; an Evidently report compares the two.",
)
def automatic_evaluation(
    context: dg.AssetExecutionContext,
    config: AutomaticEvaluationConfig,
    candidate_model: CandidateRef,
    sft_dataset: SFTDatasetRef,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    embedding_model: EmbeddingModelResource,
    home: HomeResource,
) -> dg.MaterializeResult[EvaluationOutcome]:
    uri = mlflow.resolved_tracking_uri
    with fails_on(ModelNotFoundError, EvaluationDataError, EvaluationError):
        plan = plan_evaluation(
            uri, candidate_model.registered_model, candidate_model.version,
            sft_dataset.split("eval"), rag_path=Path(config.rag_path or DEFAULT_RAG_QUESTIONS),
            heldout_limit=config.heldout_limit, rag_limit=config.rag_limit,
        )  # fmt: skip
        params = {**config.model_dump(), **plan.params()}
        with mlflow.asset_run(context, EXPERIMENT, params=params) as run:
            outcome = run_evaluation(
                uri, plan, Retriever(postgres.store(), embedding_model.get()), run,
                home.folder("reports"), k=config.k, batch_size=config.batch_size,
                max_new_tokens=config.max_new_tokens, progress=context.log.info,
                trace_salt=mlflow.trace_salt,
            )  # fmt: skip
    return dg.MaterializeResult(
        value=outcome,
        metadata={
            **as_metadata({k: v for k, v in vars(outcome).items() if not k.startswith("mlflow")}),
            "evidently_report": dg.MetadataValue.url(
                f"{run.url}/artifacts/{Path(outcome.report_path).name}"
            ),
            **mlflow_metadata(run),
        },
    )


class HumanEvaluationConfig(dg.Config):
    sample_per_model: int = Field(
        default=12, ge=0, le=500, description="Examples per model put in the review queue."
    )
    seed: int = 0


@dg.asset(
    group_name=GROUP,
    kinds={"mlflow"},
    description="Blind review queue of sampled examples (challenger and champion interleaved) and the "
    "aggregate of the human ratings they got: mean, bootstrap 95% CI, count. A sensor re-materializes "
    "it when enough new ratings arrive.",
)
def human_evaluation(
    context: dg.AssetExecutionContext,
    config: HumanEvaluationConfig,
    automatic_evaluation: EvaluationOutcome,
    postgres: PostgresResource,
    mlflow: MLflowResource,
) -> dg.MaterializeResult[HumanEvaluation]:
    result = review.review_round(
        postgres.engine, mlflow.resolved_tracking_uri, automatic_evaluation.mlflow_run_id,
        sample=config.sample_per_model, seed=config.seed,
    )  # fmt: skip
    c = result.challenger
    context.log.info(f"queued {result.queued_now} new examples; {c.model}: {c.count} ratings")
    return dg.MaterializeResult(
        value=result,
        metadata=as_metadata(
            {
                "queued_now": result.queued_now,
                "challenger": vars(c),
                "champion": vars(result.champion) if result.champion else {},
                "ratings": c.count,
                "mean": c.mean if c.count else 0.0,
                "ci_95": f"{c.ci_low:.2f}–{c.ci_high:.2f}" if c.count else "n/a",
                "review_page": "refinery review serve (then open it; tokens: refinery review add-reviewer NAME)",
            }
        ),
    )


@dg.asset_check(
    asset=human_evaluation,
    additional_ins={"automatic_evaluation": dg.AssetIn("automatic_evaluation")},
    blocking=True,
    description="The promotion gate: the challenger is promoted only if no automatic metric is worse than "
    "the champion's beyond its tolerance (a paired bootstrap bound over the examples both answered, at "
    "the policy's confidence), every absolute floor holds, and the human ratings clear the bar (or the human gate is "
    "explicitly waived, with a reason). The decision is recorded on the model version.",
)
def promotion_gate(
    context: dg.AssetCheckExecutionContext,
    human_evaluation: HumanEvaluation,
    automatic_evaluation: EvaluationOutcome,
    mlflow: MLflowResource,
    promotion_policy: PromotionPolicy,
) -> dg.AssetCheckResult:
    try:
        policy = promotion_policy.policy()
    except ValueError as err:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(err)})
    decision = decide_promotion(
        mlflow.resolved_tracking_uri, automatic_evaluation, human_evaluation, policy,
        context.run.run_id,
    )  # fmt: skip
    return dg.AssetCheckResult(
        passed=decision.passed,
        metadata={
            "challenger": automatic_evaluation.challenger,
            "champion": automatic_evaluation.champion,
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "human_gate": "WAIVED: " + policy.waiver_reason
            if decision.human_waived
            else "required",
            "checks": dg.MetadataValue.json(decision.checks),
        },
    )


@dg.asset(
    group_name=GROUP,
    deps=[human_evaluation],
    kinds={"mlflow"},
    description='Moves the "champion" alias to the challenger (and its variants) once the promotion gate '
    "has passed. `refinery rollback` moves it back.",
)
def champion_model(
    context: dg.AssetExecutionContext,
    automatic_evaluation: EvaluationOutcome,
    mlflow: MLflowResource,
) -> dg.MaterializeResult[ChampionRef]:
    name, version = automatic_evaluation.challenger_ref
    previous = promote(
        mlflow.resolved_tracking_uri, name, version, reason=f"Dagster run {context.run_id}"
    )
    changed = previous != version
    context.log.info(
        f"{name}/{version} is the champion" + (f" (was {previous})" if changed and previous else "")
    )
    return dg.MaterializeResult(
        value=ChampionRef(name, version, previous or ""),
        metadata={
            "champion": f"{name}/{version}",
            "previous_champion": f"{name}/{previous}" if previous else "none",
            "changed": changed,
            "model_uri": f"models:/{name}@champion",
            "mlflow_model_version": dg.MetadataValue.url(mlflow.model_version_url(name, version)),
        },
        data_version=dg.DataVersion(f"{name}-{version}"),
    )
