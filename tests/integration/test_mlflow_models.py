"""MLflow 3 models and evaluation against real stores: registered versions are LoggedModels
(on a local SQLite store and through a real MLflow server), and evaluation runs through
``mlflow.genai.evaluate`` with the project's metrics as scorers, linked to the model."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluation.automatic import metric_name
from evaluation.scorers import EXPECTED_RESPONSE, EXPECTED_SOURCES, RECORDED
from evaluation.tracing import evaluate_in_mlflow, log_traces
from refinery.core.lineage import TAG_MODEL_KEY, model_key
from refinery.core.registry import download, resolve
from refinery.core.tracking import client_for, tracked_run
from tests.eval_helpers import scored_examples
from tests.support import mlflow_server
from training.registry import register_folder

pytestmark = pytest.mark.integration


def _folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"name": name}))
    return folder


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path: Path) -> Iterator[tuple[str, Path | None]]:
    """(tracking URI, artifact root): a local SQLite store, or a real MLflow server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "art"
    else:
        with mlflow_server(tmp_path / "server") as url:
            yield url, None


def test_versions_are_logged_models_listed_on_their_run(store, tmp_path: Path):
    uri, root = store
    client = client_for(uri)
    one = register_folder(uri, "m", _folder(tmp_path, "one"), alias="champion", artifact_root=root)
    two = register_folder(uri, "m", _folder(tmp_path, "two"), alias="champion", artifact_root=root)
    assert (one.version, two.version) == ("1", "2") and one.model_id != two.model_id
    for registered in (one, two):
        mv = client.get_model_version("m", registered.version)
        assert mv.source == f"models:/{registered.model_id}"
        logged = client.get_logged_model(registered.model_id)
        assert str(logged.status) == "READY" and logged.source_run_id == mv.run_id
        assert logged.tags["refinery.variant"] == "none"
        listed = json.loads(logged.tags["mlflow.modelVersions"])
        assert [(v["name"], str(v["version"])) for v in listed] == [("m", registered.version)]
        outputs = client.get_run(mv.run_id).outputs.model_outputs
        assert [o.model_id for o in outputs] == [registered.model_id]
    # The Models tab of the experiment lists both.
    experiment = client.get_run(one.run_id).info.experiment_id
    assert {m.model_id for m in client.search_logged_models([experiment])} == {
        one.model_id,
        two.model_id,
    }
    # resolve + download read the champion's files back from the LoggedModel's artifacts.
    ref = resolve(uri, "m", "champion")
    assert ref.version == "2" and ref.model_id == two.model_id
    local = download(uri, ref, tmp_path / "dl")
    assert json.loads((local.weights / "config.json").read_text()) == {"name": "two"}


def test_a_failed_upload_leaves_a_failed_model_and_no_version(mlflow_uri, tmp_path: Path):
    with pytest.raises(Exception, match="missing"):
        register_folder(
            mlflow_uri, "m", tmp_path / "missing", alias="champion", artifact_root=tmp_path
        )
    client = client_for(mlflow_uri)
    experiment = client.get_experiment_by_name("refinery-imports").experiment_id
    (model,) = client.search_logged_models([experiment])
    assert str(model.status) == "FAILED"
    assert not client.search_model_versions("name = 'm'")


def test_genai_evaluate_scores_the_traces_and_links_metrics_to_the_model(tmp_path: Path):
    with mlflow_server(tmp_path / "server") as uri:
        client = client_for(uri)
        version = register_folder(uri, "m", _folder(tmp_path, "one"), alias="champion",
                                  artifact_root=None)  # fmt: skip
        examples = scored_examples()
        metrics = {"heldout_perplexity": 12.5, "rag_answered_right": 1 / 3}
        with tracked_run(uri, "refinery-evaluation", run_name="eval") as run:
            log_traces(uri, run.experiment_id, run.run_id, "m/1", examples, salt="s")
            child = evaluate_in_mlflow(
                uri, run.experiment_id, run.run_id, "m/1", examples, metrics,
                model_id=version.model_id, k=2, salt="s",
            )  # fmt: skip

        # Each trace carries its expectations and one assessment per scorer, equal to the score
        # the evaluation computed for it.
        for example in examples:
            trace = client.get_trace(example.trace_id)
            got = {a.name: a.value for a in trace.info.assessments}
            assert got[EXPECTED_RESPONSE] == example.reference
            if example.kind == "rag":
                assert got[EXPECTED_SOURCES] == example.gold_sources
            for key, value in example.scores.items():
                assert got[metric_name(example.kind, key)] == pytest.approx(value), key
        assert {metric_name("rag", k) for k in RECORDED} <= {
            a.name for a in client.get_trace(examples[-1].trace_id).info.assessments
        }

        # The child run: under the evaluation run, named by the blind key, with the scorers'
        # means and the run's own metrics, all linked to the LoggedModel.
        child_run = client.get_run(child)
        assert child_run.data.tags["mlflow.parentRunId"] == run.run_id
        assert child_run.data.tags[TAG_MODEL_KEY] == model_key("m/1", "s")
        assert "m/1" not in child_run.info.run_name
        rag = [e for e in examples if e.kind == "rag"]
        f1_mean = statistics.fmean(e.scores["token_f1"] for e in rag)
        assert child_run.data.metrics["rag_token_f1/mean"] == pytest.approx(f1_mean)
        assert child_run.data.metrics["heldout_perplexity"] == 12.5
        linked = {m.key: m.value for m in client.get_logged_model(version.model_id).metrics}
        assert linked["heldout_perplexity"] == 12.5
        assert linked["rag_token_f1/mean"] == pytest.approx(f1_mean)
        assert linked["retrieval_hit_at_k/mean"] == pytest.approx(2 / 3)
        # The traces are the evaluation run's and the child run's.
        traced = client.search_traces(locations=[run.experiment_id], run_id=child)
        assert {t.info.trace_id for t in traced} == {e.trace_id for e in examples}
