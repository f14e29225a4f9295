"""The challenger against the champion: one evaluation run over both, recorded in MLflow.

``plan_evaluation`` resolves the two models and the question sets (cheap, and where bad
input fails); ``run_evaluation`` answers them with each model, logs traces, tables, metrics,
the Evidently report and ``evaluation.json`` to the given MLflow run, tags the challenger's
model version with its metrics, and returns the outcome that the gate reads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluation.automatic import (
    EvaluationError,
    ModelEvaluation,
    evaluate_model,
    paired_scores,
    reliability_png,
)
from evaluation.datasets import DEFAULT_RAG_QUESTIONS, load_rag_questions
from evaluation.gate import GateDecision, GatePolicy, compare_to_champion
from evaluation.promotion import current_champion, record_decision
from evaluation.report import examples_frame, write_report
from evaluation.review import HumanEvaluation
from evaluation.tracing import evaluate_in_mlflow, log_traces
from refinery.core.registry import LocalModel, ModelRef, download, resolve
from refinery.core.tracking import TrackedRun
from refinery.rag.confidence import Calibration, load_calibration
from refinery.retrieval.search import Retriever

Progress = Callable[[str], None]


class ServedModel:
    """A registered version as the service runs it: answers from the serving engine (the
    OpenVINO export with continuous batching, when the version has one), likelihoods of the
    reference answers from its weights."""

    def __init__(self, scorer: Any, engine: Any | None) -> None:
        self.scorer, self.engine = scorer, engine
        self.tokenizer = scorer.tokenizer

    @classmethod
    def load(cls, local: LocalModel) -> ServedModel:
        from refinery.generation.engine.loader import load_engine
        from refinery.generation.generator import load_generator

        scorer = load_generator(local.weights, variant=local.variant)
        engine = None
        if local.variant == "none" and local.openvino is not None:
            engine = load_engine(local.weights, backend="openvino", openvino_dir=local.openvino)
        return cls(scorer, engine)

    def batch_size(self, configured: int) -> int:
        # The engine batches whatever it is given; fixed batches keep the configured size.
        return max(configured, 32) if self.engine is not None else configured

    def generate(self, prompts: Any, max_new_tokens: Any = 64, **kw: Any) -> Any:
        runner = self.engine if self.engine is not None else self.scorer
        return runner.generate(prompts, max_new_tokens=max_new_tokens, **kw)

    def logits(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.scorer.logits(input_ids, attention_mask)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


@dataclass(frozen=True)
class EvaluationPlan:
    challenger: ModelRef
    champion: ModelRef | None  # None: no champion yet, or the challenger already is it
    heldout: list[dict[str, Any]]
    rag: list[dict[str, Any]]
    rag_dropped: dict[str, int] = field(default_factory=dict)
    challenger_is_champion: bool = False

    @property
    def champion_label(self) -> str:
        if self.challenger_is_champion:
            return self.challenger.label
        return self.champion.label if self.champion else "none"

    def params(self) -> dict[str, Any]:
        return {
            "challenger": self.challenger.label,
            "champion": self.champion_label,
            "heldout_rows": len(self.heldout),
            "rag_rows": len(self.rag),
        }


def plan_evaluation(
    tracking_uri: str,
    name: str,
    version: str,
    heldout: list[dict[str, Any]],
    *,
    rag_path: Path = DEFAULT_RAG_QUESTIONS,
    heldout_limit: int = 30,
    rag_limit: int = 60,
) -> EvaluationPlan:
    """Version ``version`` of ``name`` against the current champion (if another version)."""
    challenger = resolve(tracking_uri, name, version)
    champion_version = current_champion(tracking_uri, name)
    champion = (
        resolve(tracking_uri, name, champion_version)
        if champion_version and champion_version != challenger.version
        else None
    )
    rag, dropped = load_rag_questions(rag_path)
    plan = EvaluationPlan(
        challenger,
        champion,
        heldout[:heldout_limit],
        rag[:rag_limit],
        dict(dropped),
        challenger_is_champion=champion_version == challenger.version,
    )
    if not plan.heldout and not plan.rag:
        raise EvaluationError(
            "both evaluation sets are empty (heldout_limit and rag_limit are 0, or the files "
            "have no usable row)"
        )
    return plan


@dataclass(frozen=True)
class EvaluationOutcome:
    """The hand-off of ``automatic_evaluation``: who was compared, their metrics, where the
    run and its report are. ``champion`` is "none" when there was no champion, and equals
    ``challenger`` when the challenger already is the champion."""

    challenger: str  # "name/version"
    champion: str
    challenger_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    comparison: str  # Markdown table
    report_path: str
    rag_rows_dropped: dict[str, int]
    mlflow_run_id: str
    mlflow_run_url: str
    # Per metric, both models' per-example scores on the same examples, for the gate's paired
    # bootstrap (``evaluation.automatic.paired_scores``); empty without a separate champion.
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def challenger_ref(self) -> tuple[str, str]:
        name, version = self.challenger.rsplit("/", 1)
        return name, version


def run_evaluation(
    tracking_uri: str,
    plan: EvaluationPlan,
    retriever: Retriever,
    run: TrackedRun,
    reports_dir: Path,
    *,
    k: int = 3,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    progress: Progress | None = None,
    trace_salt: str = "",
) -> EvaluationOutcome:
    """Both contenders answered and scored on the same questions, logged to ``run`` (traces
    name the model by a hash keyed with ``trace_salt``), compared in a report."""
    results: dict[str, ModelEvaluation] = {}
    calibration = load_calibration()  # the RAG confidence model the service runs, read once
    contenders = [("challenger", plan.challenger)]
    if plan.champion is not None:
        contenders.append(("champion", plan.champion))
    for role, ref in contenders:
        if progress:
            progress(f"evaluating the {role}, {ref.label}")
        result = _evaluate_version(
            tracking_uri, ref, plan, retriever, k=k, batch_size=batch_size,
            max_new_tokens=max_new_tokens, calibration=calibration, progress=progress,
        )  # fmt: skip
        _log_contender(tracking_uri, run, role, ref, result, k=k, trace_salt=trace_salt)
        results[role] = result
    report = write_report(
        results["challenger"],
        results.get("champion"),
        reports_dir / f"evaluation-{run.run_id}.html",
    )
    run.log_artifact(report)
    if plan.challenger_is_champion:
        results["champion"] = results["challenger"]
    _log_evaluation_json(run, results)
    champion_label = plan.champion_label
    run.set_tags(
        {"refinery.challenger": plan.challenger.label, "refinery.champion": champion_label}
    )
    _tag_model_version(run, plan.challenger, results["challenger"].metrics)
    return EvaluationOutcome(
        challenger=plan.challenger.label,
        champion=champion_label,
        challenger_metrics=results["challenger"].metrics,
        champion_metrics=results["champion"].metrics if "champion" in results else {},
        comparison=comparison_table(results),  # (the challenger twice when it is the champion)
        report_path=str(report),
        rag_rows_dropped=plan.rag_dropped,
        mlflow_run_id=run.run_id,
        mlflow_run_url=run.url,
        paired=(
            {}
            if plan.challenger_is_champion or "champion" not in results
            else paired_scores(results["challenger"], results["champion"])
        ),
    )


def _log_evaluation_json(run: TrackedRun, results: dict[str, ModelEvaluation]) -> None:
    """Each role's model, metrics and scored examples, as ``evaluation.json`` of the run."""
    run.log_dict(
        {
            role: {
                "model": r.label,
                "metrics": r.metrics,
                "examples": [e.to_dict() for e in r.examples],
            }
            for role, r in results.items()
        },
        "evaluation.json",
    )


def _evaluate_version(
    tracking_uri: str,
    ref: ModelRef,
    plan: EvaluationPlan,
    retriever: Retriever,
    *,
    k: int,
    batch_size: int,
    max_new_tokens: int,
    calibration: Calibration | None,
    progress: Progress | None,
) -> ModelEvaluation:
    # The download (hundreds of MB) lives as long as the evaluation, not in /tmp forever.
    with tempfile.TemporaryDirectory(prefix="refinery-eval-") as tmp:
        model = ServedModel.load(download(tracking_uri, ref, Path(tmp)))
        try:
            return evaluate_model(
                ref.label, model, plan.heldout, plan.rag, retriever, k=k,
                batch_size=model.batch_size(batch_size), max_new_tokens=max_new_tokens,
                calibration=calibration, progress=progress,
            )  # fmt: skip
        finally:
            model.close()


def _log_contender(
    tracking_uri: str,
    run: TrackedRun,
    role: str,
    ref: ModelRef,
    result: ModelEvaluation,
    *,
    k: int,
    trace_salt: str = "",
) -> None:
    """One model's traces, metrics (prefixed by its role), examples and reliability diagram;
    its ``mlflow.genai.evaluate`` child run, with the metrics linked to its LoggedModel."""
    label = ref.label
    log_traces(tracking_uri, run.experiment_id, run.run_id, label, result.examples, trace_salt)
    evaluate_in_mlflow(
        tracking_uri, run.experiment_id, run.run_id, label, result.examples, result.metrics,
        model_id=ref.model_id, k=k, salt=trace_salt,
    )  # fmt: skip
    run.log_metrics({f"{role}.{m}": v for m, v in result.metrics.items()})
    run.client.log_table(run.run_id, examples_frame(result), f"examples_{role}.json")
    with tempfile.TemporaryDirectory(prefix="refinery-eval-") as tmp:
        png = reliability_png(result, Path(tmp) / f"reliability_{role}.png")
        if png is not None:  # the RAG confidence's calibration, as a reliability diagram
            run.log_artifact(png)


def _tag_model_version(run: TrackedRun, ref: ModelRef, metrics: dict[str, float]) -> None:
    """The evaluated version carries its metrics and the run that measured them."""
    for key, value in metrics.items():
        run.client.set_model_version_tag(
            ref.name, ref.version, f"refinery.eval.{key}", f"{value:.6g}"
        )
    run.client.set_model_version_tag(ref.name, ref.version, "refinery.eval.run_id", run.run_id)


def comparison_table(results: dict[str, ModelEvaluation]) -> str:
    challenger, champion = results["challenger"], results.get("champion")
    head = f"| metric | challenger {challenger.label} |" + (
        f" champion {champion.label} |" if champion else ""
    )
    rows = [head, "|---|---|" + ("---|" if champion else "")]
    for key in sorted(challenger.metrics):
        line = f"| {key} | {challenger.metrics[key]:.4g} |"
        if champion:
            line += f" {champion.metrics.get(key, float('nan')):.4g} |"
        rows.append(line)
    return "\n".join(rows)


def decide_promotion(
    tracking_uri: str,
    outcome: EvaluationOutcome,
    human: HumanEvaluation,
    policy: GatePolicy,
    dagster_run_id: str,
) -> GateDecision:
    """The gate's decision on the evaluated challenger, recorded on its model version (the
    reasons must reach MLflow whether or not the alias moves)."""
    if outcome.champion == outcome.challenger:
        return GateDecision(True, ["the challenger is already the champion"], [], False)
    h = human.challenger
    decision = compare_to_champion(
        outcome.challenger_metrics,
        outcome.champion_metrics or None,
        h.human(),
        policy,
        paired=outcome.paired,
    )
    inputs = {
        "challenger": outcome.challenger,
        "champion": outcome.champion,
        "challenger_metrics": outcome.challenger_metrics,
        "champion_metrics": outcome.champion_metrics,
        "human": asdict(h),
        "dagster_run_id": dagster_run_id,
    }
    name, version = outcome.challenger_ref
    record_decision(tracking_uri, name, version, decision, policy.to_dict(), inputs)
    return decision
