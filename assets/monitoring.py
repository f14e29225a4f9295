"""Monitoring: what the service logged, as a drift report and a cost report (MLflow + Dagster)."""

import base64
from datetime import timedelta
from typing import Literal

import dagster as dg
from pydantic import Field

from assets.resources import (
    EmbeddingModelResource,
    HomeResource,
    MLflowResource,
    PostgresResource,
    as_metadata,
    mlflow_metadata,
)
from evaluation.monitoring import (
    DriftOutcome,
    DriftThresholds,
    cost_over_window,
    drift_over_window,
)
from refinery.core.tracking import TrackedRun

GROUP = "monitoring"
EXPERIMENT = "refinery-monitoring"
DRIFT_CHECK = "drift_within_thresholds"
# One partition per UTC day; only complete days (end_offset 0): a day is judged once it is over.
# Backfills reach back to the start date; days before the service logged anything report "no
# traffic" (drift: a WARN check; cost: zero requests).
DAILY = dg.DailyPartitionsDefinition(start_date="2026-01-01", timezone="UTC")

# Written by the running service (serving/traffic.py), not by Dagster: an external asset, so
# that the lineage graph shows where the reports' data come from.
traffic_log = dg.AssetSpec(
    "traffic_log",
    group_name=GROUP,
    kinds={"postgres"},
    description="Sampled requests the BentoML service answered (table traffic_log): prompt and "
    "answer or their hashes, retrieval scores, latency, tokens, cost, cache hit, guard verdict.",
)


class DriftReportConfig(dg.Config):
    reference: Literal["previous_window", "evaluation_set"] = Field(
        default="previous_window",
        description="Compare the partition's day with the day before it, or with the evaluation "
        "question set (prompts only). An earlier day too small falls back to the question set.",
    )
    min_rows: int = Field(default=20, ge=5, description="Fewest requests a window may hold.")
    max_drifted_share: float = Field(default=0.5, ge=0, le=1)
    max_embedding_auc: float | None = Field(
        default=None,
        ge=0.5,
        le=1,
        description="Fail when the prompt-embedding classifier's ROC AUC is above this; empty: "
        "the method's own decision (a bootstrap test below 1,000 reference rows, AUC > 0.55).",
    )


@dg.asset(
    group_name=GROUP,
    deps=[traffic_log],
    kinds={"evidently", "mlflow"},
    partitions_def=DAILY,
    # The schedule judges each day at 06:00 UTC the next morning: no report for 30 hours means
    # the schedule (or the daemon) stopped, and Dagster shows the asset as not fresh.
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=30)),
    check_specs=[
        dg.AssetCheckSpec(
            DRIFT_CHECK,
            asset="drift_report",
            blocking=True,
            description="Fails (ERROR) when prompts, answers or retrieval scores drifted past the "
            "configured thresholds; the retraining sensor watches it. WARN: too little traffic.",
        )
    ],
    description="Evidently report of one day of traffic (a daily partition) against the day "
    "before it (or the evaluation question set): text "
    "descriptors of prompts and answers, prompt-embedding drift, retrieval-score drift, latency "
    "and cost. The HTML is an MLflow artifact, linked here.",
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftReportConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    embedding_model: EmbeddingModelResource,
    home: HomeResource,
) -> dg.MaterializeResult:
    day = context.partition_time_window
    with mlflow.asset_run(context, EXPERIMENT) as run:
        outcome = drift_over_window(
            postgres.engine, day.end, day.end - day.start,
            home.folder("reports"), run, reference=config.reference, min_rows=config.min_rows,
            thresholds=DriftThresholds(config.max_drifted_share, config.max_embedding_auc),
            # Loaded only when both windows hold enough traffic to compare.
            embed=lambda texts: embedding_model.get().encode(texts), log=context.log.info,
            pushgateway_url=home.runs.pushgateway_url,
        )  # fmt: skip
    if outcome.result is None:
        context.log.warning(f"no drift report: {outcome.skipped}")
    else:
        context.log.info(outcome.result.summary())
    return _drift_materialization(outcome, run)


def _drift_materialization(outcome: DriftOutcome, run: TrackedRun) -> dg.MaterializeResult:
    """The report's figures as metadata and the check's verdict: ERROR when the traffic
    drifted past the thresholds, WARN when there was too little traffic to tell."""
    result = outcome.result
    if result is None:
        check = dg.AssetCheckResult(
            check_name=DRIFT_CHECK, passed=False, severity=dg.AssetCheckSeverity.WARN,
            metadata={"reason": outcome.skipped},
        )  # fmt: skip
        metadata = {"skipped": outcome.skipped, "current_rows": outcome.current_rows}
        return dg.MaterializeResult(
            metadata={**metadata, **mlflow_metadata(run)}, check_results=[check]
        )
    check = dg.AssetCheckResult(
        check_name=DRIFT_CHECK, passed=result.passed, severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "failed_because": dg.MetadataValue.md(
                "\n".join(f"- {r}" for r in result.failed_because) or "nothing drifted"
            ),
            "drift_scores": dg.MetadataValue.json(result.scores()),
        },
    )  # fmt: skip
    metadata = {
        "reference": outcome.reference, **as_metadata(result.metadata()),
        "evidently_report": dg.MetadataValue.url(f"{run.url}/artifacts/{result.html.name}"),
        "report_path": dg.MetadataValue.path(str(result.html)),
    }  # fmt: skip
    return dg.MaterializeResult(
        metadata={**metadata, **mlflow_metadata(run)}, check_results=[check]
    )


class CostReportConfig(dg.Config):
    bucket: str = Field(
        default="1h", description="Plot resolution (a pandas offset: 15min, 1h, 1D)."
    )


@dg.asset(
    group_name=GROUP,
    deps=[traffic_log],
    kinds={"matplotlib", "mlflow"},
    partitions_def=DAILY,
    # The day just ended, reported shortly after midnight UTC while automation is on (not
    # `on_cron`: that also waits for the inputs to update, and the traffic log is written by the
    # service, not materialized); older days by backfill.
    automation_condition=(
        dg.AutomationCondition.cron_tick_passed("10 0 * * *", cron_timezone="UTC")
        & dg.AutomationCondition.in_latest_time_window()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("the day just ended, at 00:10 UTC"),
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=30)),
    description="One day's cost per request, p50/p99 latency, cache hit rate and guard blocks "
    "(a daily partition): a PNG in MLflow and here, the figures as metadata.",
)
def cost_report(
    context: dg.AssetExecutionContext,
    config: CostReportConfig,
    postgres: PostgresResource,
    mlflow: MLflowResource,
    home: HomeResource,
) -> dg.MaterializeResult:
    day = context.partition_time_window
    outcome = cost_over_window(
        postgres.engine, day.end, day.end - day.start, config.bucket,
        home.folder("reports"), mlflow.run_opener(context, EXPERIMENT),
    )  # fmt: skip
    if outcome is None:
        context.log.warning("the traffic log holds no request in the window: nothing to report")
        return dg.MaterializeResult(metadata={"requests": 0})
    image = base64.b64encode(outcome.png.read_bytes()).decode()
    per_day = outcome.summary.per_day.reset_index()
    per_day["day"] = per_day["day"].dt.strftime("%Y-%m-%d")
    return dg.MaterializeResult(
        metadata={
            **{k: round(v, 8) for k, v in outcome.summary.metrics().items()},
            "per_day": dg.MetadataValue.md(per_day.to_markdown(index=False, floatfmt=".6g")),
            "plot": dg.MetadataValue.md(f"![cost report](data:image/png;base64,{image})"),
            "plot_path": dg.MetadataValue.path(str(outcome.png)),
            **mlflow_metadata(run_id=outcome.run_id, url=outcome.run_url),
        }
    )
