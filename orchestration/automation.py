"""Sensors and schedules: what starts runs without a person pressing a button."""

from __future__ import annotations

import dagster as dg

from assets.resources import PostgresResource
from evaluation.review import count_ratings

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
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"ratings-{count}")], cursor=str(count)
    )
