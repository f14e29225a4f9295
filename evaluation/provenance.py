"""Answer provenance: from a served answer's id back to the data behind it.

Every answer the service gives carries an id (the ``x-refinery-answer-id`` header, the
traffic log's ``request_id``, ``chatcmpl-<id>`` for chat completions). ``explain`` follows it
through the stores every run shares, so it works from any machine with an empty disk:

answer (traffic log: when, which endpoint, the model version that answered, the chunks it was
given) → model version (MLflow registry: its tags, the adapter's LoRA config and training key)
→ training run (MLflow, with the Dagster run that made it) → SFT dataset (its content hash, the
MLflow run that built it, the approved user examples in it) → corpus (the hash the model was
registered with, against the store's hash now) → the chunks' text (Postgres, when they are
still in the store).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from refinery.core import schema
from refinery.core.lineage import TAG_CORPUS_HASH, TAG_DAGSTER_RUN_URL
from refinery.core.registry import logged_model_id
from refinery.core.tracking import client_for

_ID = re.compile(r"^(?:chatcmpl-)?([0-9a-f]{32})$")
TAG_SFT_HASH = "refinery.sft_dataset_hash"


class ProvenanceError(LookupError):
    """An id that is malformed or that the traffic log does not hold."""


@dataclass
class Provenance:
    """The chain behind one answer; a link is empty where the chain stops (say ``notes``)."""

    answer_id: str
    answered_at: str
    endpoint: str
    status: int
    model: str  # "name/version" that answered
    cache_hit: bool
    question: str | None  # None when the traffic log keeps hashes only
    answer: str | None
    version: dict[str, Any] = field(default_factory=dict)
    training_run: dict[str, Any] = field(default_factory=dict)
    sft_dataset: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_answer_id(text: str) -> str:
    """The 32 hex digits of an answer id, from the header's value or a chat completion's id."""
    match = _ID.match(text.strip().lower())
    if match is None:
        raise ProvenanceError(
            f"{text!r} is not an answer id: expected the x-refinery-answer-id header's 32 hex "
            "digits, or a chat completion's id (chatcmpl-<32 hex digits>)"
        )
    return match.group(1)


def explain(engine: sa.Engine, tracking_uri: str, mlflow_ui: str, answer_id: str) -> Provenance:
    """The chain behind ``answer_id`` (see the module docstring). ProvenanceError when the id is
    malformed or not in the traffic log."""
    rid = parse_answer_id(answer_id)
    t = schema.traffic_log
    with engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.request_id == rid)).mappings().first()
    if row is None:
        raise ProvenanceError(
            f"no answer with id {rid} in the traffic log: it was not served by a Refinery "
            "service writing to this database, it was not sampled (REFINERY_TRAFFIC_SAMPLE), "
            "or it has not been written yet (the log is written a moment after the answer)"
        )
    prov = Provenance(
        answer_id=rid,
        answered_at=row["ts"].isoformat(timespec="seconds"),
        endpoint=row["endpoint"],
        status=int(row["status"]),
        model=row["model"],
        cache_hit=bool(row["cache_hit"]),
        question=row["prompt"],
        answer=row["answer"],
    )
    if prov.question is None:
        prov.notes.append("the traffic log keeps hashes only (REFINERY_TRAFFIC_PRIVACY=hash)")
    prov.chunks = _chunks(engine, list(row["sources"] or []))
    _model_chain(prov, tracking_uri, mlflow_ui.rstrip("/"))
    _corpus(prov, engine)
    return prov


def _chunks(engine: sa.Engine, given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks an answer was given, with their text while they are still in the store."""
    ids = [g["chunk_id"] for g in given if g.get("chunk_id")]
    c = schema.chunks
    with engine.connect() as conn:
        found = {
            r.chunk_id: r
            for r in conn.execute(
                sa.select(c.c.chunk_id, c.c.position, c.c.text).where(c.c.chunk_id.in_(ids))
            )
        }
    out = []
    for rank, g in enumerate(given, start=1):
        hit = found.get(g.get("chunk_id"))
        out.append(
            {
                "rank": rank,
                "chunk_id": g.get("chunk_id"),
                "source": g.get("source"),
                "score": g.get("score"),
                "position": hit.position if hit else None,
                "text": hit.text if hit else None,  # None: no longer in the store
            }
        )
    return out


def _model_chain(prov: Provenance, tracking_uri: str, ui: str) -> None:
    from mlflow.exceptions import MlflowException

    name, _, version = prov.model.partition(" ")[0].rpartition("/")
    if not name or not version.isdigit():
        prov.notes.append(f"{prov.model!r} is not a registered model version: the chain stops")
        return
    client = client_for(tracking_uri)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        prov.notes.append(f"{name}/{version} is not in the MLflow registry at {tracking_uri}")
        return
    tags = dict(mv.tags or {})
    prov.version = {
        "name": name,
        "version": version,
        "url": f"{ui}/#/models/{name}/versions/{version}",
        "aliases": list(getattr(mv, "aliases", []) or []),
        "base_model": tags.get("refinery.base_model", ""),
        "training_key": tags.get("refinery.training_key", ""),
        "adapter": _json(tags.get("refinery.lora_config")),
        "dagster_run_url": tags.get(TAG_DAGSTER_RUN_URL, ""),
        "imported_from": "",
        "logged_model": logged_model_id(mv.source),
    }
    if mv.run_id:
        _training_run(prov, client, mv.run_id, ui)
    if not tags.get(TAG_SFT_HASH):
        prov.notes.append(
            f"{name}/{version} has no training lineage (registered from a folder, not trained by "
            "the pipeline): the chain stops at the version"
        )
        return
    prov.corpus["trained_with"] = tags.get(TAG_CORPUS_HASH, "")
    _sft_dataset(prov, client, tags[TAG_SFT_HASH], ui)


def _training_run(prov: Provenance, client: Any, run_id: str, ui: str) -> None:
    run = client.get_run(run_id)
    tags = run.data.tags
    prov.version["imported_from"] = tags.get("refinery.imported_from", "")
    prov.training_run = {
        "run_id": run_id,
        "name": run.info.run_name,
        "url": f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run_id}",
        "dagster_run_url": tags.get(TAG_DAGSTER_RUN_URL, ""),
        "code_version": tags.get("refinery.code_version", ""),
    }


def _sft_dataset(prov: Provenance, client: Any, content_hash: str, ui: str) -> None:
    """The SFT dataset by its content hash, and the MLflow run that built it (newest first)."""
    prov.sft_dataset = {"content_hash": content_hash}
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        f"tags.`{TAG_SFT_HASH}` = '{content_hash}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )  # fmt: skip  (the hash is one of ours: 64 hex digits from the registry, not user input)
    if not runs:
        prov.notes.append(f"no MLflow run is tagged with SFT dataset {content_hash[:16]}")
        return
    run = runs[0]
    tags = run.data.tags
    prov.sft_dataset.update(
        run_id=run.info.run_id,
        url=f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
        dagster_run_url=tags.get(TAG_DAGSTER_RUN_URL, ""),
        user_examples=int(tags.get("refinery.user_examples", "0") or 0),
        user_examples_hash=tags.get("refinery.user_examples_hash", ""),
        approved_examples=_user_examples(client, run.info.run_id),
    )


def _user_examples(client: Any, run_id: str) -> list[dict[str, Any]]:
    """The approved user examples the dataset holds (id, source, reviewer), from its run."""
    with tempfile.TemporaryDirectory(prefix="refinery-explain-") as tmp:
        try:
            path = client.download_artifacts(run_id, "user_examples.json", tmp)
        except Exception:  # noqa: BLE001 - an older run without the file: nothing to list
            return []
        data = json.loads(Path(path).read_text())
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _corpus(prov: Provenance, engine: sa.Engine) -> None:
    """The corpus hash now (as ``candidate_model`` computed it), against the one the model was
    registered with."""
    from refinery.retrieval.vectorstore import VectorStore

    now = VectorStore(engine).corpus_hash()
    prov.corpus["now"] = now
    trained = prov.corpus.get("trained_with")
    if trained:
        prov.corpus["unchanged"] = trained == now


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text


def render(prov: Provenance) -> str:
    """The chain as lines for a terminal, one link per block, with its MLflow and Dagster pages."""
    lines = [
        f"answer {prov.answer_id}: {prov.endpoint} at {prov.answered_at}, status {prov.status}"
        + (", from the response cache" if prov.cache_hit else ""),
    ]
    if prov.question is not None:
        lines.append(f"  question: {_short(prov.question, 200)}")
    if prov.answer is not None:
        lines.append(f"  answer:   {_short(prov.answer, 200)}")
    lines.append(f"model version {prov.model}")
    v = prov.version
    if v:
        lines.append(f"  MLflow:  {v['url']}")
        for key, label in (("logged_model", "LoggedModel"),
                           ("base_model", "base model"), ("training_key", "training key"),
                           ("imported_from", "imported from"), ("dagster_run_url", "Dagster")):  # fmt: skip
            if v.get(key):
                lines.append(f"  {label}: {v[key]}")
        if v.get("adapter"):
            lines.append(f"  adapter (LoRA): {json.dumps(v['adapter'], sort_keys=True)}")
    r = prov.training_run
    if r:
        lines.append(f"training run {r['name']} ({r['run_id']})")
        lines += _pages(r)
    s = prov.sft_dataset
    if s:
        lines.append(f"SFT dataset {s['content_hash']}")
        lines += _pages(s)
        if "user_examples" in s:
            lines.append(f"  approved user examples: {s['user_examples']}")
            for e in s.get("approved_examples", []):
                lines.append(
                    f"    {e.get('example_id')} from {e.get('source')}, approved by "
                    f"{e.get('reviewed_by')}"
                )
    c = prov.corpus
    if c.get("trained_with"):
        same = "unchanged since" if c.get("unchanged") else "changed since"
        lines.append(f"corpus {c['trained_with']} at training ({same}; now {c['now']})")
    elif c.get("now"):
        lines.append(f"corpus now {c['now']}")
    if prov.chunks:
        lines.append(f"chunks given ({len(prov.chunks)}):")
        for ch in prov.chunks:
            text = (
                _short(ch["text"], 160)
                if ch["text"] is not None
                else "(no longer in the store: the corpus changed since)"
            )
            score = f"{ch['score']:.3f}" if isinstance(ch["score"], int | float) else "?"
            lines.append(f"  [{ch['rank']}] {ch['source']} {ch['chunk_id']} score {score}: {text}")
    lines += [f"note: {n}" for n in prov.notes]
    return "\n".join(lines)


def _pages(link: dict[str, Any]) -> list[str]:
    """A link's MLflow and Dagster pages, where it has them."""
    return [
        f"  {label}{link[key]}"
        for key, label in (("url", "MLflow:  "), ("dagster_run_url", "Dagster: "))
        if link.get(key)
    ]


def _short(text: str, limit: int) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"
