"""Monitoring: what the service logged, as a drift report and a cost report (MLflow + Dagster)."""

import base64
from datetime import UTC, datetime, timedelta
from typing import Literal

import dagster as dg
from pydantic import Field

from assets.resources import (
    EmbeddingModelResource,
    MLflowResource,
    PostgresResource,
    mlflow_metadata,
)
from evaluation.datasets import load_rag_questions
from evaluation.monitoring import (
    DriftThresholds,
    NotEnoughTraffic,
    cost_plot,
    cost_summary,
    load_traffic,
    reference_from_questions,
)
from evaluation.monitoring import (
    drift_report as run_drift_report,
)
from refinery.pushgateway import push_drift
from refinery.settings import Settings

GROUP = "monitoring"
EXPERIMENT = "refinery-monitoring"
DRIFT_CHECK = "drift_within_thresholds"

# Written by the running service (serving/api/traffic.py), not by Dagster: an external asset, so
# that the lineage graph shows where the reports' data come from.
traffic_log = dg.AssetSpec(
    "traffic_log",
    group_name=GROUP,
    kinds={"postgres"},
    description="Sampled requests the BentoML service answered (table traffic_log): prompt and "
    "answer or their hashes, retrieval scores, latency, tokens, cost, cache hit, guard verdict.",
)


class DriftReportConfig(dg.Config):
    window_hours: float = Field(default=24.0, gt=0, description="Current window: the last N hours.")
    end: str = Field(default="", description="End of the current window (ISO 8601); empty: now.")
    reference: Literal["previous_window", "evaluation_set"] = Field(
        default="previous_window",
        description="Compare with the window before the current one, or with the evaluation "
        "question set (prompts only). An earlier window too small falls back to the question set.",
    )
    min_rows: int = Field(default=20, ge=5, description="Fewest requests a window may hold.")
    max_drifted_share: float = Field(default=0.5, ge=0, le=1)
    max_embedding_auc: float = Field(default=0.75, ge=0.5, le=1)

    def window_end(self) -> datetime:
        return datetime.fromisoformat(self.end) if self.end else datetime.now(UTC)


@dg.asset(
    group_name=GROUP,
    deps=[traffic_log],
    kinds={"evidently", "mlflow"},
    check_specs=[
        dg.AssetCheckSpec(
            DRIFT_CHECK,
            asset="drift_report",
            blocking=True,
            description="Fails (ERROR) when prompts, answers or retrieval scores drifted past the "
            "configured thresholds; the retraining sensor watches it. WARN: too little traffic.",
        )
    ],
    description="Evidently report of the recent traffic window against a reference: text "
    "descriptors of prompts and answers, prompt-embedding drift, retrieval-score drift, latency "
    "and cost. The HTML is an MLflow artifact, linked here.",
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftReportConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    embedding_model: EmbeddingModelResource,
) -> dg.MaterializeResult:
    end = config.window_end()
    window = timedelta(hours=config.window_hours)
    engine = postgres.engine
    current = load_traffic(engine, end - window, end)
    reference_name = config.reference
    reference = load_traffic(engine, end - 2 * window, end - window)
    if reference_name == "evaluation_set" or len(reference) < config.min_rows:
        if reference_name == "previous_window":
            context.log.info(
                f"previous window holds {len(reference)} requests (< {config.min_rows}): "
                "using the evaluation question set as the reference"
            )
        rows, _ = load_rag_questions()
        reference = reference_from_questions([r["question"] for r in rows])
        reference_name = "evaluation_set"
    params = {
        "window_hours": config.window_hours,
        "window_end": end.isoformat(),
        "reference": reference_name,
        "max_drifted_share": config.max_drifted_share,
        "max_embedding_auc": config.max_embedding_auc,
    }
    html = Settings.from_env().home / "reports" / f"drift-{context.run_id[:8]}.html"
    with mlflow.asset_run(context, EXPERIMENT, params=params) as run:
        try:
            result = run_drift_report(
                reference,
                current,
                html,
                # Loaded only when both windows hold enough traffic to compare.
                embed=lambda texts: embedding_model.get().encode(texts),
                thresholds=DriftThresholds(config.max_drifted_share, config.max_embedding_auc),
                min_rows=config.min_rows,
            )
        except NotEnoughTraffic as err:
            context.log.warning(f"no drift report: {err}")
            run.set_tags({"refinery.drift": "not_enough_traffic"})
            return dg.MaterializeResult(
                metadata={
                    "skipped": str(err),
                    "current_rows": len(current),
                    **mlflow_metadata(run),
                },
                check_results=[
                    dg.AssetCheckResult(
                        check_name=DRIFT_CHECK,
                        passed=False,
                        severity=dg.AssetCheckSeverity.WARN,
                        metadata={"reason": str(err)},
                    )
                ],
            )
        run.log_metrics(result.metrics())
        run.log_artifact(result.html)
        run.set_tags({"refinery.drift": "passed" if result.passed else "failed"})
    _push_drift(context, result.passed)
    context.log.info(
        f"drift: {len(result.drifted_columns)}/{len(result.column_pvalues)} columns drifted, "
        f"embedding AUC {result.embedding_auc}; "
        + ("within thresholds" if result.passed else "; ".join(result.failed_because))
    )
    return dg.MaterializeResult(
        metadata={
            "reference": reference_name,
            "current_rows": result.current_rows,
            "reference_rows": result.reference_rows,
            "drifted_columns": dg.MetadataValue.json(result.drifted_columns),
            "drifted_share": result.drifted_share,
            "prompt_embedding_auc": result.embedding_auc
            if result.embedding_auc is not None
            else "n/a",
            "evidently_report": dg.MetadataValue.url(f"{run.url}/artifacts/{result.html.name}"),
            "report_path": dg.MetadataValue.path(str(result.html)),
            **mlflow_metadata(run),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=DRIFT_CHECK,
                passed=result.passed,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "failed_because": dg.MetadataValue.md(
                        "\n".join(f"- {r}" for r in result.failed_because) or "nothing drifted"
                    ),
                    "p_values": dg.MetadataValue.json(result.column_pvalues),
                },
            )
        ],
    )


def _push_drift(context: dg.AssetExecutionContext, passed: bool) -> None:
    """The outcome as a Prometheus gauge (REFINERY_PUSHGATEWAY_URL); a failed push only warns."""
    try:
        push_drift(passed)
    except OSError as err:
        context.log.warning(f"could not push the drift result to the Pushgateway: {err}")


class CostReportConfig(dg.Config):
    window_days: float = Field(default=7.0, gt=0, description="Report over the last N days.")
    bucket: str = Field(
        default="1h", description="Plot resolution (a pandas offset: 15min, 1h, 1D)."
    )


@dg.asset(
    group_name=GROUP,
    deps=[traffic_log],
    kinds={"matplotlib", "mlflow"},
    # Refreshed every hour while automation is on. (Not `on_cron`: that also waits for the
    # inputs to update, and the traffic log is written by the service, not materialized.)
    automation_condition=dg.AutomationCondition.cron_tick_passed("0 * * * *")
    & ~dg.AutomationCondition.in_progress(),
    description="Cost per request and per day, p50/p99 latency, cache hit rate and guard blocks "
    "over time: a PNG in MLflow and here, the figures as metadata.",
)
def cost_report(
    context: dg.AssetExecutionContext,
    config: CostReportConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
) -> dg.MaterializeResult:
    end = datetime.now(UTC)
    frame = load_traffic(postgres.engine, end - timedelta(days=config.window_days), end)
    if frame.empty:
        context.log.warning("the traffic log holds no request in the window: nothing to report")
        return dg.MaterializeResult(metadata={"requests": 0})
    summary = cost_summary(frame)
    png = Settings.from_env().home / "reports" / f"cost-{context.run_id[:8]}.png"
    with mlflow.asset_run(context, EXPERIMENT, params=config.model_dump()) as run:
        cost_plot(frame, png, config.bucket)
        run.log_metrics(summary.metrics())
        run.log_artifact(png)
        run.log_text(summary.per_day.to_csv(), "cost_per_day.csv")
    image = base64.b64encode(png.read_bytes()).decode()
    per_day = summary.per_day.reset_index()
    per_day["day"] = per_day["day"].dt.strftime("%Y-%m-%d")
    return dg.MaterializeResult(
        metadata={
            **{k: round(v, 8) for k, v in summary.metrics().items()},
            "per_day": dg.MetadataValue.md(per_day.to_markdown(index=False, floatfmt=".6g")),
            "plot": dg.MetadataValue.md(f"![cost report](data:image/png;base64,{image})"),
            "plot_path": dg.MetadataValue.path(str(png)),
            **mlflow_metadata(run),
        }
    )
