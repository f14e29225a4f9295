"""The image lineage through Dagster on real parts: digits → a diffusers model trained briefly
(loss curve and sample grid in MLflow) → registered as refinery-image → judged by a classifier,
gated and promoted; a rerun reuses everything; a model below the floor is refused; a bad
checkpoint fails the asset saying why; the registered version loads through MLflow's pyfunc."""

from __future__ import annotations

import base64
import io

import dagster as dg
import pytest

from refinery.core.settings import Settings
from refinery.core.tracking import client_for

pytestmark = pytest.mark.e2e

WAIVED = {
    "promotion_policy": {"config": {"human_gate": "waived", "waiver_reason": "test: no people"}}
}


def run(ops: dict) -> dg.ExecuteInProcessResult:
    from orchestration.definitions import defs

    return defs.resolve_job_def("images").execute_in_process(
        run_config={"ops": ops, "resources": WAIVED},
        instance=dg.DagsterInstance.get(),
        raise_on_error=False,
    )


def ops(seed: int = 42, min_accuracy: float = 0.0, checkpoint: str = "") -> dict:
    return {
        "image_model": {
            "config": {"max_steps": 150, "batch_size": 64, "seed": seed, "checkpoint": checkpoint}
        },
        "image_evaluation": {"config": {"per_class": 4, "min_accuracy": min_accuracy}},
    }


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == asset
    ]
    return {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}


def test_image_model_trained_judged_registered_and_promoted(fresh_home, tmp_path):
    import mlflow.artifacts
    import mlflow.pyfunc
    from PIL import Image

    uri = Settings.from_env().mlflow_tracking_uri
    client = client_for(uri)
    first = run(ops())
    assert first.success
    model = metadata(first, "image_model")
    evaluation = metadata(first, "image_evaluation")
    assert evaluation["promoted"] is True
    # 150 steps make a weak model, but the judge must read it better than chance (0.1).
    assert evaluation["classifier_accuracy"] > 0.2
    assert evaluation["judge_test_accuracy"] > 0.9
    champion = client.get_model_version_by_alias("refinery-image", "champion")
    assert str(champion.version) == model["version"]
    assert float(champion.tags["refinery.eval.classifier_accuracy"]) == pytest.approx(
        evaluation["classifier_accuracy"], abs=1e-4
    )
    assert champion.tags["refinery.gate"] == "passed"
    assert champion.tags["dagster.asset_key"] == "image_model"
    # The version is a LoggedModel with the evaluation's metrics linked to it.
    linked = client.get_logged_model(champion.source.removeprefix("models:/")).metrics
    assert {m.key: m.value for m in linked}["classifier_accuracy"] == pytest.approx(
        evaluation["classifier_accuracy"], abs=1e-4
    )
    plots = {a.path for a in client.list_artifacts(champion.run_id, "plots")}
    assert any(p.endswith("-loss.png") for p in plots) and any(
        p.endswith("-samples.png") for p in plots
    )
    history = client.get_metric_history(champion.run_id, "train_loss")
    assert len(history) == 150 // 25 and history[-1].value < history[0].value

    # The registered version loads through MLflow (no pickle) and draws the same image twice.
    # (From the location the registry resolved: MLflow resolves a models:/<id> source through
    # its process-wide tracking URI, not the one given here.)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("refinery-image", champion.version),
        tracking_uri=uri,
        dst_path=str(tmp_path / "dl"),
    )
    loaded = mlflow.pyfunc.load_model(local)
    a, b = (loaded.predict(["a handwritten 7"], params={"seed": 3, "size": 32}) for _ in range(2))
    assert a == b
    assert Image.open(io.BytesIO(base64.b64decode(a[0]))).size == (32, 32)

    # A rerun with the same config trains nothing and registers nothing new.
    again = run(ops())
    assert again.success
    assert metadata(again, "image_model")["version"] == model["version"]
    assert len(client.search_model_versions("name = 'refinery-image'")) == 1

    # Another model that misses the floor is registered as challenger but not promoted.
    refused = run(ops(seed=7, min_accuracy=1.01))
    assert refused.success
    outcome = metadata(refused, "image_evaluation")
    assert outcome["promoted"] is False and "below the floor" in outcome["reasons"]
    still = client.get_model_version_by_alias("refinery-image", "champion")
    assert str(still.version) == model["version"]
    challenger = client.get_model_version_by_alias("refinery-image", "challenger")
    assert (
        str(challenger.version) != model["version"]
        and challenger.tags["refinery.gate"] == "refused"
    )

    # A checkpoint folder that is not a diffusers pipeline fails the asset, saying so.
    bad = run(ops(checkpoint=str(tmp_path)))
    assert not bad.success
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    assert "neither a diffusers pipeline" in str(failure.event_specific_data.error)
