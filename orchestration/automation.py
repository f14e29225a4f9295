"""Sensors and schedules: what starts runs without a person pressing a button."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from assets.monitoring import DAILY
from assets.resources import HomeResource, PostgresResource
from evaluation.review import count_ratings
from orchestration.cluster import model_job_tags
from refinery.core.settings import RunSettings
from refinery.ingestion.sync import corpus_changes
from training.user_data import count_approved

# New ratings that make it worth recomputing the human aggregate and the promotion gate.
MIN_NEW_RATINGS = 5

promote_job = dg.define_asset_job(
    "promote",
    selection=dg.AssetSelection.assets("human_evaluation", "champion_model"),
    description="Aggregate human ratings, run the promotion gate, move the champion alias if it passes.",
)


@dg.sensor(
    job=promote_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING
)
def human_ratings_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    """Starts `promote` when at least MIN_NEW_RATINGS ratings arrived since its last request."""
    count = count_ratings(postgres.engine)
    last = int(context.cursor or 0)
    if count < last:  # ratings were deleted (a reset): start counting again
        last = 0
    if count - last < MIN_NEW_RATINGS:
        return dg.SensorResult(
            skip_reason=f"{count - last} new ratings (waiting for {MIN_NEW_RATINGS})",
            cursor=str(last),
        )
    if job_busy(context.instance, "promote"):
        # Keep the cursor: the new ratings are still new when the running promotion ends.
        return dg.SensorResult(
            skip_reason=f"a promote run is in progress; {count - last} new ratings wait for it",
            cursor=str(last),
        )
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"ratings-{count}")], cursor=str(count)
    )


# ---------------------------------------------------------------------------------------------
# Closing the loop: new documents, drift and new approved data start runs on their own.
#
# Flood control: every sensor here looks at the current state (not at events it missed), asks
# for at most one run per tick, and skips while a run of its job is queued or in progress, so
# switching automation back on after a pause starts one run, not a backlog. Schedules catch up
# at most one missed tick (`max_catchup_runs: 1` in dagster.yaml) and runs tagged
# `refinery/pool: models` (training, evaluation) run one at a time (run tag limit).

IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
MODELS_POOL = {"refinery/pool": "models"}
# Model jobs: one at a time (the pool) and, on Kubernetes, a bigger or a GPU pod (cluster.py).
# Job tags are fixed when a job is defined, so the run settings are read here, when the
# definitions load: the one read of the environment at import, on purpose (see cluster.py).
MODEL_JOB_TAGS = {**MODELS_POOL, **model_job_tags(RunSettings.from_env())}
# Approved user examples that make a retraining worth it.
MIN_NEW_APPROVED = 5
DRIFT_CHECK_KEY = dg.AssetCheckKey(dg.AssetKey("drift_report"), "drift_within_thresholds")

monitor_job = dg.define_asset_job(
    "monitor",
    selection=dg.AssetSelection.assets("drift_report", "cost_report"),
    description="Drift and cost reports over the traffic log.",
)
retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.groups("training", "evaluation"),
    tags=MODEL_JOB_TAGS,
    description="New SFT data (with approved user examples) → challenger → evaluation → gate.",
)


def job_busy(instance: dg.DagsterInstance, job_name: str) -> bool:
    """A run of this job is queued or in progress."""
    filters = dg.RunsFilter(job_name=job_name, statuses=IN_PROGRESS)
    return bool(instance.get_run_records(filters=filters, limit=1))


@dg.sensor(
    job_name="ingest",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def corpus_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource, home: HomeResource
) -> dg.SensorResult:
    """Starts `ingest` for just the files that are new, changed or gone in the corpus folder
    (compared by name, size and modification time with what was ingested; no file is read)."""
    corpus = home.corpus_dir
    if job_busy(context.instance, "ingest"):
        return dg.SensorResult(skip_reason="an ingest run is in progress; changes wait for it")
    try:
        changes = corpus_changes(postgres.store(), corpus)
    except NotADirectoryError as err:
        return dg.SensorResult(skip_reason=str(err))
    if not changes.paths:
        return dg.SensorResult(skip_reason=f"no change among {changes.files} files in {corpus}")
    paths = changes.paths
    config = {"corpus_dir": str(corpus), "paths": paths}
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"corpus-{changes.fingerprint()}",
                run_config={"ops": {"source_documents": {"config": config}}},
                tags={
                    "refinery/trigger": "corpus_sensor",
                    "refinery/changed_files": str(len(changes.changed)),
                    "refinery/removed_files": str(len(changes.removed)),
                },
            )
        ]
    )


@dg.schedule(
    job=monitor_job,
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def daily_drift_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """Every morning: the drift and cost reports of the day that just ended (the newest
    complete partition)."""
    if job_busy(context.instance, "monitor"):
        return dg.SkipReason("a monitor run is still in progress")
    now = context.scheduled_execution_time or datetime.now(UTC)
    day = (now.astimezone(UTC).date() - timedelta(days=1)).isoformat()
    if not DAILY.has_partition_key(day):
        return dg.SkipReason(f"{day} is not a daily partition (they start {DAILY.start:%Y-%m-%d})")
    return dg.RunRequest(
        run_key=f"monitor-{day}", partition_key=day,
        tags={"refinery/trigger": "daily_drift_schedule"},
    )  # fmt: skip


@dg.schedule(
    job=retrain_job,
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def weekly_retraining_schedule(
    context: dg.ScheduleEvaluationContext,
) -> dg.RunRequest | dg.SkipReason:
    """Mondays 03:00 UTC: retrain on the current data; the gate decides whether it is promoted."""
    if job_busy(context.instance, "retrain"):
        return dg.SkipReason("a retraining run is still in progress")
    return dg.RunRequest(tags={"refinery/trigger": "weekly_retraining_schedule"})


def newest_day() -> str | None:
    """The newest complete daily partition (yesterday, UTC)."""
    return DAILY.get_last_partition_key()


def _evaluated_day(instance: dg.DagsterInstance, record: Any) -> str | None:
    """The daily partition a drift check evaluation judged."""
    event = record.event.dagster_event if record.event else None
    evaluation = event.event_specific_data if event else None
    day = getattr(evaluation, "partition", None)
    if day is None:
        run = instance.get_run_by_id(record.run_id)
        day = run.tags.get("dagster/partition") if run else None
    return day


def _drift_failed(record: Any) -> bool:
    """The check evaluation failed at ERROR severity (WARN means: too little traffic)."""
    event = record.event if record is not None else None
    evaluation = event.dagster_event.event_specific_data if event and event.dagster_event else None
    return bool(
        evaluation is not None
        and getattr(evaluation, "passed", True) is False
        and getattr(evaluation, "severity", None) == dg.AssetCheckSeverity.ERROR
    )


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def retraining_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    """Starts `retrain` when the drift check of the newest complete day failed (once per day:
    a backfill of older days, or judging the same day again, starts nothing), or when at
    least MIN_NEW_APPROVED user examples were approved since the last retraining it started."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen_check = int(cursor.get("drift_record", 0))
    acted_day = str(cursor.get("drift_day", ""))
    used_approved = int(cursor.get("approved", 0))
    record = context.instance.get_latest_asset_check_evaluation_record(DRIFT_CHECK_KEY)
    approved = count_approved(postgres.engine)
    reasons = []
    day = _evaluated_day(context.instance, record) if record is not None else None
    if (
        record is not None
        and record.id > seen_check
        and _drift_failed(record)
        and day is not None
        and day == newest_day()
        and day != acted_day
    ):
        reasons.append(f"drift check of {day} failed (run {record.run_id[:8]})")
        acted_day = day
    if approved - used_approved >= MIN_NEW_APPROVED:
        reasons.append(f"{approved - used_approved} newly approved user examples")
    if not reasons:
        # Remember the check we looked at (a passing one must not fire later); not the count.
        latest = record.id if record is not None else seen_check
        return dg.SensorResult(
            skip_reason=f"no drift failure; {approved - used_approved} new approved examples "
            f"(waiting for {MIN_NEW_APPROVED})",
            cursor=json.dumps(
                {"drift_record": latest, "drift_day": acted_day, "approved": used_approved}
            ),
        )
    if job_busy(context.instance, "retrain"):
        # Keep the cursor: the reason is still there when the running retraining ends.
        return dg.SensorResult(skip_reason="a retraining run is in progress; " + "; ".join(reasons))
    latest = record.id if record is not None else seen_check
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"retrain-{latest}-{approved}",
                tags={
                    "refinery/trigger": "retraining_sensor",
                    "refinery/reason": "; ".join(reasons),
                },
            )
        ],
        cursor=json.dumps({"drift_record": latest, "drift_day": acted_day, "approved": approved}),
    )
