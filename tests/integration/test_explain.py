"""`refinery explain`: a logged answer walked back to its model version, training run, SFT
dataset, approved user examples, corpus and chunks, on a real Postgres (the traffic log and the
chunks) and a real MLflow store (the registry and the runs).

The MLflow side is written here as the pipeline writes it (the same tag names and artifact);
`tests/e2e/test_share_nothing.py` explains an answer of a model the pipeline really trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from evaluation.provenance import ProvenanceError, explain, parse_answer_id, render
from refinery.core import schema
from refinery.core.lineage import TAG_CORPUS_HASH, TAG_DAGSTER_RUN_URL
from refinery.core.settings import TrafficSettings
from refinery.core.tracking import client_for, ensure_experiment
from tests.support import refinery

UI = "http://mlflow.example:5000"
SFT_HASH = "ab" * 32
ANSWER = "0123456789abcdef" * 2


def _corpus(store, small_corpus: Path, embedder) -> list[sa.RowMapping]:
    from refinery.corpus.chunking import ChunkingConfig
    from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents

    sync_documents(store, small_corpus)
    sync_chunks(store, make_chunker(ChunkingConfig(), embedder))
    c = schema.chunks
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(c).order_by(c.c.chunk_id).limit(2)).mappings())


def _lineage(uri: str, artifacts: Path, corpus_hash: str) -> tuple[str, str]:
    """A trained version's MLflow records, as the pipeline writes them: (training run, SFT run)."""
    client = client_for(uri)
    exp = ensure_experiment(client, "refinery-training", artifacts)
    sft = client.create_run(
        exp,
        tags={
            "refinery.sft_dataset_hash": SFT_HASH,
            "refinery.user_examples": "1",
            "refinery.user_examples_hash": "feed",
            TAG_DAGSTER_RUN_URL: "http://dagster.example/runs/sft-run",
        },
    ).info.run_id
    client.log_dict(
        sft, [{"example_id": "ex1", "source": "file:f.jsonl:1", "reviewed_by": "eve"}],
        "user_examples.json",
    )  # fmt: skip
    client.set_terminated(sft)
    train = client.create_run(
        exp, tags={TAG_DAGSTER_RUN_URL: "http://dagster.example/runs/train-run"}
    ).info.run_id
    client.set_terminated(train)
    client.create_registered_model("explain-chat")
    client.create_model_version(
        "explain-chat", f"runs:/{train}/model", run_id=train,
        tags={
            "refinery.sft_dataset_hash": SFT_HASH,
            TAG_CORPUS_HASH: corpus_hash,
            "refinery.lora_config": '{"r": 8, "lora_alpha": 16}',
            "refinery.training_key": "key123",
            "refinery.base_model": "smollm2-135m-instruct",
            TAG_DAGSTER_RUN_URL: "http://dagster.example/runs/train-run",
        },
    )  # fmt: skip
    client.create_registered_model("imported-chat")
    client.create_model_version("imported-chat", f"runs:/{train}/model", run_id=train)
    return train, sft


def _log_answer(db_url: str, answer_id: str, model: str, sources: list[dict]) -> None:
    from serving.traffic import TrafficLog

    log = TrafficLog(lambda: sa.create_engine(db_url), TrafficSettings(sample_rate=1.0,
                                                                       flush_s=0.05))  # fmt: skip
    try:
        assert log.record(
            endpoint="rag", model=model, prompt="How long does a worker take?",
            answer="21 days.", latency_s=0.2, answer_id=answer_id, sources=sources,
        )  # fmt: skip
        assert log.flush(10) and log.written == 1, log.dropped
    finally:
        log.close()


def test_an_answer_walks_back_to_its_version_run_dataset_corpus_and_chunks(
    store, db_url, small_corpus, embedder, mlflow_uri, tmp_path
):
    chunks = _corpus(store, small_corpus, embedder)
    train, sft = _lineage(mlflow_uri, tmp_path / "artifacts", store.corpus_hash())
    gone = "f" * 32  # a chunk the corpus no longer has
    given = [
        {"chunk_id": chunks[0]["chunk_id"], "source": chunks[0]["source"], "score": 0.81},
        {"chunk_id": chunks[1]["chunk_id"], "source": chunks[1]["source"], "score": 0.5},
        {"chunk_id": gone, "source": "old.md", "score": 0.2},
    ]
    _log_answer(db_url, ANSWER, "explain-chat/1", given)

    prov = explain(store.engine, mlflow_uri, UI, f"chatcmpl-{ANSWER}")
    assert prov.answer_id == ANSWER and prov.endpoint == "rag" and prov.model == "explain-chat/1"
    assert prov.version["url"] == f"{UI}/#/models/explain-chat/versions/1"
    assert prov.version["adapter"] == {"r": 8, "lora_alpha": 16}
    assert prov.version["training_key"] == "key123"
    assert prov.training_run["run_id"] == train and f"/runs/{train}" in prov.training_run["url"]
    assert prov.training_run["dagster_run_url"] == "http://dagster.example/runs/train-run"
    assert prov.sft_dataset["content_hash"] == SFT_HASH and prov.sft_dataset["run_id"] == sft
    assert prov.sft_dataset["approved_examples"] == [
        {"example_id": "ex1", "source": "file:f.jsonl:1", "reviewed_by": "eve"}
    ]
    assert prov.corpus["unchanged"] is True
    assert [c["chunk_id"] for c in prov.chunks] == [g["chunk_id"] for g in given]
    assert prov.chunks[0]["text"] == chunks[0]["text"] and prov.chunks[2]["text"] is None
    text = render(prov)
    for expected in (
        "model version explain-chat/1", "training run", f"SFT dataset {SFT_HASH}",
        "ex1 from file:f.jsonl:1, approved by eve", "http://dagster.example/runs/sft-run",
        "(no longer in the store", "unchanged since",
    ):  # fmt: skip
        assert expected in text, text

    # The corpus changes after training: the chain says so.
    (small_corpus / "new-note.md").write_text("# Drones\n\nDrones do not sting.\n")
    from refinery.ingestion.sync import sync_documents

    sync_documents(store, small_corpus)
    assert explain(store.engine, mlflow_uri, UI, ANSWER).corpus["unchanged"] is False


def test_versions_without_lineage_and_unknown_or_malformed_ids(store, db_url, mlflow_uri, tmp_path):
    _lineage(mlflow_uri, tmp_path / "artifacts", "")
    other = "9" * 32
    _log_answer(db_url, other, "imported-chat/1", [])
    prov = explain(store.engine, mlflow_uri, UI, other)
    assert prov.version["name"] == "imported-chat" and not prov.sft_dataset
    assert any("has no training lineage" in n for n in prov.notes)
    with pytest.raises(ProvenanceError, match=r"no answer with id 1{32} in the traffic log"):
        explain(store.engine, mlflow_uri, UI, "1" * 32)
    for bad in ("", "12345", "chatcmpl-xyz", "G" * 32):
        with pytest.raises(ProvenanceError, match="is not an answer id"):
            parse_answer_id(bad)
    assert parse_answer_id(f" CHATCMPL-{'A' * 32} ") == "a" * 32


def test_the_command_prints_the_chain_and_refuses_an_unknown_id(
    store, db_url, mlflow_uri, tmp_path
):
    _lineage(mlflow_uri, tmp_path / "artifacts", store.corpus_hash())
    _log_answer(db_url, ANSWER, "explain-chat/1", [])
    env = {"REFINERY_DATABASE_URL": db_url, "REFINERY_MLFLOW_TRACKING_URI": mlflow_uri,
           "REFINERY_MLFLOW_UI_URL": UI}  # fmt: skip
    shown = refinery("explain", ANSWER, env=env, timeout=120)
    assert f"answer {ANSWER}: rag" in shown.stdout and f"SFT dataset {SFT_HASH}" in shown.stdout
    unknown = refinery("explain", "2" * 32, env=env, check=False, timeout=120)
    assert unknown.returncode == 1 and "no answer with id" in unknown.stderr
    malformed = refinery("explain", "not-an-id", env=env, check=False, timeout=120)
    assert malformed.returncode == 1 and "is not an answer id" in malformed.stderr
