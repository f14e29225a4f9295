"""The promotion gate: a pure function from evaluation results and a policy to a decision
with reasons. Dagster wraps it in a blocking asset check; nothing here has side effects.

Two kinds of automatic rule: ``MetricRule`` compares the challenger with the champion (a first
model passes them on its own), by a paired bootstrap interval over the examples both models
answered: the challenger passes a rule when, at the policy's confidence, it is not worse than
the champion by more than the tolerance (a non-inferiority test: the one-sided bound of the
difference must stay within the tolerance, so a small evaluation set gives a wide interval and
needs a clear margin). Without per-example scores (an older hand-off) a rule compares the two
means and says so. ``FloorRule`` is an absolute bound that every model must meet,
the first one included, so a model that withholds every answer cannot become champion because
there was nothing to compare it with."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from evaluation.metrics import paired_bootstrap


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

    def paired(
        self, paired: Mapping[str, Any], confidence: float, resamples: int
    ) -> dict[str, Any]:
        """The paired bootstrap check over ``paired`` (``{"rows": [...], "exp": bool}``, see
        ``evaluation.metrics.paired_bootstrap``): the difference challenger − champion (a
        fraction of the champion's value when ``relative``), its interval, and ``ok``: the
        bound on the worse side is within the tolerance."""
        diff, low, high = paired_bootstrap(
            paired["rows"], relative=self.relative, exp=bool(paired.get("exp")),
            confidence=confidence, resamples=resamples,
        )  # fmt: skip
        bound = low if self.higher_is_better else high
        ok = bound >= -self.tolerance if self.higher_is_better else bound <= self.tolerance
        return {
            "method": "paired bootstrap",
            "difference": diff,
            "interval": [low, high],
            "bound": bound,
            "confidence": confidence,
            "examples": len(paired["rows"]),
            "tolerance": self.tolerance,
            "relative": self.relative,
            "ok": ok,
        }


DEFAULT_RULES: tuple[MetricRule, ...] = (
    MetricRule("rag_token_f1", tolerance=0.02),
    MetricRule("rag_rouge_l", tolerance=0.02),
    MetricRule("rag_groundedness", tolerance=0.05),
    MetricRule("retrieval_hit_at_k", tolerance=0.0),
    MetricRule("heldout_token_f1", tolerance=0.02),
    MetricRule("heldout_perplexity", higher_is_better=False, tolerance=0.05, relative=True),
)


@dataclass(frozen=True)
class FloorRule:
    """An absolute bound on ``metric``, for first models and challengers alike: at least
    ``minimum`` and at most ``maximum`` (None: no bound on that side). ``why`` ends the reason
    of a failure."""

    metric: str
    minimum: float | None = None
    maximum: float | None = None
    why: str = ""

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` (None: it is within the bounds)."""
        why = f" ({self.why})" if self.why else ""
        if self.minimum is not None and not value >= self.minimum:
            return f"{self.metric}: {value:.4g} is below the floor {self.minimum:.4g}{why}"
        if self.maximum is not None and not value <= self.maximum:
            return f"{self.metric}: {value:.4g} is above the ceiling {self.maximum:.4g}{why}"
        return None

    def with_bound(self, bound: float) -> FloorRule:
        """The same floor with its bound moved: the minimum where it has one, else the maximum."""
        if self.minimum is not None:
            return replace(self, minimum=bound)
        return replace(self, maximum=bound)


# Placeholders until they are tuned on measured models; every default floor lives here.
# ``rag_answered_right``: share of RAG questions answered (not withheld) and correct;
# ``rag_wrong_shown``: share answered and wrong (``evaluation.automatic``).
DEFAULT_FLOORS: tuple[FloorRule, ...] = (
    FloorRule("rag_answered_right", minimum=0.25, why="a model must answer and be right"),
    FloorRule("rag_wrong_shown", maximum=0.25, why="a model must not show wrong answers"),
)


@dataclass(frozen=True)
class HumanRule:
    min_ratings: int = 10
    min_mean: float = 4.0
    min_ci_low: float = 3.8


@dataclass(frozen=True)
class GatePolicy:
    rules: tuple[MetricRule, ...] = DEFAULT_RULES
    floors: tuple[FloorRule, ...] = DEFAULT_FLOORS
    human: HumanRule = field(default_factory=HumanRule)
    human_gate: Literal["required", "waived"] = "required"
    waiver_reason: str = ""
    # One-sided confidence of the paired bootstrap bound, and the number of resamples.
    confidence: float = 0.95
    resamples: int = 2000

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
    floors: Mapping[str, float] | None = None,
    confidence: float = 0.95,
) -> GatePolicy:
    """A policy from plain settings: ``rules`` restricts the comparison with the champion to
    those metrics, ``tolerances`` overrides a rule's default tolerance, ``floors`` moves the
    bound of a floor (``DEFAULT_FLOORS``; its minimum, or its maximum for a ceiling such as
    ``rag_wrong_shown``). Floors always apply, whatever ``rules`` says. ValueError names
    unknown metrics, non-finite bounds and a confidence outside [0.5, 1)."""
    gate = HumanGate(human_gate)  # ValueError for anything but required / waived
    tolerances = dict(tolerances or {})
    floors = dict(floors or {})
    known = {r.metric for r in DEFAULT_RULES}
    unknown = sorted((set(rules) | set(tolerances)) - known)
    if unknown:
        raise ValueError(f"unknown gate metrics {unknown}; known: {sorted(known)}")
    known_floors = {f.metric for f in DEFAULT_FLOORS}
    unknown = sorted(set(floors) - known_floors)
    if unknown:
        raise ValueError(f"unknown floor metrics {unknown}; known: {sorted(known_floors)}")
    bad = sorted(m for m, v in floors.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"floor bounds must be finite numbers: {bad}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be at least 0.5 and below 1, got {confidence}")
    return GatePolicy(
        rules=tuple(
            replace(r, tolerance=tolerances.get(r.metric, r.tolerance))
            for r in DEFAULT_RULES
            if not rules or r.metric in rules
        ),
        floors=tuple(
            f.with_bound(floors[f.metric]) if f.metric in floors else f for f in DEFAULT_FLOORS
        ),
        human=HumanRule(min_ratings, min_mean, min_ci_low),
        human_gate=gate.value,
        waiver_reason=waiver_reason,
        confidence=confidence,
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
    paired: Mapping[str, Mapping[str, Any]] | None = None,
) -> GateDecision:
    """Pass only if every floor, every rule and the human gate pass; every failure names its
    reason. Floors hold for a first model too (no champion to compare with). ``paired``:
    per metric, both models' per-example scores over the same examples (``rows``, ``exp``; see
    ``MetricRule.paired``); a rule without them compares the means."""
    reasons: list[str] = []
    checks: list[dict[str, Any]] = []
    if not challenger or not challenger.get("examples"):
        return GateDecision(
            False, ["no automatic evaluation results for the challenger"], [], False
        )
    if champion is None:
        reasons.append("no champion yet: the first model is compared with the thresholds only")
    for floor in policy.floors:
        _floor_check(floor, challenger.get(floor.metric), checks, reasons)
    for rule in policy.rules:
        _rule_check(
            rule, challenger, champion, (paired or {}).get(rule.metric), policy, checks, reasons
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


def _rule_check(
    rule: MetricRule,
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    paired: Mapping[str, Any] | None,
    policy: GatePolicy,
    checks: list[dict[str, Any]],
    reasons: list[str],
) -> None:
    value = challenger.get(rule.metric)
    if value is None or not math.isfinite(value):
        checks.append({"metric": rule.metric, "challenger": value, "ok": False})
        reasons.append(f"{rule.metric}: missing from the challenger's evaluation")
        return
    if champion is None or champion.get(rule.metric) is None:
        checks.append({"metric": rule.metric, "challenger": value, "ok": True})
        return
    base = champion[rule.metric]
    check: dict[str, Any] = {"metric": rule.metric, "challenger": value, "champion": base}
    worse = "lower" if rule.higher_is_better else "higher"
    if paired and paired.get("rows"):
        check.update(rule.paired(paired, policy.confidence, policy.resamples))
        unit = " of the champion's" if rule.relative else ""
        low, high = check["interval"]
        figures = (
            f"difference {check['difference']:+.4g}{unit}, {policy.confidence:.0%} bound "
            f"{check['bound']:+.4g} (interval {low:+.4g} to {high:+.4g}) over "
            f"{check['examples']} paired examples, tolerance {rule.tolerance:.4g}"
        )
        checks.append(check)
        if check["ok"]:
            reasons.append(f"{rule.metric}: not worse beyond the tolerance ({figures})")
        else:
            reasons.append(
                f"{rule.metric}: {value:.4g} against the champion's {base:.4g}; "
                f"{worse} than the champion's beyond the tolerance at {policy.confidence:.0%} "
                f"confidence ({figures})"
            )
        return
    ok = rule.ok(value, base)
    checks.append({**check, "method": "point estimate", "limit": rule.limit(base), "ok": ok})
    if not ok:
        reasons.append(
            f"{rule.metric}: {value:.4g} is {worse} than the champion's {base:.4g} beyond the "
            f"tolerance (limit {rule.limit(base):.4g}; means compared: no per-example scores)"
        )


def _floor_check(
    floor: FloorRule, value: float | None, checks: list[dict[str, Any]], reasons: list[str]
) -> None:
    check: dict[str, Any] = {
        "metric": floor.metric,
        "kind": "floor",
        "challenger": value,
        "minimum": floor.minimum,
        "maximum": floor.maximum,
    }
    if value is None or not math.isfinite(value):
        checks.append({**check, "ok": False})
        reasons.append(
            f"{floor.metric}: missing from the challenger's evaluation (a floor every model must meet)"
        )
        return
    problem = floor.problem(value)
    checks.append({**check, "ok": problem is None})
    if problem is not None:
        reasons.append(problem)


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
