"""Monitoring over the traffic log: an Evidently drift report and a cost report.

Drift compares a current window of logged requests with a reference: an earlier window of the
log, or the evaluation question set (then only the prompt columns can be compared: the set has
no answers, latencies or costs). Compared: text descriptors of prompts and answers (Evidently's
``TextLength``, ``WordCount``, ``NonLetterCharacterPercentage``), the retrieval score of the best
source, latency and cost, and the prompts' embeddings (Evidently's ``EmbeddingsDrift``, a
classifier told to separate the two windows: ROC AUC 0.5 means "indistinguishable"). Rows logged
with hashed prompts have no text: they count for the numeric columns only.

Whether a column drifted is Evidently's own decision, with the method it picks for the window's
size and that method's threshold: up to 1,000 reference rows a numeric column gets the K-S test
(drifted when p < 0.05), above that the normed Wasserstein distance (drifted when >= 0.1). A
score is never read without its method, since the two point in opposite directions. The
embeddings likewise: a bootstrap test of the classifier's AUC below 1,000 reference rows,
AUC > 0.55 above.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from refinery.core.pushgateway import push_drift
from refinery.core.schema import traffic_log
from refinery.core.tracking import RunOpener

EmbedFn = Callable[[list[str]], np.ndarray]

PROMPT_DESCRIPTORS = ["prompt_length", "prompt_words", "prompt_non_letter_pct"]
ANSWER_DESCRIPTORS = ["answer_length", "answer_words"]
NUMERIC = ["top_score", "latency_ms", "cost_usd"]
EMBEDDING = "prompt_embedding"


class NotEnoughTraffic(ValueError):
    pass


def load_traffic(
    engine: sa.Engine, start: datetime | None = None, end: datetime | None = None
) -> pd.DataFrame:
    """Logged requests with ``start <= ts < end`` (either bound may be open), oldest first."""
    t = traffic_log
    q = sa.select(t).order_by(t.c.ts)
    if start is not None:
        q = q.where(t.c.ts >= start)
    if end is not None:
        q = q.where(t.c.ts < end)
    with engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    frame = pd.DataFrame([dict(r) for r in rows], columns=[c.name for c in t.columns])
    if not frame.empty:
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame


def reference_from_questions(questions: list[str]) -> pd.DataFrame:
    """The evaluation question set as a reference "window" (prompts only)."""
    return pd.DataFrame({"prompt": questions})


@dataclass(frozen=True)
class DriftThresholds:
    # Share of compared columns whose own test says "drifted" above which the check fails.
    max_drifted_share: float = 0.5
    # EmbeddingsDrift's ROC AUC above which prompts count as having moved; None: the method's
    # own decision (a bootstrap test below 1,000 reference rows, AUC > 0.55 above).
    max_embedding_auc: float | None = None
    # The retrieval-score column drifting fails the check on its own: answers lose grounding.
    fail_on_retrieval_drift: bool = True


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift as Evidently decided it: its score, the method and its threshold."""

    score: float
    method: str
    threshold: float
    drifted: bool


@dataclass
class DriftResult:
    html: Path
    reference_rows: int
    current_rows: int
    columns: list[str]
    column_drift: dict[str, ColumnDrift]
    drifted_columns: list[str]
    drifted_share: float
    embedding_auc: float | None
    embedding_drifted: bool = False
    failed_because: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed_because

    def summary(self) -> str:
        judged = "within thresholds" if self.passed else "; ".join(self.failed_because)
        return (
            f"drift: {len(self.drifted_columns)}/{len(self.column_drift)} columns drifted, "
            f"embedding AUC {self.embedding_auc}; {judged}"
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "current_rows": self.current_rows,
            "reference_rows": self.reference_rows,
            "drifted_columns": self.drifted_columns,
            "drifted_share": self.drifted_share,
            "prompt_embedding_auc": self.embedding_auc if self.embedding_auc is not None else "n/a",
        }

    def metrics(self) -> dict[str, float]:
        out = {
            "drifted_share": self.drifted_share,
            "drifted_columns": float(len(self.drifted_columns)),
            "reference_rows": float(self.reference_rows),
            "current_rows": float(self.current_rows),
        }
        if self.embedding_auc is not None:
            out["prompt_embedding_auc"] = self.embedding_auc
        for col, d in self.column_drift.items():
            out[f"drift_score.{col}"] = d.score
        return out

    def scores(self) -> dict[str, dict[str, Any]]:
        """Each column's score, method, threshold and verdict (for metadata and reports)."""
        return {c: vars(d) for c, d in self.column_drift.items()}


def _prepare(frame: pd.DataFrame, embed: EmbedFn | None) -> tuple[pd.DataFrame, list[str]]:
    """Rows with text, descriptors added by Evidently later; embeddings as columns e0..eN."""
    df = frame.copy()
    for col in ("prompt", "answer"):
        if col not in df:
            df[col] = None
    df["prompt"] = df["prompt"].fillna("").astype(str)
    df["answer"] = df["answer"].fillna("").astype(str)
    emb_cols: list[str] = []
    if embed is not None and len(df) and (df["prompt"] != "").all():
        # Each distinct prompt embedded once: busy days repeat their questions.
        unique, inverse = np.unique(df["prompt"].to_numpy(dtype=str), return_inverse=True)
        vectors = np.asarray(embed(unique.tolist()), dtype=np.float32)[inverse]
        emb_cols = [f"e{j}" for j in range(vectors.shape[1])]
        df = pd.concat([df, pd.DataFrame(vectors, columns=emb_cols, index=df.index)], axis=1)
    return df, emb_cols


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    html_path: Path,
    *,
    embed: EmbedFn | None = None,
    thresholds: DriftThresholds | None = None,
    min_rows: int = 20,
) -> DriftResult:
    """Run Evidently over the two windows, save its HTML report, and judge against thresholds."""
    th = thresholds or DriftThresholds()
    for name, frame in (("reference", reference), ("current", current)):
        if len(frame) < min_rows:
            raise NotEnoughTraffic(
                f"the {name} window holds {len(frame)} requests; drift needs at least {min_rows}"
            )
    ref, ref_emb = _prepare(reference, embed)
    cur, cur_emb = _prepare(current, embed)
    with_embeddings = bool(ref_emb) and ref_emb == cur_emb
    has_answers = bool((ref["answer"] != "").any() and (cur["answer"] != "").any())
    numeric = [c for c in NUMERIC if c in reference and c in current]
    numeric = [c for c in numeric if ref[c].notna().any() and cur[c].notna().any()]
    emb_cols = cur_emb if with_embeddings else []
    method = _embedding_method(len(ref)) if emb_cols else None
    snapshot, compared = _run_evidently(ref, cur, numeric, emb_cols, has_answers, method)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(html_path))
    columns, embedding_auc = _drift_scores(snapshot)
    embedding_drifted = False
    if emb_cols and method is not None:
        # The method's own verdict (Evidently's value carries the AUC only): the same
        # classifier, seeded, on the same two windows.
        embedding_auc, embedding_drifted, _ = method(cur[emb_cols].copy(), ref[emb_cols].copy())
        embedding_auc = float(embedding_auc)
        if th.max_embedding_auc is not None:
            embedding_drifted = embedding_auc > th.max_embedding_auc
    drifted = sorted(c for c, d in columns.items() if d.drifted)
    share = len(drifted) / max(1, len(columns))
    return DriftResult(
        html=html_path,
        reference_rows=len(ref),
        current_rows=len(cur),
        columns=compared,
        column_drift=columns,
        drifted_columns=drifted,
        drifted_share=share,
        embedding_auc=embedding_auc,
        embedding_drifted=bool(embedding_drifted),
        failed_because=_drift_failures(
            th, drifted, len(columns), embedding_auc if embedding_drifted else None
        ),
    )


def _embedding_method(reference_rows: int) -> Any:
    """Evidently's default embedding drift method for a reference of this size."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

    return model(bootstrap=reference_rows < 1000)


def _run_evidently(
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    numeric: list[str],
    emb_cols: list[str],
    has_answers: bool,
    embedding_method: Any = None,
) -> tuple[Any, list[str]]:
    """Evidently's snapshot of the drift from ``ref`` to ``cur``, and the columns it compared:
    the prompt descriptors, the answer descriptors when both windows have answers, and
    ``numeric``; plus the embedding drift when ``emb_cols`` is not empty."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.descriptors import NonLetterCharacterPercentage, TextLength, WordCount
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    descriptors = [
        TextLength("prompt", alias="prompt_length"),
        WordCount("prompt", alias="prompt_words"),
        NonLetterCharacterPercentage("prompt", alias="prompt_non_letter_pct"),
    ]
    compared = list(PROMPT_DESCRIPTORS)
    if has_answers:
        descriptors += [
            TextLength("answer", alias="answer_length"),
            WordCount("answer", alias="answer_words"),
        ]
        compared += ANSWER_DESCRIPTORS
    compared += numeric
    definition = DataDefinition(
        text_columns=["prompt", "answer"],
        numerical_columns=[*numeric, *emb_cols],
        embeddings={EMBEDDING: emb_cols} if emb_cols else None,
    )
    keep = ["prompt", "answer", *numeric, *emb_cols]

    def dataset(df: pd.DataFrame) -> Any:
        return Dataset.from_pandas(
            df[keep].reset_index(drop=True), data_definition=definition, descriptors=descriptors
        )

    metrics: list[Any] = [DataDriftPreset(columns=compared)]
    if emb_cols:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=embedding_method))
    metrics.append(DataSummaryPreset(columns=compared))
    with warnings.catch_warnings():  # constant columns make numpy warn inside Evidently
        warnings.simplefilter("ignore")
        snapshot = Report(metrics, include_tests=True).run(dataset(cur), dataset(ref))
    return snapshot, compared


def _drift_scores(snapshot: Any) -> tuple[dict[str, ColumnDrift], float | None]:
    """Each column's drift as Evidently decided it (its test's status, with the method and
    threshold it resolved for the window's size), and the embeddings' ROC AUC if measured."""
    data = snapshot.dict()
    verdicts: dict[str, bool] = {}
    for t in data.get("tests", []):
        params = (t.get("metric_config") or {}).get("params", {})
        if str(params.get("type", "")).endswith("ValueDrift"):
            verdicts[str(params.get("column"))] = str(t.get("status")).endswith("FAIL")
    columns: dict[str, ColumnDrift] = {}
    embedding_auc: float | None = None
    for m in data["metrics"]:
        cfg, value = m.get("config", {}), m.get("value")
        kind = str(cfg.get("type", ""))
        if kind.endswith("ValueDrift") and isinstance(value, int | float):
            column = str(cfg.get("column"))
            score = float(value)
            columns[column] = ColumnDrift(
                score=score,
                method=str(cfg.get("method")),
                threshold=float(cfg.get("threshold") or 0.0),
                drifted=verdicts.get(column, False) and not math.isnan(score),
            )
        elif kind.endswith("EmbeddingsDrift") and isinstance(value, int | float):
            embedding_auc = float(value)
    return columns, embedding_auc


def _drift_failures(
    th: DriftThresholds, drifted: list[str], tested: int, embedding_auc: float | None
) -> list[str]:
    """Why the drift check fails, one reason per threshold crossed; empty when it passes."""
    failed: list[str] = []
    share = len(drifted) / max(1, tested)
    if share > th.max_drifted_share:
        failed.append(f"{len(drifted)}/{tested} columns drifted (> {th.max_drifted_share:.0%})")
    if embedding_auc is not None:  # given only when the embeddings drifted
        failed.append(f"prompt embeddings drifted (ROC AUC {embedding_auc:.2f})")
    if th.fail_on_retrieval_drift and "top_score" in drifted:
        failed.append("retrieval scores drifted")
    return failed


# ---------------------------------------------------------------------------------------------
# Cost report


@dataclass
class CostSummary:
    requests: int
    total_cost_usd: float
    cost_per_request_usd: float
    p50_latency_ms: float
    p99_latency_ms: float
    cache_hit_rate: float
    guard_blocks: int
    error_rate: float
    per_day: pd.DataFrame

    def metrics(self) -> dict[str, float]:
        return {
            "requests": float(self.requests),
            "total_cost_usd": self.total_cost_usd,
            "cost_per_request_usd": self.cost_per_request_usd,
            "p50_latency_ms": self.p50_latency_ms,
            "p99_latency_ms": self.p99_latency_ms,
            "cache_hit_rate": self.cache_hit_rate,
            "guard_blocks": float(self.guard_blocks),
            "error_rate": self.error_rate,
        }


def cost_summary(frame: pd.DataFrame) -> CostSummary:
    if frame.empty:
        raise NotEnoughTraffic("the traffic log holds no request in this window")
    df = frame.copy()
    df["day"] = df["ts"].dt.floor("D")
    per_day = df.groupby("day").agg(
        requests=("request_id", "count"),
        cost_usd=("cost_usd", "sum"),
        cost_per_request_usd=("cost_usd", "mean"),
        p50_latency_ms=("latency_ms", lambda s: float(np.percentile(s, 50))),
        p99_latency_ms=("latency_ms", lambda s: float(np.percentile(s, 99))),
        cache_hit_rate=("cache_hit", "mean"),
        guard_blocks=("guard", lambda s: int((s == "blocked").sum())),
    )
    return CostSummary(
        requests=len(df),
        total_cost_usd=float(df["cost_usd"].sum()),
        cost_per_request_usd=float(df["cost_usd"].mean()),
        p50_latency_ms=float(np.percentile(df["latency_ms"], 50)),
        p99_latency_ms=float(np.percentile(df["latency_ms"], 99)),
        cache_hit_rate=float(df["cache_hit"].mean()),
        guard_blocks=int((df["guard"] == "blocked").sum()),
        error_rate=float((df["status"] >= 400).mean()),
        per_day=per_day,
    )


def cost_plot(frame: pd.DataFrame, path: Path, bucket: str = "1h") -> Path:
    """Four panels over time (per ``bucket``): cost per request, p50/p99 latency, cache hit
    rate, guard blocks. A PNG, which MLflow and Dagster both show inline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = frame.set_index("ts").sort_index()
    g = df.resample(bucket)
    series = {
        "cost per request (USD)": g["cost_usd"].mean(),
        "latency p50 (ms)": g["latency_ms"].quantile(0.5),
        "latency p99 (ms)": g["latency_ms"].quantile(0.99),
        "cache hit rate": g["cache_hit"].mean(),
        "guard blocks": g["guard"].apply(lambda s: int((s == "blocked").sum())),
    }
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(series["cost per request (USD)"], marker="o")
    axes[0].set_ylabel("USD / request")
    axes[1].plot(series["latency p50 (ms)"], marker="o", label="p50")
    axes[1].plot(series["latency p99 (ms)"], marker="o", label="p99")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    axes[2].plot(series["cache hit rate"], marker="o")
    axes[2].set_ylabel("cache hit rate")
    axes[2].set_ylim(-0.05, 1.05)
    axes[3].bar(series["guard blocks"].index, series["guard blocks"].values, width=0.03)
    axes[3].set_ylabel("guard blocks")
    axes[0].set_title(f"Refinery traffic per {bucket}")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The reports over a window of the log, as the monitoring assets run them


@dataclass
class DriftOutcome:
    reference: str  # "previous_window" or "evaluation_set" (what the current window met)
    current_rows: int
    result: DriftResult | None  # None: too little traffic to compare
    skipped: str = ""  # why, when result is None


def drift_over_window(
    engine: sa.Engine,
    end: datetime,
    window: timedelta,
    reports_dir: Path,
    run: Any,
    *,
    reference: str = "previous_window",
    min_rows: int = 20,
    thresholds: DriftThresholds | None = None,
    embed: EmbedFn | None = None,
    log: Callable[[str], None] | None = None,
    pushgateway_url: str | None = None,
) -> DriftOutcome:
    """Drift of the window ``[end - window, end)`` against the window before it (or the
    evaluation question set, when that window holds fewer than ``min_rows`` requests, or when
    ``reference="evaluation_set"``). Params, metrics, tags and the HTML go to the MLflow run;
    the outcome also goes to the Pushgateway at ``pushgateway_url``, when there is one."""
    from evaluation.datasets import load_rag_questions

    current = load_traffic(engine, end - window, end)
    previous = load_traffic(engine, end - 2 * window, end - window)
    used, ref = reference, previous
    if reference == "evaluation_set" or len(previous) < min_rows:
        if reference == "previous_window" and log:
            log(
                f"previous window holds {len(previous)} requests (< {min_rows}): "
                "using the evaluation question set as the reference"
            )
        rows, _ = load_rag_questions()
        used, ref = "evaluation_set", reference_from_questions([r["question"] for r in rows])
    thresholds = thresholds or DriftThresholds()
    run.log_params(
        {
            "window_hours": window.total_seconds() / 3600,
            "window_end": end.isoformat(),
            "reference": used,
            "max_drifted_share": thresholds.max_drifted_share,
            "max_embedding_auc": thresholds.max_embedding_auc,
        }
    )
    html = reports_dir / f"drift-{run.run_id[:8]}.html"
    try:
        result = drift_report(
            ref, current, html, embed=embed, thresholds=thresholds, min_rows=min_rows
        )
    except NotEnoughTraffic as err:
        run.set_tags({"refinery.drift": "not_enough_traffic"})
        return DriftOutcome(used, len(current), None, str(err))
    run.log_metrics(result.metrics())
    run.log_artifact(result.html)
    run.set_tags({"refinery.drift": "passed" if result.passed else "failed"})
    try:  # the outcome as a Prometheus gauge (REFINERY_PUSHGATEWAY_URL): the alert reads it
        push_drift(result.passed, pushgateway_url)
    except OSError as err:
        if log:
            log(f"could not push the drift result to the Pushgateway: {err}")
    return DriftOutcome(used, len(current), result)


@dataclass
class CostOutcome:
    summary: CostSummary
    png: Path
    run_id: str
    run_url: str


def cost_over_window(
    engine: sa.Engine,
    end: datetime,
    window: timedelta,
    bucket: str,
    reports_dir: Path,
    open_run: RunOpener,
) -> CostOutcome | None:
    """The cost report of ``[end - window, end)`` in an MLflow run of its own (figures, the PNG,
    a per-day CSV); None, and no run, when the window holds no request."""
    frame = load_traffic(engine, end - window, end)
    if frame.empty:
        return None
    summary = cost_summary(frame)
    params = {"window_days": window.total_seconds() / 86400, "bucket": bucket}
    with open_run(params, {}) as run:
        png = cost_plot(frame, reports_dir / f"cost-{run.run_id[:8]}.png", bucket)
        run.log_metrics(summary.metrics())
        run.log_artifact(png)
        run.log_text(summary.per_day.to_csv(), "cost_per_day.csv")
    return CostOutcome(summary, png, run.run_id, run.url)
