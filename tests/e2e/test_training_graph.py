"""The training half of the graph through Dagster: a challenger in the MLflow registry whose
lineage reaches back to the Dagster run, and a rerun that changes nothing."""

from __future__ import annotations

import shutil
import subprocess
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import mlflow.artifacts
import pytest
import yaml

from refinery.core.settings import Settings
from refinery.core.tracking import client_for
from tests.conftest import SAMPLE_CORPUS
from tests.support import REFINERY, kill_embedded_postgres

pytestmark = pytest.mark.e2e

SMALL = {
    "lora_adapter": {
        "config": {"max_steps": 3, "eval_every": 3, "save_every": 3, "warmup_steps": 1}
    },
    "quantized_models": {"config": {"variants": ["torch-int8"], "eval_rows": 8, "gen_tokens": 8}},
}


def run(job: str, ops: dict, run_id: str | None = None) -> dg.ExecuteInProcessResult:
    from orchestration.definitions import defs

    return defs.resolve_job_def(job).execute_in_process(
        run_config={"ops": ops}, instance=dg.DagsterInstance.get(), raise_on_error=False,
        run_id=run_id,
    )  # fmt: skip


def with_steps(n: int) -> dict:
    """SMALL with n steps and no OpenVINO export (the first run checks that, 60 s a time)."""
    return {
        **SMALL,
        "lora_adapter": {"config": {**SMALL["lora_adapter"]["config"], "max_steps": n}},
        "openvino_model": {"config": {"enabled": False}},
    }


def kill_postgres_when_inputs_loaded(
    run_id: str, step: str, inputs: int, stop: threading.Event
) -> Future[bool]:
    """In the background: SIGKILL the embedded Postgres as soon as ``step`` of the run has
    loaded its ``inputs`` hand-offs (from Postgres), while it works. The future says whether it
    did (False: ``stop`` was set first); an error in the watcher is raised by its
    ``result()``, not lost with its thread."""

    def watch() -> bool:
        instance = dg.DagsterInstance.get()
        while not stop.is_set():
            records = instance.get_records_for_run(
                run_id, of_type=dg.DagsterEventType.LOADED_INPUT
            ).records
            if sum(r.event_log_entry.step_key == step for r in records) >= inputs:
                kill_embedded_postgres(Settings.from_env())
                return True
            stop.wait(0.2)  # polling the run's event log
        return False

    pool = ThreadPoolExecutor(1, thread_name_prefix="kill-postgres")
    try:
        return pool.submit(watch)
    finally:
        pool.shutdown(wait=False)


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
    # The version is an MLflow 3 LoggedModel: an output of the training run, READY, with the
    # version's lineage tags, listing the version it was registered as.
    model_id = mv.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert mv.source == f"models:/{logged.model_id}" and str(logged.status) == "READY"
    assert logged.source_run_id == mv.run_id
    assert logged.tags["refinery.lineage_key"] == tags["refinery.lineage_key"]
    assert '"version": "1"' in logged.tags["mlflow.modelVersions"]
    assert model_id in {o.model_id for o in training_run.outputs.model_outputs}
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("refinery-chat", mv.version)
        + "/MLmodel",
        tracking_uri=Settings.from_env().mlflow_tracking_uri,
        dst_path=str(tmp_path),
    )
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

    # Two runs at once, both writing MLflow and Postgres: an ingest (another process) of a
    # grown corpus while a changed training runs here. Neither sees "database is locked" and
    # neither loses a row.
    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    (corpus / "new-note.md").write_text("# Drone congregation areas\n\nDrones gather in areas.")
    ingest_proc = subprocess.Popen(
        [REFINERY, "ingest", "--corpus", str(corpus)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    both = run("train", with_steps(4))
    ingest_out, _ = ingest_proc.communicate(timeout=600)
    assert both.success
    assert ingest_proc.returncode == 0, ingest_out[-3000:]
    assert "database is locked" not in ingest_out
    v2 = metadata(both, "lora_adapter")
    assert metadata(both, "candidate_model")["version"] == "2"
    assert [m.step for m in client.get_metric_history(v2["mlflow_run_id"], "loss")] == [1, 2, 3, 4]
    ingest_runs = client.search_runs(
        [client.get_experiment_by_name("refinery-ingestion").experiment_id],
        filter_string="tags.`dagster.asset_key` = 'source_documents'",
    )
    assert any(r.data.metrics.get("documents") == 35 for r in ingest_runs)

    # Postgres crashes while a training run is under way: the step that needs it after the
    # crash (lora_adapter, handing its adapter on through Postgres) fails saying so, nothing is
    # half-registered, and the rerun (which starts Postgres again) completes without training
    # anything twice.
    from orchestration.cli import _step_failures

    run_id = str(uuid.uuid4())
    stop = threading.Event()
    watcher = kill_postgres_when_inputs_loaded(run_id, "lora_adapter", 2, stop)
    try:
        crashed = run("train", with_steps(5), run_id=run_id)
    finally:
        stop.set()
    assert watcher.result(timeout=60), "Postgres was not killed while lora_adapter ran"
    assert not crashed.success
    failures = dict(_step_failures(crashed.all_events))
    assert list(failures) == ["lora_adapter"], failures
    assert "the database connection was lost" in failures["lora_adapter"]
    assert len(client.search_model_versions("name = 'refinery-chat'")) == 2
    rerun = run("train", with_steps(5))
    assert rerun.success
    assert metadata(rerun, "lora_adapter")["reused"] is True  # trained once, before the crash
    assert metadata(rerun, "candidate_model")["version"] == "3"
    assert len(client.search_model_versions("name = 'refinery-chat'")) == 3


BAD_CASES = [
    (
        {"base_model": {"config": {"model": "/no/such/model"}}},
        "base_model",
        "neither a local folder",
    ),
    ({"sft_dataset": {"config": {"path": "BAD"}}}, "sft_dataset", "only 0 usable rows"),
    # Nothing ingested in this home: RAG-format examples need the retriever's chunks.
    ({"sft_dataset": {"config": {"format": "rag"}}}, "sft_dataset", "run `refinery ingest` first"),
    ({"lora_adapter": {"config": {"r": 0}}}, "lora_adapter", "r must be > 0"),
    (
        {"lora_adapter": {"config": {"target_modules": ["qkv"]}}},
        "lora_adapter",
        "unknown LoRA target modules",
    ),
]


# Bad only where no CUDA device is present (where one is, device="cuda" is a valid choice).
NEEDS_CUDA = ({"lora_adapter": {"config": {"device": "cuda"}}}, "lora_adapter", "no CUDA device")


def test_bad_training_input_fails_the_asset_with_what_to_fix(fresh_home, tmp_path):
    import torch

    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{oops\n{"instruction": "", "response": "x"}\n')
    cases = BAD_CASES if torch.cuda.is_available() else [*BAD_CASES, NEEDS_CUDA]
    for ops, failing_step, message in cases:  # one home: the base model converts once
        if ops == {"sft_dataset": {"config": {"path": "BAD"}}}:
            ops = {"sft_dataset": {"config": {"path": str(bad_data)}}}
        # Bare questions unless the case says otherwise: this home has no chunks to retrieve.
        closed_book = {"sft_dataset": {"config": {"format": "closed_book"}}}
        result = run("train", {**SMALL, **closed_book, **ops})
        assert not result.success
        failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert [e.step_key for e in failures] == [failing_step]
        assert message in failures[0].event_specific_data.error.message
        registered = client_for(Settings.from_env().mlflow_tracking_uri).search_registered_models()
        assert registered == []  # no error path registers anything
