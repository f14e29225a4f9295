"""The training half of the graph through Dagster: a challenger in the MLflow registry whose
lineage reaches back to the Dagster run, and a rerun that changes nothing."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from refinery.settings import Settings
from refinery.tracking import client_for
from tests.conftest import SAMPLE_CORPUS

pytestmark = pytest.mark.e2e

SMALL = {
    "lora_adapter": {
        "config": {"max_steps": 3, "eval_every": 3, "save_every": 3, "warmup_steps": 1}
    },
    "quantized_models": {"config": {"variants": ["torch-int8"], "eval_rows": 8, "gen_tokens": 8}},
}


def run(job: str, ops: dict) -> dg.ExecuteInProcessResult:
    from orchestration.definitions import defs

    return defs.resolve_job_def(job).execute_in_process(
        run_config={"ops": ops}, instance=dg.DagsterInstance.get(), raise_on_error=False
    )


def metadata(result, asset: str) -> dict:
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == asset
    ]
    return {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}


def test_train_job_registers_a_challenger_with_its_lineage(fresh_home, tmp_path):
    ingest = run("ingest", {"source_documents": {"config": {"corpus_dir": str(SAMPLE_CORPUS)}}})
    assert ingest.success
    result = run("train", SMALL)
    assert result.success
    cand, adapter = metadata(result, "candidate_model"), metadata(result, "lora_adapter")
    assert cand["model_uri"] == "models:/refinery-chat@challenger" and cand["version"] == "1"
    assert adapter["eval_loss_after"] < adapter["eval_loss_before"]

    client = client_for(Settings.from_env().mlflow_tracking_uri)
    mv = client.get_model_version_by_alias("refinery-chat", "challenger")
    tags = mv.tags
    assert tags["dagster.run_id"] == result.run_id
    assert tags["refinery.base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(tags["refinery.base_model_checksum"]) == 64
    assert tags["refinery.sft_dataset_hash"] == metadata(result, "sft_dataset")["content_hash"]
    assert tags["refinery.corpus_hash"] == metadata(ingest, "source_documents")["corpus_hash"]
    assert '"max_steps": 3' in tags["refinery.lora_config"]
    assert "torch-int8" in tags["refinery.quantize_config"]
    assert tags["refinery.code_version"]
    # The version's run is the training run: loss curve, quantization table, dataset inputs.
    training_run = client.get_run(mv.run_id)
    assert mv.run_id == adapter["mlflow_run_id"]
    history = client.get_metric_history(mv.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
    assert {"loss_curve.png", "quantization.md", "adapter"} <= artifacts
    assert {d.dataset.name for d in training_run.inputs.dataset_inputs} == {"sft-train", "sft-eval"}
    assert (
        client.get_model_version_by_alias("refinery-chat-torch-int8", "challenger").tags[
            "refinery.source_version"
        ]
        == "refinery-chat/1"
    )
    # The OpenVINO export that the CPU serving engine runs travels with the version.
    ov = metadata(result, "openvino_model")
    assert ov["weight_format"] == "int8" and ov["reused"] is False and ov["size_mb"] > 50
    local = client.download_artifacts(mv.run_id, "model-none/MLmodel", str(tmp_path))
    mlmodel = yaml.safe_load(Path(local).read_text())
    artifacts = mlmodel["flavors"]["python_function"]["artifacts"]
    assert set(artifacts) == {"model", "openvino"}

    # Unchanged inputs: nothing is trained, merged, quantized or registered again.
    again = run("train", SMALL)
    assert again.success
    assert metadata(again, "lora_adapter")["reused"] is True
    assert metadata(again, "quantized_models")["reused"] is True
    assert metadata(again, "openvino_model")["reused"] is True
    assert metadata(again, "candidate_model")["version"] == "1"
    assert len(client.search_model_versions("name = 'refinery-chat'")) == 1


BAD_CASES = [
    (
        {"base_model": {"config": {"model": "/no/such/model"}}},
        "base_model",
        "neither a local folder",
    ),
    ({"sft_dataset": {"config": {"path": "BAD"}}}, "sft_dataset", "only 0 usable rows"),
    ({"lora_adapter": {"config": {"r": 0}}}, "lora_adapter", "r must be > 0"),
    ({"lora_adapter": {"config": {"device": "cuda"}}}, "lora_adapter", "no CUDA device"),
    (
        {"lora_adapter": {"config": {"target_modules": ["qkv"]}}},
        "lora_adapter",
        "unknown LoRA target modules",
    ),
]


def test_bad_training_input_fails_the_asset_with_what_to_fix(fresh_home, tmp_path):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{oops\n{"instruction": "", "response": "x"}\n')
    for ops, failing_step, message in BAD_CASES:  # one home: the base model converts once
        if failing_step == "sft_dataset":
            ops = {"sft_dataset": {"config": {"path": str(bad_data)}}}
        result = run("train", {**SMALL, **ops})
        assert not result.success
        failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert [e.step_key for e in failures] == [failing_step]
        assert message in failures[0].event_specific_data.error.message
        registered = client_for(Settings.from_env().mlflow_tracking_uri).search_registered_models()
        assert registered == []  # no error path registers anything
