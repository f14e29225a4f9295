"""Moving the "champion" alias, recording why, and moving it back.

A decision is recorded on the challenger's model version (tags ``refinery.promotion.*``:
passed, reasons, policy, inputs), so the MLflow UI shows why a version was or was not
promoted. Variants registered beside a version (``refinery.source_version`` = name/version)
follow it: when ``refinery-chat`` v3 becomes champion, so does its ``refinery-chat-onnx-int8``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from evaluation.gate import GateDecision
from refinery.core.registry import CHAMPION
from refinery.core.tracking import client_for

TAG_PASSED = "refinery.promotion.passed"
TAG_PREVIOUS = "refinery.promotion.previous_champion"


class PromotionError(RuntimeError):
    pass


@dataclass(frozen=True)
class ChampionRef:
    """The hand-off of ``champion_model``: the version the champion alias points to now."""

    registered_model: str
    version: str
    previous: str  # the version it replaced, "" when none


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


def record_decision(
    tracking_uri: str,
    name: str,
    version: str,
    decision: GateDecision,
    policy: dict[str, Any],
    inputs: dict[str, Any],
) -> None:
    client = client_for(tracking_uri)
    tags = {
        TAG_PASSED: str(decision.passed).lower(),
        "refinery.promotion.reasons": json.dumps(decision.reasons),
        "refinery.promotion.human_waived": str(decision.human_waived).lower(),
        "refinery.promotion.policy": json.dumps(policy, sort_keys=True, default=str)[:5000],
        "refinery.promotion.inputs": json.dumps(inputs, sort_keys=True, default=str)[:5000],
        "refinery.promotion.decided_at": _now(),
        # each rule's figures: the paired difference, its interval and bound, or the means
        "refinery.promotion.checks": json.dumps(decision.checks, sort_keys=True, default=str)[
            :5000
        ],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def current_champion(tracking_uri: str, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client_for(tracking_uri).get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def _variants_of(client: Any, name: str, version: str) -> list[Any]:
    found = client.search_model_versions(f"tags.`refinery.source_version` = '{name}/{version}'")
    return [v for v in found if v.name.startswith(f"{name}-")]


def _move(client: Any, name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    for variant in _variants_of(client, name, version):
        client.set_registered_model_alias(variant.name, CHAMPION, str(variant.version))


def promote(tracking_uri: str, name: str, version: str, *, reason: str = "") -> str | None:
    """Make ``version`` the champion (with its variants); return the previous champion."""
    client = client_for(tracking_uri)
    previous = current_champion(tracking_uri, name)
    if previous == version:
        return previous
    mv = client.get_model_version(name, version)
    if (mv.tags or {}).get(TAG_PASSED) != "true":
        raise PromotionError(
            f"{name}/{version} has no passing promotion decision: refusing to promote it"
        )
    _move(client, name, version)
    client.set_model_version_tag(name, version, "refinery.promotion.promoted_at", _now())
    if reason:
        client.set_model_version_tag(name, version, "refinery.promotion.note", reason)
    if previous is not None:
        client.set_model_version_tag(name, version, TAG_PREVIOUS, previous)
    return previous


def rollback(tracking_uri: str, name: str) -> tuple[str, str]:
    """Move ``champion`` back to the version it replaced; return (from, to)."""
    client = client_for(tracking_uri)
    current = current_champion(tracking_uri, name)
    if current is None:
        raise PromotionError(f"{name} has no champion to roll back")
    previous = (client.get_model_version(name, current).tags or {}).get(TAG_PREVIOUS)
    if not previous:
        raise PromotionError(
            f"{name}/{current} is the first champion: there is no earlier one to roll back to"
        )
    _move(client, name, previous)
    client.set_model_version_tag(name, current, "refinery.promotion.rolled_back_at", _now())
    client.set_model_version_tag(name, previous, "refinery.promotion.restored_at", _now())
    return current, previous
