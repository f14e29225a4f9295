"""The promotion cycle through Dagster on the real model: a first model promoted, a worse one
refused (nothing moves, the reasons are recorded), a better one held back until people rate it
and then promoted by the `promote` job, and a rollback."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import sqlalchemy as sa

from evaluation import review
from evaluation.promotion import rollback
from refinery.core.settings import Settings
from refinery.core.stores import database_url
from refinery.core.tracking import client_for
from tests.conftest import SAMPLE_CORPUS

pytestmark = pytest.mark.e2e

SMALL_TRAINING = {
    "quantized_models": {"config": {"variants": ["torch-int8"], "eval_rows": 4, "gen_tokens": 4}},
}
# Only the first model is exported to OpenVINO (60 s a time on 2 cores): as the champion it is
# evaluated through the OpenVINO engine in every evaluate run, the later challengers through
# transformers'.
NO_OPENVINO = {"openvino_model": {"config": {"enabled": False}}}
SMALL_EVAL = {
    "automatic_evaluation": {"config": {"heldout_limit": 8, "rag_limit": 4, "max_new_tokens": 24}},
    "human_evaluation": {"config": {"sample_per_model": 4}},
}
# The gate on held-out perplexity only (thresholds live in config): deterministic on 8 rows.
# A perplexity-only gate: a 2-step model over 4 RAG questions is not held to the answer floors.
GATE = {
    "rules": ["heldout_perplexity"],
    "tolerances": {"heldout_perplexity": 0.02},
    "floors": {"rag_answered_right": 0.0, "rag_wrong_shown": 1.0},
}
WAIVED = {
    "promotion_policy": {
        "config": {**GATE, "human_gate": "waived", "waiver_reason": "test: no people"}
    }
}
HUMANS = {
    "promotion_policy": {
        "config": {
            **GATE,
            "human_gate": "required",
            "min_ratings": 3,
            "min_mean": 4.0,
            "min_ci_low": 3.8,
        }
    }
}


def run(
    job: str, ops: dict, resources: dict | None = None, tags: dict | None = None
) -> dg.ExecuteInProcessResult:
    from orchestration.definitions import defs

    config = {"ops": ops, **({"resources": resources} if resources else {})}
    return defs.resolve_job_def(job).execute_in_process(
        run_config=config, instance=dg.DagsterInstance.get(), raise_on_error=False, tags=tags
    )


def train(lr: float, steps: int, openvino: bool = False) -> str:
    lora = {
        "lora_adapter": {
            "config": {
                "learning_rate": lr,
                "max_steps": steps,
                "eval_every": steps,
                "save_every": steps,
                "warmup_steps": 0,
            }
        }
    }
    result = run("train", {**SMALL_TRAINING, **lora, **({} if openvino else NO_OPENVINO)})
    assert result.success
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "candidate_model"
    ]
    return event.event_specific_data.materialization.metadata["version"].value


def gate_result(result) -> tuple[bool, list[str]]:
    (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "promotion_gate"]
    return check.passed, [
        line[2:] for line in check.metadata["reasons"].value.splitlines()
    ] if "reasons" in check.metadata else []


def test_refuse_worse_promote_better_after_human_review_and_roll_back(fresh_home):
    assert run(
        "ingest", {"source_documents": {"config": {"corpus_dir": str(SAMPLE_CORPUS)}}}
    ).success
    uri = Settings.from_env().mlflow_tracking_uri
    client = client_for(uri)

    def champion() -> str:
        return str(client.get_model_version_by_alias("refinery-chat", "champion").version)

    # 1. The first model: no champion yet, the human gate explicitly waived -> promoted.
    v1 = train(lr=1e-5, steps=2, openvino=True)
    first = run("evaluate", SMALL_EVAL, WAIVED)
    assert first.success and gate_result(first)[0]
    assert champion() == v1
    tags = client.get_model_version("refinery-chat", v1).tags
    assert (
        tags["refinery.promotion.passed"] == "true"
        and tags["refinery.promotion.human_waived"] == "true"
    )
    assert any(
        "WAIVED: test: no people" in r for r in json.loads(tags["refinery.promotion.reasons"])
    )
    assert (
        client.get_model_version_by_alias("refinery-chat-torch-int8", "champion").tags[
            "refinery.source_version"
        ]
        == f"refinery-chat/{v1}"
    )

    # 2. A ruined model (learning rate 0.3): refused, nothing moves, the reasons are on the version.
    v2 = train(lr=0.3, steps=4)
    refused = run("evaluate", SMALL_EVAL, WAIVED)
    passed, reasons = gate_result(refused)
    assert not passed and not refused.success
    assert any(
        r.startswith("heldout_perplexity:") and "higher than the champion's" in r for r in reasons
    )
    assert champion() == v1
    tags = client.get_model_version("refinery-chat", v2).tags
    assert tags["refinery.promotion.passed"] == "false"
    assert json.loads(tags["refinery.promotion.inputs"])["champion"] == f"refinery-chat/{v1}"
    # The rule compared the two models example by example; the interval is on the version.
    (ppl,) = [
        c
        for c in json.loads(tags["refinery.promotion.checks"])
        if c["metric"] == "heldout_perplexity"
    ]
    assert ppl["method"] == "paired bootstrap" and ppl["examples"] == 8 and not ppl["ok"]
    assert ppl["bound"] == ppl["interval"][1] > 0.02  # higher perplexity is worse: the upper end

    # 3. A better model waits for people: no ratings, no promotion ...
    v3 = train(lr=5e-4, steps=8)
    waiting = run("evaluate", SMALL_EVAL, HUMANS)
    passed, reasons = gate_result(waiting)
    assert not passed and any("human gate: no ratings yet" in r for r in reasons)
    assert champion() == v1
    # ... three reviewers rate its answers 5 on the (blind) queue; the promote job moves it.
    engine = sa.create_engine(database_url(Settings.from_env()))
    with engine.connect() as conn:
        items = list(
            conn.execute(
                sa.text("SELECT item_id FROM review_items WHERE model = :m"),
                {"m": f"refinery-chat/{v3}"},
            ).scalars()
        )
    assert len(items) == 4
    for name in ("ana", "bo", "cy"):
        who = review.authenticate(engine, review.add_reviewer(engine, name))
        review.rate(engine, uri, who, items[0], 5)
    engine.dispose()
    promoted = run("promote", {"human_evaluation": {"config": {"sample_per_model": 4}}}, HUMANS)
    passed, reasons = gate_result(promoted)
    assert promoted.success and passed, reasons
    assert any("human gate: mean 5.00" in r for r in reasons)
    assert champion() == v3
    assert (
        client.get_model_version("refinery-chat", v3).tags["refinery.promotion.previous_champion"]
        == v1
    )

    # 4. Rollback: back to v1, the variant too.
    assert rollback(uri, "refinery-chat") == (v3, v1)
    assert champion() == v1
    assert (
        client.get_model_version_by_alias("refinery-chat-torch-int8", "champion").tags[
            "refinery.source_version"
        ]
        == f"refinery-chat/{v1}"
    )

    # 5. The Bento follows the champion: built through Dagster, pinned to v1, and a rebuild
    # with nothing changed reuses it.
    def bento() -> dict:
        result = run("package", {})
        assert result.success
        (event,) = result.get_asset_materialization_events()
        metadata = event.event_specific_data.materialization.metadata
        return {k: v.value for k, v in metadata.items()}

    built = bento()
    assert built["model_version"] == f"refinery-chat/{v1}" and built["reused"] is False
    from serving.bento import list_bentos

    (info,) = [b for b in list_bentos(Settings.from_env()) if b["tag"] == built["bento"]]
    assert info["labels"]["refinery.model_version"] == v1
    again = bento()
    assert again["bento"] == built["bento"] and again["reused"] is True

    # 6. The loop: users' examples are proposed and approved (by someone else), which makes the
    # retraining sensor start `retrain`; the new challenger carries the examples' lineage and
    # goes through the same gate, which promotes it over v1.
    from assets.resources import PostgresResource
    from orchestration.automation import MIN_NEW_APPROVED, retraining_sensor
    from training.user_data import Proposal, list_examples, propose
    from training.user_data import review as review_examples

    engine = sa.create_engine(database_url(Settings.from_env()))
    proposals = [
        Proposal(
            f"What should a beekeeper check on inspection {i}?",
            "Eggs, larvae, stores and signs of disease.",
            f"file:feedback.jsonl:{i}",
        )
        for i in range(1, MIN_NEW_APPROVED + 1)
    ]
    propose(engine, proposals, submitted_by="dee")
    ids = [r["example_id"] for r in list_examples(engine, "pending")]
    review_examples(engine, ids, approve=True, reviewer="eve")
    engine.dispose()
    instance = dg.DagsterInstance.get()
    with dg.build_sensor_context(
        instance=instance, resources={"postgres": PostgresResource()}
    ) as ctx:
        tick = retraining_sensor(ctx)
    (request,) = tick.run_requests
    assert "approved user examples" in request.tags["refinery/reason"]
    # The run the sensor asked for: its job, its tags (trigger, reason) and its run key; the
    # test adds only the small training config and the waived human gate.
    lora = {"lora_adapter": {"config": {"learning_rate": 5e-4, "max_steps": 8, "eval_every": 8,
                                        "save_every": 8, "warmup_steps": 0}}}  # fmt: skip
    job = request.job_name or retraining_sensor.job_name
    tags = {**request.tags, "dagster/run_key": request.run_key}
    retrained = run(job, {**SMALL_TRAINING, **NO_OPENVINO, **lora, **SMALL_EVAL}, WAIVED, tags=tags)
    stored = instance.get_run_by_id(retrained.run_id)
    assert stored.job_name == "retrain" and stored.tags["refinery/trigger"] == "retraining_sensor"
    assert stored.tags["dagster/run_key"] == request.run_key
    metadata = {
        e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
        for e in retrained.get_asset_materialization_events()
    }
    assert metadata["sft_dataset"]["user_examples"].value == MIN_NEW_APPROVED
    assert sorted(metadata["sft_dataset"]["user_example_sources"].value) == sorted(
        p.source for p in proposals
    )
    v4 = metadata["candidate_model"]["version"].value
    passed, reasons = gate_result(retrained)
    assert retrained.success and passed, reasons
    assert champion() == v4
    sft_run = client.get_run(metadata["sft_dataset"]["mlflow_run_id"].value)
    assert sft_run.data.tags["refinery.user_examples"] == str(MIN_NEW_APPROVED)
