"""The promotion gate: a pure function from evaluation results and a policy to a decision
with reasons. Dagster wraps it in a blocking asset check; nothing here has side effects."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal


class HumanGate(enum.StrEnum):
    """Whether promotion waits for human ratings (``waived`` needs a recorded reason)."""

    required = "required"
    waived = "waived"


@dataclass(frozen=True)
class MetricRule:
    """The challenger may be worse than the champion on ``metric`` by at most ``tolerance``
    (an absolute difference, or a fraction of the champion's value when ``relative``)."""

    metric: str
    higher_is_better: bool = True
    tolerance: float = 0.0
    relative: bool = False

    def limit(self, champion: float) -> float:
        slack = abs(champion) * self.tolerance if self.relative else self.tolerance
        return champion - slack if self.higher_is_better else champion + slack

    def ok(self, challenger: float, champion: float) -> bool:
        limit = self.limit(champion)
        return challenger >= limit if self.higher_is_better else challenger <= limit


DEFAULT_RULES: tuple[MetricRule, ...] = (
    MetricRule("rag_token_f1", tolerance=0.02),
    MetricRule("rag_rouge_l", tolerance=0.02),
    MetricRule("rag_groundedness", tolerance=0.05),
    MetricRule("retrieval_hit_at_k", tolerance=0.0),
    MetricRule("heldout_token_f1", tolerance=0.02),
    MetricRule("heldout_perplexity", higher_is_better=False, tolerance=0.05, relative=True),
)


@dataclass(frozen=True)
class HumanRule:
    min_ratings: int = 10
    min_mean: float = 4.0
    min_ci_low: float = 3.8


@dataclass(frozen=True)
class GatePolicy:
    rules: tuple[MetricRule, ...] = DEFAULT_RULES
    human: HumanRule = field(default_factory=HumanRule)
    human_gate: Literal["required", "waived"] = "required"
    waiver_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def policy_from(
    *,
    human_gate: str = "required",
    waiver_reason: str = "",
    min_ratings: int = 10,
    min_mean: float = 4.0,
    min_ci_low: float = 3.8,
    rules: Sequence[str] = (),
    tolerances: Mapping[str, float] | None = None,
) -> GatePolicy:
    """A policy from plain settings: ``rules`` restricts the gate to those metrics,
    ``tolerances`` overrides a rule's default tolerance. ValueError names unknown metrics."""
    gate = HumanGate(human_gate)  # ValueError for anything but required / waived
    tolerances = dict(tolerances or {})
    known = {r.metric for r in DEFAULT_RULES}
    unknown = sorted((set(rules) | set(tolerances)) - known)
    if unknown:
        raise ValueError(f"unknown gate metrics {unknown}; known: {sorted(known)}")
    return GatePolicy(
        rules=tuple(
            replace(r, tolerance=tolerances.get(r.metric, r.tolerance))
            for r in DEFAULT_RULES
            if not rules or r.metric in rules
        ),
        human=HumanRule(min_ratings, min_mean, min_ci_low),
        human_gate=gate.value,
        waiver_reason=waiver_reason,
    )


@dataclass(frozen=True)
class HumanSummary:
    count: int
    mean: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]
    checks: list[dict[str, Any]]
    human_waived: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_to_champion(
    challenger: dict[str, float] | None,
    champion: dict[str, float] | None,
    human: HumanSummary | None,
    policy: GatePolicy,
) -> GateDecision:
    """Pass only if every rule and the human gate pass; every failure names its reason."""
    reasons: list[str] = []
    checks: list[dict[str, Any]] = []
    if not challenger or not challenger.get("examples"):
        return GateDecision(
            False, ["no automatic evaluation results for the challenger"], [], False
        )
    if champion is None:
        reasons.append("no champion yet: the first model is compared with the thresholds only")
    for rule in policy.rules:
        value = challenger.get(rule.metric)
        if value is None or not math.isfinite(value):
            checks.append({"metric": rule.metric, "challenger": value, "ok": False})
            reasons.append(f"{rule.metric}: missing from the challenger's evaluation")
            continue
        if champion is None or champion.get(rule.metric) is None:
            checks.append({"metric": rule.metric, "challenger": value, "ok": True})
            continue
        base = champion[rule.metric]
        ok = rule.ok(value, base)
        checks.append(
            {
                "metric": rule.metric,
                "challenger": value,
                "champion": base,
                "limit": rule.limit(base),
                "ok": ok,
            }
        )
        if not ok:
            worse = "lower" if rule.higher_is_better else "higher"
            reasons.append(
                f"{rule.metric}: {value:.4g} is {worse} than the champion's {base:.4g} beyond the tolerance (limit {rule.limit(base):.4g})"
            )
    human_ok, human_waived = _human_gate(human, policy, reasons)
    checks.append(
        {
            "metric": "human",
            **(asdict(human) if human else {}),
            "ok": human_ok,
            "waived": human_waived,
        }
    )
    passed = all(c["ok"] for c in checks)
    if passed:
        reasons.append("all rules passed")
    return GateDecision(passed, reasons, checks, human_waived)


def _human_gate(
    human: HumanSummary | None, policy: GatePolicy, reasons: list[str]
) -> tuple[bool, bool]:
    if policy.human_gate == "waived":
        if not policy.waiver_reason.strip():
            reasons.append("human gate: a waiver needs a reason (waiver_reason)")
            return False, False
        reasons.append(f"human gate WAIVED: {policy.waiver_reason}")
        return True, True
    rule = policy.human
    if human is None or human.count == 0:
        reasons.append(f"human gate: no ratings yet (need at least {rule.min_ratings})")
        return False, False
    problems = []
    if human.count < rule.min_ratings:
        problems.append(f"{human.count} ratings < {rule.min_ratings}")
    if not human.mean >= rule.min_mean:
        problems.append(f"mean {human.mean:.2f} < {rule.min_mean}")
    if not human.ci_low >= rule.min_ci_low:
        problems.append(f"95% CI lower bound {human.ci_low:.2f} < {rule.min_ci_low}")
    if problems:
        reasons.append("human gate: " + "; ".join(problems))
        return False, False
    reasons.append(
        f"human gate: mean {human.mean:.2f} (95% CI {human.ci_low:.2f}–{human.ci_high:.2f}) over {human.count} ratings"
    )
    return True, False
