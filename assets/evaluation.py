"""Evaluation and promotion: automatic evaluation of challenger and champion, the blind
human review queue and its aggregate, the blocking promotion gate, and the champion alias."""

import json
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from assets.resources import (
    EmbeddingModelResource,
    MLflowResource,
    PostgresResource,
    PromotionPolicy,
    mlflow_metadata,
    upstream_metadata,
)
from evaluation import review
from evaluation.automatic import EvaluationError, ModelEvaluation, evaluate_model, reliability_png
from evaluation.datasets import DEFAULT_RAG_QUESTIONS, EvaluationDataError, load_rag_questions
from evaluation.gate import HumanSummary, compare_to_champion
from evaluation.promotion import current_champion, promote, record_decision
from evaluation.report import examples_frame, write_report
from evaluation.tracing import log_traces
from refinery.settings import Settings
from serving.corpus.retrieval import Retriever
from serving.runtime.models import CHALLENGER, ModelNotFoundError, load_python_model, resolve
from training.sft_data import load_split

GROUP = "evaluation"
EXPERIMENT = "refinery-evaluation"


class AutomaticEvaluationConfig(dg.Config):
    registered_model: str = "refinery-chat"
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


def _fail(message: str) -> dg.Failure:
    return dg.Failure(description=message, allow_retries=False)


@dg.asset(
    group_name=GROUP,
    deps=[
        dg.AssetKey("candidate_model"),
        dg.AssetKey("chunk_embeddings"),
        dg.AssetKey("sft_dataset"),
    ],
    kinds={"mlflow", "evidently"},
    description="The challenger and the current champion on the held-out SFT split and the RAG question "
    "set: perplexity, exact match, token F1, ROUGE-L, retrieval hit@k and MRR, groundedness, latency. "
    "Every example is an MLflow trace; an Evidently report compares the two.",
)
def automatic_evaluation(
    context: dg.AssetExecutionContext,
    config: AutomaticEvaluationConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    embedding_model: EmbeddingModelResource,
) -> dg.MaterializeResult:
    uri = mlflow.resolved_tracking_uri
    try:
        challenger = resolve(uri, config.registered_model, CHALLENGER)
    except ModelNotFoundError as err:
        raise _fail(f"{err}: materialize candidate_model first") from err
    champion_version = current_champion(uri, config.registered_model)
    champion = resolve(uri, config.registered_model, champion_version) if champion_version else None
    try:
        rag_rows, dropped = load_rag_questions(
            Path(config.rag_path) if config.rag_path else DEFAULT_RAG_QUESTIONS
        )
    except EvaluationDataError as err:
        raise _fail(str(err)) from err
    heldout = load_split(Path(upstream_metadata(context, "sft_dataset")["path"]), "eval")[
        : config.heldout_limit
    ]
    rag_rows = rag_rows[: config.rag_limit]
    if not heldout and not rag_rows:
        raise _fail(
            "both evaluation sets are empty (heldout_limit and rag_limit are 0, or the files have no usable row)"
        )
    retriever = Retriever(postgres.store(), embedding_model.get())
    models = [("challenger", challenger)] + (
        [("champion", champion)] if champion and champion.version != challenger.version else []
    )
    results: dict[str, ModelEvaluation] = {}
    params = {
        **config.model_dump(),
        "challenger": challenger.label,
        "champion": champion.label if champion else "none",
    }
    with mlflow.asset_run(context, EXPERIMENT, params=params) as run:
        for role, ref in models:
            context.log.info(f"evaluating the {role}, {ref.label}")
            # The download (hundreds of MB) lives as long as the evaluation, not in /tmp forever.
            with tempfile.TemporaryDirectory(prefix="refinery-eval-") as tmp:
                generator = load_python_model(uri, ref, Path(tmp)).generator
                try:
                    result = evaluate_model(
                        ref.label, generator, heldout, rag_rows, retriever,
                        k=config.k, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens, progress=context.log.info,
                    )  # fmt: skip
                except EvaluationError as err:
                    raise _fail(str(err)) from err
                del generator
            log_traces(uri, run.experiment_id, run.run_id, ref.label, result.examples)
            run.log_metrics({f"{role}.{k}": v for k, v in result.metrics.items()})
            run.client.log_table(run.run_id, examples_frame(result), f"examples_{role}.json")
            with tempfile.TemporaryDirectory(prefix="refinery-eval-") as tmp:
                png = reliability_png(result, Path(tmp) / f"reliability_{role}.png")
                if png is not None:
                    run.log_artifact(png)
            results[role] = result
        if champion and champion.version == challenger.version:
            results["champion"] = results["challenger"]
        report = write_report(
            results["challenger"],
            results.get("champion") if len(models) > 1 else None,
            Settings.from_env().home / "reports" / f"evaluation-{run.run_id}.html",
        )
        run.log_artifact(report)
        run.log_dict(
            {
                role: {
                    "model": r.label,
                    "metrics": r.metrics,
                    "examples": [e.to_dict() for e in r.examples],
                }
                for role, r in results.items()
            },
            "evaluation.json",
        )
        run.set_tags(
            {
                "refinery.challenger": challenger.label,
                "refinery.champion": champion.label if champion else "none",
            }
        )
    for key, value in results["challenger"].metrics.items():
        run.client.set_model_version_tag(
            challenger.name, challenger.version, f"refinery.eval.{key}", f"{value:.6g}"
        )
    run.client.set_model_version_tag(
        challenger.name, challenger.version, "refinery.eval.run_id", run.run_id
    )
    table = _comparison(results, challenger.label, champion.label if champion else None)
    return dg.MaterializeResult(
        metadata={
            "challenger": challenger.label,
            "champion": champion.label if champion else "none",
            "comparison": dg.MetadataValue.md(table),
            "challenger_metrics": dg.MetadataValue.json(results["challenger"].metrics),
            "champion_metrics": dg.MetadataValue.json(
                results["champion"].metrics if "champion" in results else {}
            ),
            "rag_rows_dropped": dg.MetadataValue.json(dict(dropped)),
            "evidently_report": dg.MetadataValue.url(f"{run.url}/artifacts/{report.name}"),
            "evaluation_path": str(report),
            **mlflow_metadata(run),
        }
    )


def _comparison(results: dict[str, ModelEvaluation], challenger: str, champion: str | None) -> str:
    keys = sorted(results["challenger"].metrics)
    head = f"| metric | challenger {challenger} |" + (f" champion {champion} |" if champion else "")
    rows = [head, "|---|---|" + ("---|" if champion else "")]
    for key in keys:
        line = f"| {key} | {results['challenger'].metrics[key]:.4g} |"
        if champion and "champion" in results:
            line += f" {results['champion'].metrics.get(key, float('nan')):.4g} |"
        rows.append(line)
    return "\n".join(rows)


class HumanEvaluationConfig(dg.Config):
    registered_model: str = "refinery-chat"
    sample_per_model: int = Field(
        default=12, ge=0, le=500, description="Examples per model put in the review queue."
    )
    seed: int = 0


@dg.asset(
    group_name=GROUP,
    deps=[automatic_evaluation],
    kinds={"mlflow"},
    description="Blind review queue of sampled examples (challenger and champion interleaved) and the "
    "aggregate of the human ratings they got: mean, bootstrap 95% CI, count. A sensor re-materializes "
    "it when enough new ratings arrive.",
)
def human_evaluation(
    context: dg.AssetExecutionContext,
    config: HumanEvaluationConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
) -> dg.MaterializeResult:
    from evaluation.automatic import ExampleResult

    uri = mlflow.resolved_tracking_uri
    auto = upstream_metadata(context, "automatic_evaluation")
    evaluation = json.loads(_read_artifact(mlflow, auto["mlflow_run_id"], "evaluation.json"))
    engine = postgres.engine
    queued = 0
    summaries: dict[str, dict[str, Any]] = {}
    for role in ("challenger", "champion"):
        if role not in evaluation:
            continue
        label = evaluation[role]["model"]
        examples = [ExampleResult(**e) for e in evaluation[role]["examples"]]
        queued += review.enqueue(
            engine, label, examples, sample=config.sample_per_model, seed=config.seed
        )
        ratings = review.collect_ratings(engine, uri, label)
        s = ratings.summary()
        summaries[role] = {
            "model": label,
            "count": s.count,
            "mean": s.mean,
            "ci_low": s.ci_low,
            "ci_high": s.ci_high,
            "ignored": ratings.ignored,
        }
    challenger = summaries["challenger"]
    context.log.info(
        f"queued {queued} new examples; challenger {challenger['model']}: {challenger['count']} ratings"
    )
    name, version = challenger["model"].split("/")
    client = mlflow.existing_run(auto["mlflow_run_id"]).client
    for key in ("count", "mean", "ci_low", "ci_high"):
        client.set_model_version_tag(
            name, version, f"refinery.human.{key}", f"{challenger[key]:.4g}"
        )
    return dg.MaterializeResult(
        metadata={
            "queued_now": queued,
            "challenger": dg.MetadataValue.json(challenger),
            "champion": dg.MetadataValue.json(summaries.get("champion", {})),
            "ratings": challenger["count"],
            "mean": challenger["mean"] if challenger["count"] else 0.0,
            "ci_95": f"{challenger['ci_low']:.2f}–{challenger['ci_high']:.2f}"
            if challenger["count"]
            else "n/a",
            "review_page": "refinery review serve (then open it; tokens: refinery review add-reviewer NAME)",
        }
    )


def _read_artifact(mlflow: MLflowResource, run_id: str, path: str) -> str:
    """The text of a run's artifact (downloaded to a folder removed afterwards)."""
    import mlflow as mlflow_lib

    with tempfile.TemporaryDirectory(prefix="refinery-artifact-") as tmp:
        local = mlflow_lib.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=path,
            tracking_uri=mlflow.resolved_tracking_uri,
            dst_path=tmp,
        )
        return Path(local).read_text()


@dg.asset_check(
    asset=human_evaluation,
    additional_deps=[automatic_evaluation],
    blocking=True,
    description="The promotion gate: the challenger is promoted only if no automatic metric is worse than "
    "the champion's beyond its tolerance and the human ratings clear the bar (or the human gate is "
    "explicitly waived, with a reason). The decision is recorded on the model version.",
)
def promotion_gate(
    context: dg.AssetCheckExecutionContext,
    mlflow: MLflowResource,
    promotion_policy: PromotionPolicy,
) -> dg.AssetCheckResult:
    uri = mlflow.resolved_tracking_uri
    auto = _latest(context, "automatic_evaluation")
    human = _latest(context, "human_evaluation")
    name, version = auto["challenger"].split("/")
    try:
        policy = promotion_policy.policy()
    except ValueError as err:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(err)})
    champion_label = auto["champion"]
    if champion_label == auto["challenger"]:
        return dg.AssetCheckResult(
            passed=True, metadata={"decision": "the challenger is already the champion"}
        )
    h = human["challenger"]
    summary = HumanSummary(
        int(h["count"]), float(h["mean"]), float(h["ci_low"]), float(h["ci_high"])
    )
    decision = compare_to_champion(
        auto["challenger_metrics"], auto["champion_metrics"] or None, summary, policy
    )
    inputs = {"challenger": auto["challenger"], "champion": champion_label, "challenger_metrics": auto["challenger_metrics"],
              "champion_metrics": auto["champion_metrics"], "human": h, "dagster_run_id": context.run.run_id}  # fmt: skip
    record_decision(uri, name, version, decision, policy.to_dict(), inputs)
    return dg.AssetCheckResult(
        passed=decision.passed,
        metadata={
            "challenger": auto["challenger"],
            "champion": champion_label,
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "human_gate": "WAIVED: " + policy.waiver_reason
            if decision.human_waived
            else "required",
            "checks": dg.MetadataValue.json(decision.checks),
        },
    )


def _latest(context: Any, asset: str) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        raise _fail(f"{asset} has never been materialized")
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@dg.asset(
    group_name=GROUP,
    deps=[human_evaluation],
    kinds={"mlflow"},
    description='Moves the "champion" alias to the challenger (and its variants) once the promotion gate '
    "has passed. `refinery rollback` moves it back.",
)
def champion_model(
    context: dg.AssetExecutionContext, mlflow: MLflowResource
) -> dg.MaterializeResult:
    uri = mlflow.resolved_tracking_uri
    auto = upstream_metadata(context, "automatic_evaluation")
    name, version = auto["challenger"].split("/")
    previous = promote(uri, name, version, reason=f"Dagster run {context.run_id}")
    promoted = previous != version
    context.log.info(
        f"{name}/{version} is the champion"
        + (f" (was {previous})" if promoted and previous else "")
    )
    return dg.MaterializeResult(
        metadata={
            "champion": f"{name}/{version}",
            "previous_champion": f"{name}/{previous}" if previous else "none",
            "changed": promoted,
            "model_uri": f"models:/{name}@champion",
            "mlflow_model_version": dg.MetadataValue.url(
                f"{mlflow.ui_base}/#/models/{name}/versions/{version}"
            ),
        },
        data_version=dg.DataVersion(f"{name}-{version}"),
    )
