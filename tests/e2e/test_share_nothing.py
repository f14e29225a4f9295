"""Share-nothing runs: three homes on three empty disks, meeting only through one Postgres
server, one MLflow tracking server (artifacts proxied to its own store) and one Dagster
instance in Postgres. `refinery run` in home A; A's disk is deleted; `refinery evaluate` in
home B; B's disk is deleted; `refinery bento` and `refinery serve` in home C, which answers chat
and /rag from the champion. Each home is given only the three store variables."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from refinery.core.processes import stop_tree
from refinery.core.settings import isolated_env
from refinery.core.tracking import client_for
from tests.support import REFINERY, free_port, fresh_database, mlflow_server, refinery, wait_for

pytestmark = pytest.mark.e2e

WAIVED = {
    "promotion_policy": {
        "config": {
            "human_gate": "waived",
            "waiver_reason": "test: no people",
            "rules": ["heldout_perplexity"],
            "floors": {"rag_answered_right": 0.0, "rag_wrong_shown": 1.0},
        }
    }
}
EVALUATE = {
    "automatic_evaluation": {"config": {"heldout_limit": 8, "rag_limit": 4, "max_new_tokens": 24}},
    "human_evaluation": {"config": {"sample_per_model": 2}},
}
# Small enough for minutes on 2 cores; every kind of hand-off still crosses the homes.
RUN = {
    "resources": WAIVED,
    "ops": {
        "lora_adapter": {
            "config": {"max_steps": 2, "eval_every": 2, "save_every": 2, "warmup_steps": 0}
        },
        "quantized_models": {
            "config": {"variants": ["torch-int8"], "eval_rows": 4, "gen_tokens": 4}
        },
        "openvino_model": {"config": {"enabled": False}},
        "image_model": {"config": {"max_steps": 20, "batch_size": 32}},
        "image_evaluation": {"config": {"per_class": 2, "min_accuracy": 0.0}},
        **EVALUATE,
    },
}


def _env(home: Path, stores: dict[str, str]) -> dict[str, str]:
    """This process's environment without any store setting, plus ``stores``: nothing else
    tells the command where anything is."""
    return isolated_env(**stores, REFINERY_HOME=str(home))


def _config(tmp_path: Path, name: str, config: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_three_empty_homes_meet_only_through_the_servers(tmp_path: Path, server_url: str):
    a, b, c = (tmp_path / name for name in ("a", "b", "c"))
    with (
        fresh_database(server_url) as db,
        fresh_database(server_url) as dagster_db,
        mlflow_server(tmp_path / "mlflow-server") as mlflow_url,
    ):
        stores = {
            "REFINERY_DATABASE_URL": db,
            "REFINERY_MLFLOW_TRACKING_URI": mlflow_url,
            "REFINERY_DAGSTER_DATABASE_URL": dagster_db,
        }
        ran = refinery(
            "run", "--config", _config(tmp_path, "run", RUN), env=_env(a, stores), timeout=1200
        )
        assert "succeeded" in ran.stdout
        assert f"MLflow {mlflow_url}" in ran.stdout  # the hints name the configured server
        shutil.rmtree(a)  # nothing of A's disk is left

        evaluated = refinery(
            "evaluate", "--config", _config(tmp_path, "evaluate", {"resources": WAIVED, "ops": EVALUATE}),
            env=_env(b, stores), timeout=900,
        )  # fmt: skip
        assert "succeeded" in evaluated.stdout
        client = client_for(mlflow_url)
        champion = client.get_model_version_by_alias("refinery-chat", "champion")
        # B's evaluation read the hand-offs A wrote, from Postgres, and its models from MLflow.
        runs = client.search_runs(
            [client.get_experiment_by_name("refinery-evaluation").experiment_id]
        )
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 2  # A's and B's
        # Each evaluated model has an mlflow.genai.evaluate child run whose metrics are linked
        # to the version's LoggedModel: the Models tab shows the champion with its scores.
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {
            r.info.run_id for r in parents
        }
        logged = client.get_logged_model(champion.source.removeprefix("models:/"))
        linked = {m.key for m in logged.metrics}
        assert {"rag_token_f1/mean", "heldout_perplexity", "rag_answered_right"} <= linked
        shutil.rmtree(b)

        refinery("bento", env=_env(c, stores), timeout=600)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [REFINERY, "serve", "--port", str(port), "--follow", ""], env=_env(c, stores),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(
                lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 300, "C ready"
            )
            chat = httpx.post(
                f"{url}/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "What is propolis?"}],
                    "max_tokens": 8,
                },
                timeout=120,
            )
            assert chat.status_code == 200, chat.text
            assert chat.json()["choices"][0]["message"]["content"]
            # Served by the champion's version, pinned in C's Bento from the registry.
            assert chat.headers["x-refinery-model-version"].startswith(
                f"refinery-chat/{champion.version}"
            )
            rag = httpx.post(
                f"{url}/rag", json={"question": "How long does a worker bee take to develop?"},
                timeout=120,
            )  # fmt: skip
            assert rag.status_code == 200, rag.text
            assert rag.json()["answer"] and rag.json()["sources"]
            # D, another empty home, walks C's answer back to A's training and data.
            answer_id = rag.headers["x-refinery-answer-id"]
            d = tmp_path / "d"

            def explained() -> subprocess.CompletedProcess[str]:
                return refinery("explain", answer_id, env=_env(d, stores), check=False)

            wait_for(lambda: explained().returncode == 0, 60, "the answer in the traffic log")
            chain = explained().stdout
            tags = champion.tags
            for expected in (
                f"model version refinery-chat/{champion.version}",
                f"{mlflow_url}/#/models/refinery-chat/versions/{champion.version}",
                f"LoggedModel: {champion.source.removeprefix('models:/')}",
                "training run ",
                f"SFT dataset {tags['refinery.sft_dataset_hash']}",
                f"corpus {tags['refinery.corpus_hash']} at training (unchanged since",
                "Dagster: http",
                *(s["chunk_id"] for s in rag.json()["sources"]),
            ):
                assert expected in chain, chain
        finally:
            stop_tree(proc, timeout=15)
        # C built its Bento from the registry: nothing under C but C's own folders.
        assert not (c / "handoffs").exists()
