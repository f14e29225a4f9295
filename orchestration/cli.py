"""`refinery`: the command line. Runs go through Dagster, on the instance under REFINERY_HOME,
so they show in the Dagster UI like runs launched from it."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import click

from refinery.core.processes import child_environment
from refinery.core.settings import (
    RunSettings,
    ServingSettings,
    SettingError,
    Settings,
    SettingsGroup,
    describe,
)
from refinery.core.stores import (
    StoreUnreachable,
    apply_process_environment,
    check_stores,
    database_url,
    embedded_postgres_running,
    environment,
    make_engine,
    stop_embedded_postgres,
)


def _settings() -> Settings:
    settings = _read(Settings)
    apply_process_environment(settings)
    return settings


G = TypeVar("G", bound=SettingsGroup)


def _read(group: type[G]) -> G:
    """A settings group from this process's environment; a bad value is a usage error."""
    try:
        return group.from_env()
    except SettingError as err:
        raise click.ClickException(str(err)) from err


def _engine(settings: Settings) -> Any:
    """The database engine with Refinery's tables created (idempotent)."""
    return make_engine(settings=settings, create_schema=True)


@click.group()
def main() -> None:
    """Refinery: one Dagster lineage graph from documents and a base model to a served model."""
    # bitsandbytes warns, when it is first imported on a CPU with AVX-512 BF16, that an optional
    # `kernels` package (which downloads from a model hub) is missing; it is not needed here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@main.command()
@click.option(
    "--shell/--no-shell", default=True, help="Print `export` lines (default) or KEY=VALUE."
)
def env(shell: bool) -> None:
    """Print the variables under which mlflow, dagster and psql see Refinery's stores.

    Starts the embedded Postgres if no external one is configured; it keeps running until
    `refinery db stop`. Use: eval "$(refinery env)".
    """
    settings = _settings()
    url = database_url(settings, persistent=True)
    for key, value in sorted(environment(settings, url).items()):
        click.echo(f"export {key}={shlex.quote(value)}" if shell else f"{key}={value}")
    if not settings.database_url:
        click.echo("# embedded Postgres is running; stop it with: refinery db stop")


@main.command("settings")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per setting).")
def settings_command(as_json: bool) -> None:
    """List every REFINERY_* setting: its value here (secrets masked), and what it does.

    Values come from this shell's environment; `*` marks one that differs from its default.
    A value that cannot be used is an error that names the variable.
    """
    rows = describe(_read(Settings), _read(ServingSettings), _read(RunSettings))
    if as_json:
        click.echo(json.dumps([vars(r) for r in rows], indent=2))
        return
    width = max(len(r.variable) for r in rows)
    group = ""
    for r in rows:
        if r.group != group:
            click.echo(f"\n# {r.group}" if group else f"# {r.group}")
            group = r.group
        mark = " " if r.default else "*"
        click.echo(f"{mark} {r.variable:<{width}}  {r.value or '(unset)'}")
        click.echo(f"  {'':<{width}}  {r.doc}")


@main.group()
def db() -> None:
    """Start, stop or inspect the embedded Postgres."""


@db.command("start")
def db_start() -> None:
    """Start the embedded Postgres and leave it running."""
    settings = _settings()
    click.echo(database_url(settings, persistent=True))


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded Postgres."""
    settings = _settings()
    click.echo("stopped" if stop_embedded_postgres(settings) else "not running")


@db.command("status")
def db_status() -> None:
    settings = _settings()
    if settings.database_url:
        click.echo("external database configured by REFINERY_DATABASE_URL")
    else:
        click.echo("running" if embedded_postgres_running(settings) else "stopped")


def _progress(line: str) -> None:
    click.echo(line, err=True)


def _execute(job_name: str, run_config: dict[str, Any], tags: dict[str, str] | None = None) -> bool:
    """Submit the job to the instance's run queue and follow it to its end (see
    ``orchestration.submit``); True when it succeeded."""
    from orchestration.submit import SubmitError, submit_and_follow

    try:  # a store that is configured but down: say which, before any step starts
        check_stores(_read(Settings))
    except StoreUnreachable as err:
        raise click.ClickException(str(err)) from err
    # A line per step on the terminal (printed here from the run's event log, wherever the run
    # executes); every event in <home>/logs/<run id>.log and the UI.
    run_config = _merge(
        {"loggers": {"console": {"config": {"log_level": "INFO", "terminal": False}}}}, run_config
    )
    try:
        # Progress on stderr (as the console logger wrote it), the outcome on stdout.
        outcome = submit_and_follow(job_name, run_config, _progress, tags=tags)
    except SubmitError as err:
        raise click.ClickException(str(err)) from err
    settings = _read(Settings)
    status = {"SUCCESS": "succeeded", "CANCELED": "CANCELED"}.get(outcome.status.value, "FAILED")
    click.echo("")
    click.echo(f"Dagster run {outcome.run_id}: {status}")
    click.echo(f"  {settings.dagster_ui_url}/runs/{outcome.run_id}  (after `make ui`)")
    click.echo(f"  full log: {settings.home / 'logs' / (outcome.run_id + '.log')}")
    for check in outcome.check_evaluations():
        state = "passed" if check.passed else f"FAILED ({check.severity.value})"
        click.echo(f"  check {check.asset_key.to_user_string()}:{check.check_name} {state}")
    for step, error in _step_failures(outcome.events):
        click.echo(f"  step {step} failed: {error}", err=True)
    return outcome.success


# What a lost database connection looks like once Dagster has serialized the error.
_STORE_LOST = ("OperationalError", "InterfaceError", "AdminShutdown", "ConnectionFailure")


def _step_failures(events: list[Any]) -> list[tuple[str, str]]:
    """(step, one-line reason) for each failed step; a database that went away mid-run is
    named as such, with what to do: committed work is kept and a rerun carries on from it."""
    out = []
    for event in events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        error = event.event_specific_data.error
        chain, e = [], error
        while e is not None:
            chain.append(e)
            e = e.cause
        lost = next((e for e in chain if any(n in e.cls_name for n in _STORE_LOST)), None)
        if lost is not None:
            first = lost.message.strip().splitlines()[0] if lost.message.strip() else ""
            reason = (
                f"the database connection was lost ({first[:200]}). What was committed before "
                "is kept; once Postgres is reachable again (the embedded one starts with the "
                "next command), rerun the same command to finish."
            )
        else:
            text = (error.message if error is not None else "").strip()
            reason = text.splitlines()[0][:300] if text else "see the full log"
        out.append((str(event.step_key), reason))
    return out


def _ingest_config(corpus: Path | None, batch_size: int | None = None) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    if corpus is not None:
        if not corpus.is_dir():
            raise click.BadParameter(f"{corpus} is not a folder", param_hint="--corpus")
        ops["source_documents"] = {"config": {"corpus_dir": str(corpus.resolve())}}
    if batch_size is not None:
        ops["chunk_embeddings"] = {"config": {"batch_size": batch_size}}
    return {"ops": ops} if ops else {}


@main.command()
@click.option("--corpus", type=click.Path(path_type=Path), default=None, help="Corpus folder.")
@click.option(
    "--batch-size", type=click.IntRange(1, 4096), default=None, help="Chunks per embedding batch."
)
def ingest(corpus: Path | None, batch_size: int | None) -> None:
    """Materialize documents → chunks → embeddings through Dagster for a corpus folder."""
    _settings()
    if not _execute("ingest", _ingest_config(corpus, batch_size)):
        sys.exit(1)


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def config_option(default: Path | None = None, note: str = "") -> Any:
    """The ``--config FILE`` option (a Dagster run config in YAML) of the commands that run jobs."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, exists=True),
        default=default,
        show_default=default is not None,
        help="Dagster run config (YAML)" + (f"; {note}" if note else "."),
    )


def _load_config(path: Path | None) -> dict[str, Any]:
    import yaml

    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise click.BadParameter(
            f"cannot read run config {path}: {err}", param_hint="--config"
        ) from err
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"{path} must hold a mapping (Dagster run config)", param_hint="--config"
        )
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


@main.command()
@config_option()
def evaluate(config_file: Path | None) -> None:
    """Evaluate the challenger (and the champion), queue examples for review, run the gate."""
    _settings()
    if not _execute("evaluate", _load_config(config_file)):
        sys.exit(1)


@main.command()
@config_option()
def promote(config_file: Path | None) -> None:
    """Aggregate human ratings, run the promotion gate, move the champion alias if it passes."""
    _settings()
    if not _execute("promote", _load_config(config_file)):
        sys.exit(1)


@main.command()
@click.option("--model", default="refinery-chat", show_default=True, help="Registered model name.")
def rollback(model: str) -> None:
    """Move the champion alias back to the version it replaced."""
    from evaluation.promotion import PromotionError
    from evaluation.promotion import rollback as do_rollback

    settings = _settings()
    try:
        was, now = do_rollback(settings.mlflow_tracking_uri, model)
    except PromotionError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{model}: champion moved back from version {was} to version {now}")


@main.group()
def review() -> None:
    """Human review: reviewers and the review page."""


@review.command("add-reviewer")
@click.argument("reviewer_id")
@click.option("--rotate", is_flag=True, help="Issue a new token to an existing reviewer.")
def review_add(reviewer_id: str, rotate: bool) -> None:
    """Create a reviewer and print their token (shown once, stored only as a hash)."""
    from evaluation.review import ReviewError, add_reviewer

    engine = _engine(_settings())
    try:
        token = add_reviewer(engine, reviewer_id, rotate=rotate)
    except ReviewError as err:
        raise click.ClickException(str(err)) from err
    finally:
        engine.dispose()
    click.echo(token)


@review.command("queue-served")
@click.option("--model", "model_label", required=True, help="The version, e.g. refinery-chat/3.")
@click.option("--sample", default=20, show_default=True, help="Answers to queue at most.")
@click.option("--seed", default=0, show_default=True, help="Which answers are picked.")
def review_queue_served(model_label: str, sample: int, seed: int) -> None:
    """Queue a sample of a version's served answers (MLflow traces of the service) for blind
    rating, beside its evaluation examples; their ratings count for that version."""
    from evaluation.review import ReviewError, enqueue, served_examples
    from refinery.core.lineage import model_key
    from refinery.core.settings import TraceSettings, TrafficSettings

    settings = _settings()
    salt, experiment = _read(TrafficSettings).salt, _read(TraceSettings).experiment
    try:
        examples = served_examples(
            settings.mlflow_tracking_uri, experiment, model_label, model_key(model_label, salt)
        )
    except ReviewError as err:
        raise click.ClickException(str(err)) from err
    if not examples:
        raise click.ClickException(
            f"no served traces of {model_label} in the MLflow experiment {experiment!r} "
            "(REFINERY_TRACE_SAMPLE sets the share of answers the service traces)"
        )
    engine = _engine(settings)
    try:
        queued = enqueue(engine, model_label, examples, sample=sample, seed=seed)
    finally:
        engine.dispose()
    click.echo(f"{model_label}: {len(examples)} served traces, {queued} newly queued for review")


@review.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8300, show_default=True, envvar="REVIEW_PORT")
def review_serve(host: str, port: int) -> None:
    """Serve the blind review page until Ctrl-C."""
    import uvicorn

    from evaluation.review_app import create_app

    settings = _settings()
    engine = _engine(settings)
    click.echo(f"review page: http://{host}:{port}/")
    uvicorn.run(
        create_app(engine, settings.mlflow_tracking_uri), host=host, port=port, log_level="warning"
    )


@main.command()
@click.option(
    "--day", default=None, help="The UTC day (YYYY-MM-DD) to report on; default: yesterday."
)
@config_option(note="e.g. ops.drift_report.config.reference.")
def monitor(day: str | None, config_file: Path | None) -> None:
    """Drift and cost reports of one day of the traffic log (a daily partition; what the daily
    schedule runs for the day that just ended). Older days: a backfill in the Dagster UI."""
    from assets.monitoring import DAILY

    _settings()
    day = day or DAILY.get_last_partition_key()
    if day is None or not DAILY.has_partition_key(day):
        first = DAILY.get_first_partition_key()
        raise click.BadParameter(
            f"{day!r} is not a complete UTC day from {first} to yesterday (YYYY-MM-DD)",
            param_hint="--day",
        )
    if not _execute("monitor", _load_config(config_file), tags={"dagster/partition": day}):
        sys.exit(1)


@main.command()
@click.argument("answer_id")
@click.option("--json", "as_json", is_flag=True, help="Print the chain as JSON.")
def explain(answer_id: str, as_json: bool) -> None:
    """Walk a served answer back to its data: model version (and adapter), training run, SFT
    dataset and approved user examples, corpus, and the chunks it was given, with MLflow and
    Dagster links. ANSWER_ID: the x-refinery-answer-id header, or a chat completion's id."""
    from evaluation.provenance import ProvenanceError, render
    from evaluation.provenance import explain as trace_back

    settings = _settings()
    engine = _engine(settings)
    try:
        prov = trace_back(engine, settings.mlflow_tracking_uri, settings.mlflow_ui_url, answer_id)
    except ProvenanceError as err:
        raise click.ClickException(str(err)) from err
    finally:
        engine.dispose()
    click.echo(json.dumps(prov.to_dict(), indent=2) if as_json else render(prov))


@main.command()
@config_option()
def retrain(config_file: Path | None) -> None:
    """Training and evaluation in one run, with approved user examples (what the sensors start)."""
    _settings()
    if not _execute("retrain", _load_config(config_file)):
        sys.exit(1)


@main.group()
def examples() -> None:
    """User data for training: propose, review, approve. Only approved rows reach a model."""


@examples.command("propose")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON Lines of {prompt, answer} (feedback, corrections).",
)
@click.option("--request-id", "request_ids", multiple=True, help="A logged request to propose.")
@click.option("--by", "submitted_by", required=True, help="Who proposes them.")
def examples_propose(path: Path | None, request_ids: tuple[str, ...], submitted_by: str) -> None:
    """Propose examples from a file or from the traffic log; they wait for approval."""
    from refinery.core.jsonl import json_objects
    from training.user_data import Proposal, ReviewError, proposals_from_traffic, propose

    if path is None and not request_ids:
        raise click.UsageError("give --file or at least one --request-id")
    engine = _engine(_settings())
    proposals: list[Proposal] = []
    if path is not None:
        from collections import Counter

        dropped: Counter[str] = Counter()
        for i, row in enumerate(json_objects(path.read_text().splitlines(), dropped), start=1):
            prompt, answer = row.get("prompt"), row.get("answer")
            if isinstance(prompt, str) and isinstance(answer, str):
                proposals.append(Proposal(prompt, answer, f"file:{path.name}:{i}"))
            else:
                dropped["missing_prompt_or_answer"] += 1
        if dropped:
            click.echo(f"skipped lines: {dict(dropped)}", err=True)
    if request_ids:
        found, unusable = proposals_from_traffic(engine, list(request_ids))
        proposals += found
        for rid in unusable:
            click.echo(f"request {rid}: not found, hashed, blocked or failed; skipped", err=True)
    try:
        counts = propose(engine, proposals, submitted_by)
    except ReviewError as err:
        raise click.ClickException(str(err)) from err
    finally:
        engine.dispose()
    click.echo(json.dumps(counts))


@examples.command("list")
@click.option("--status", type=click.Choice(["pending", "approved", "rejected"]), default=None)
def examples_list(status: str | None) -> None:
    """Print examples (id, status, source, prompt) as JSON Lines."""
    from training.user_data import list_examples

    engine = _engine(_settings())
    try:
        for row in list_examples(engine, status):
            keep = ("example_id", "status", "source", "submitted_by", "reviewed_by", "prompt")
            click.echo(json.dumps({k: row[k] for k in keep}))
    finally:
        engine.dispose()


def _review_examples(ids: tuple[str, ...], reviewer: str, approve: bool) -> None:
    from training.user_data import ReviewError, review

    engine = _engine(_settings())
    try:
        changed = review(engine, list(ids), approve=approve, reviewer=reviewer)
    except ReviewError as err:
        raise click.ClickException(str(err)) from err
    finally:
        engine.dispose()
    click.echo(f"{changed} {'approved' if approve else 'rejected'}")


@examples.command("approve")
@click.argument("ids", nargs=-1, required=True)
@click.option("--by", "reviewer", required=True, help="Reviewer (not the submitter).")
def examples_approve(ids: tuple[str, ...], reviewer: str) -> None:
    """Approve pending examples: they join the next SFT dataset."""
    _review_examples(ids, reviewer, approve=True)


@examples.command("reject")
@click.argument("ids", nargs=-1, required=True)
@click.option("--by", "reviewer", required=True, help="Reviewer (not the submitter).")
def examples_reject(ids: tuple[str, ...], reviewer: str) -> None:
    """Reject pending examples: they never reach a training set."""
    _review_examples(ids, reviewer, approve=False)


@main.command()
@config_option(None, "asset config, e.g. ops.image_model.config.max_steps.")
def images(config_file: Path | None) -> None:
    """Materialize the image lineage: data set → image model (refinery-image) → evaluation
    and the promotion gate (alias champion)."""
    _settings()
    if not _execute("images", _load_config(config_file)):
        sys.exit(1)


@main.command()
def train() -> None:
    """Materialize base model → … → candidate model (registered, alias "challenger")."""
    _settings()
    if not _execute("train", {}):
        sys.exit(1)


@main.command()
@click.option("--corpus", type=click.Path(path_type=Path), default=None, help="Corpus folder.")
@config_option(DEMO_CONFIG, "the default waives the human gate for the demo, with its reason.")
def run(corpus: Path | None, config_file: Path) -> None:
    """Run the whole lineage graph through Dagster (what `make run` does)."""
    settings = _settings()
    ok = _execute("refinery", _merge(_load_config(config_file), _ingest_config(corpus)))
    click.echo("")
    click.echo("Where to look next:")
    click.echo('  refinery query "How long does a worker bee take to develop?"')
    click.echo(
        "  make serve → the champion's Bento on http://127.0.0.1:3000 (OpenAI API under /v1)"
    )
    click.echo(
        f"  make ui    → Dagster {settings.dagster_ui_url}   MLflow {settings.mlflow_ui_url}"
    )
    click.echo(
        f'  eval "$(refinery env)"   → mlflow / dagster / psql on the same stores ({settings.home})'
    )
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("question")
@click.option(
    "-k",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="How many chunks to return.",
)
@click.option("--source", "sources", multiple=True, help="Only these sources (`*` wildcard).")
@click.option(
    "--format", "formats", multiple=True, help="Only these formats (markdown, text, html, pdf)."
)
@click.option(
    "--model", default="", help="Embedding model (default: the packaged all-MiniLM-L6-v2)."
)
@click.option(
    "--mode",
    type=click.Choice(["hybrid", "vector", "text", "hybrid+rerank"]),
    default="hybrid",
    show_default=True,
    help="Full-text and vector search fused (hybrid), one of them, or hybrid then reranked.",
)
@click.option(
    "--max-per-doc",
    type=click.IntRange(1, 100),
    default=None,
    help="At most N chunks per document.",
)
@click.option(
    "--explain", is_flag=True, help="Show each hit's vector rank, text rank and fused score."
)
@click.option(
    "--embedder",
    type=click.Choice(["onnx", "sentence-transformers"]),
    default="onnx",
    show_default=True,
    help="How the question is embedded: the ONNX export (fast start) or the model itself.",
)
@click.option(
    "--rerank-model",
    default="",
    help="Causal LM that reranks in hybrid+rerank mode (default: the packaged SmolLM2-135M).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def query(
    question: str,
    k: int,
    sources: tuple[str, ...],
    formats: tuple[str, ...],
    model: str,
    mode: str,
    max_per_doc: int | None,
    explain: bool,
    embedder: str,
    rerank_model: str,
    as_json: bool,
) -> None:
    """Print the chunks that best match QUESTION, with their sources and scores."""
    # Only what a query needs is imported here: no dagster, mlflow or torch (see
    # refinery.retrieval.query); the query embedding runs on an ONNX export of the model.
    from refinery.retrieval.query import QueryError, run_query

    settings = _settings()
    reranker = None
    if mode == "hybrid+rerank":
        from refinery.generation.generator import Generator
        from refinery.generation.scoring import QueryLikelihoodReranker
        from training.base_model import BaseModelError, resolve_base_model

        try:
            info = resolve_base_model(rerank_model or None, settings.models_dir)
        except BaseModelError as err:
            raise click.BadParameter(str(err), param_hint="--rerank-model") from err
        reranker = QueryLikelihoodReranker(Generator(info.path), name=info.name)
    try:
        hits = run_query(
            settings,
            question,
            k=k,
            sources=sources,
            formats=formats,
            model=model or None,
            mode=mode,
            max_per_doc=max_per_doc,
            reranker=reranker,
            onnx=embedder == "onnx",
            note=lambda m: click.echo(m, err=True),
        )
    except QueryError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return
    if not hits:
        click.echo("no matching chunks")
    for i, h in enumerate(hits, 1):
        pages = f" p.{','.join(map(str, h.meta['pages']))}" if h.meta.get("pages") else ""
        click.echo(f"{i}. [{h.score:.3f}] {h.source}{pages} (chunk {h.position}) — {h.title}")
        if explain:
            click.echo("   " + explain_line(h))
        click.echo("   " + h.text[:300].replace("\n", " ") + ("…" if len(h.text) > 300 else ""))


def explain_line(hit: Any) -> str:
    """Why a hit is where it is: its rank in each list, the fused score, the reranker's."""

    def rank(r: int | None) -> str:
        return f"#{r}" if r is not None else "—"

    parts = [
        f"vector rank {rank(hit.vector_rank)} (cosine {hit.score:.3f})",
        f"text rank {rank(hit.text_rank)}"
        + (f" (ts_rank_cd {hit.text_score:.4f})" if hit.text_score is not None else ""),
        f"fused {hit.fused:.5f}" if hit.fused is not None else "fused —",
    ]
    if hit.rerank_score is not None:
        parts.append(f"rerank {hit.rerank_score:.3f}")
    return " · ".join(parts)


@main.command()
@config_option(note="e.g. ops.bento.config.alias.")
def bento(config_file: Path | None) -> None:
    """Build a Bento of the model version the champion alias points to (pinned)."""
    _settings()
    if not _execute("package", _load_config(config_file)):
        sys.exit(1)


@main.group()
def deploy() -> None:
    """Kubernetes manifests for the champion (deploy/k8s)."""


@deploy.command("render")
@click.option("--overlay", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write refinery-<overlay>.yaml here (default: print to stdout).",
)
@click.option("--bento", "bento_tag", default=None, help="A Bento tag instead of the champion's.")
@click.option(
    "--repository",
    default=None,
    help="Image repository the image was pushed to (e.g. registry.example/ml/refinery).",
)
@click.option("--model", default="refinery-chat", show_default=True, help="Registered model.")
@click.option(
    "--images/--no-images",
    default=None,
    help="With the image model service (default: when the champion's Bento serves images).",
)
def deploy_render(
    overlay: str,
    out_dir: Path | None,
    bento_tag: str | None,
    repository: str | None,
    model: str,
    images: bool | None,
) -> None:
    """Render an overlay with the image of the champion's Bento (`refinery bento` builds it)."""
    from refinery.core.registry import ModelNotFoundError
    from refinery.core.stores import prepare_mlflow
    from serving.deploy import (
        DeployError,
        champion_bento,
        image_tag,
        render,
        serves_images,
        write_manifests,
    )

    settings = _settings()
    try:
        if bento_tag is None:
            found = champion_bento(settings, prepare_mlflow(settings), model)
            bento_tag = str(found["tag"])
            images = serves_images(found) if images is None else images
        text = render(overlay, image_tag(bento_tag, repository), images=bool(images))
    except (DeployError, ModelNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    if out_dir is None:
        click.echo(text, nl=False)
    else:
        path = write_manifests(text, out_dir, overlay)
        click.echo(f"{path} (image {image_tag(bento_tag, repository)})")


@main.command()
@click.argument("bento_tag", required=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, envvar="PORT")
@click.option(
    "--follow",
    default="champion",
    show_default=True,
    help="Registry alias to follow: a promotion reaches the running service. '' pins the Bento's.",
)
def serve(bento_tag: str | None, host: str, port: int, follow: str) -> None:
    """Serve a Bento (default: the newest one built in this home) until Ctrl-C."""
    from serving.bento import list_bentos

    settings = _settings()
    if bento_tag is None:
        bentos = list_bentos(settings)
        if not bentos:
            raise click.ClickException(
                f"no Bento in {settings.bentoml_home}: run `make run` or `refinery bento` first"
            )
        bento_tag = str(bentos[0]["tag"])
    grace_s = _read(ServingSettings).stop_grace_s  # also checks the service's settings first
    url = database_url(settings)  # held open while serving: the RAG endpoint reads it
    env = child_environment({**environment(settings, url), "REFINERY_FOLLOW_ALIAS": follow})
    cmd = [
        str(Path(sys.executable).parent / "bentoml"), "serve", bento_tag,
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    click.echo(f"serving {bento_tag} on http://{host}:{port} (OpenAI API under /v1, RAG at /rag)")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_default_signals)
    received: list[signal.Signals] = []

    def _stop(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum))
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        from refinery.core.processes import stop_tree

        # SIGTERM (Kubernetes, systemd) is passed on as SIGTERM: BentoML finishes the requests
        # in flight; after the grace period, everything the service started is killed.
        first = signal.SIGTERM if received and received[0] == signal.SIGTERM else signal.SIGINT
        stop_tree(proc, timeout=grace_s, first=first)
    sys.exit(code)


@main.command()
@click.option("--dagster-port", default=3100, show_default=True, envvar="DAGSTER_PORT")
@click.option("--mlflow-port", default=5000, show_default=True, envvar="MLFLOW_PORT")
def ui(dagster_port: int, mlflow_port: int) -> None:
    """Dagster UI and MLflow UI on 127.0.0.1 over the same stores, until Ctrl-C."""
    settings = _settings()
    url = database_url(settings)  # this process holds the embedded Postgres open while the UIs run
    env = child_environment(
        {
            **environment(settings, url),
            "REFINERY_DAGSTER_UI_URL": f"http://127.0.0.1:{dagster_port}",
            "REFINERY_MLFLOW_UI_URL": f"http://127.0.0.1:{mlflow_port}",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    bin_dir = Path(sys.executable).parent
    commands = {
        "dagster": [
            str(bin_dir / "dagster"), "dev", "-m", "orchestration.definitions",
            "-h", "127.0.0.1", "-p", str(dagster_port),
        ],
        "mlflow": [
            str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--workers", "1", "--backend-store-uri", settings.mlflow_tracking_uri,
            *(["--default-artifact-root", settings.mlflow_artifacts_dir.as_uri()] if settings.mlflow_is_local else []),
        ],
    }  # fmt: skip
    # Each UI in its own process group: stopping the group stops its children (code servers,
    # workers) too, which a plain terminate of the parent would leave behind.
    procs = {
        name: subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_default_signals)
        for name, cmd in commands.items()
    }
    click.echo(
        f"Dagster UI: http://127.0.0.1:{dagster_port}   MLflow UI: http://127.0.0.1:{mlflow_port}"
    )
    click.echo("Ctrl-C stops both.")

    def _stop(*_: Any) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a process started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        for name, p in procs.items():
            if p.poll() is not None:
                click.echo(f"{name} exited with {p.returncode}", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_groups(list(procs.values()))


def _default_signals() -> None:
    """In the child, before exec: Ctrl-C and SIGTERM do their default thing, even when this
    command was started in the background (which leaves SIGINT ignored, and dagster dev then
    ignores both)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_groups(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGINT (what Ctrl-C sends: dagster dev shuts its children down on it), then SIGKILL to
    whatever is left of each one's process tree."""
    from refinery.core.processes import stop_tree

    for p in procs:
        stop_tree(p, timeout)


if __name__ == "__main__":
    main()
