"""User data for training, behind an approval step (the poisoning guard).

Data from users (feedback files, logged conversations) is *proposed*: it lands in
``training_examples`` as ``pending``. Nothing pending or rejected ever reaches a training set;
``approved_examples`` is the only way in, and only a named reviewer who is not the submitter
can approve. Proposals that trip the prompt-injection heuristics are rejected on arrival.
Every approved row keeps its ``source`` (``traffic:<request id>``, ``file:<name>:<line>``), and
the SFT dataset records which examples it took (MLflow tags and an artifact), so any model can
be traced back to the user data that trained it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from refinery.core.lineage import sha256_hex
from refinery.core.schema import create_schema, traffic_log, training_examples
from refinery.safety.guard import heuristic_reasons

STATUSES = ("pending", "approved", "rejected")


class ReviewError(ValueError):
    pass


@dataclass(frozen=True)
class Proposal:
    prompt: str
    answer: str
    source: str


def example_id(prompt: str, answer: str) -> str:
    return sha256_hex(f"example\x00{prompt.strip()}\x00{answer.strip()}")[:32]


def propose(engine: sa.Engine, proposals: Iterable[Proposal], submitted_by: str) -> dict[str, int]:
    """Add proposals as pending (or rejected, if they look like an injection). Proposing the
    same prompt and answer again changes nothing. Returns counts by outcome."""
    if not submitted_by.strip():
        raise ReviewError("say who submits the examples (submitted_by)")
    create_schema(engine)
    counts = {"pending": 0, "rejected": 0, "duplicate": 0, "empty": 0}
    with engine.begin() as conn:
        for p in proposals:
            prompt, answer = p.prompt.strip(), p.answer.strip()
            if not prompt or not answer:
                counts["empty"] += 1
                continue
            flags = heuristic_reasons(prompt) + heuristic_reasons(answer)
            status = "rejected" if flags else "pending"
            stmt = (
                insert(training_examples)
                .values(
                    example_id=example_id(prompt, answer),
                    prompt=prompt,
                    answer=answer,
                    source=p.source,
                    submitted_by=submitted_by,
                    status=status,
                    reviewed_by="guard:" + ",".join(flags) if flags else None,
                    reviewed_at=datetime.now(UTC) if flags else None,
                )
                .on_conflict_do_nothing(index_elements=["example_id"])
                .returning(training_examples.c.example_id)  # no row back: it was there already
            )
            if conn.execute(stmt).first() is not None:
                counts[status] += 1
            else:
                counts["duplicate"] += 1
    return counts


def proposals_from_traffic(
    engine: sa.Engine, request_ids: Sequence[str]
) -> tuple[list[Proposal], list[str]]:
    """Logged conversations as proposals; the second list names requests that cannot be used
    (not found, hashed by the privacy setting, blocked or failed)."""
    t = traffic_log
    with engine.connect() as conn:
        rows = {
            r.request_id: r
            for r in conn.execute(
                sa.select(t.c.request_id, t.c.prompt, t.c.answer, t.c.status, t.c.guard).where(
                    t.c.request_id.in_(list(request_ids))
                )
            )
        }
    out, unusable = [], []
    for rid in request_ids:
        r = rows.get(rid)
        if r is None or not r.prompt or not r.answer or r.status != 200 or r.guard == "blocked":
            unusable.append(rid)
        else:
            out.append(Proposal(r.prompt, r.answer, f"traffic:{rid}"))
    return out, unusable


def review(engine: sa.Engine, ids: Sequence[str], *, approve: bool, reviewer: str) -> int:
    """Approve or reject pending examples. The reviewer must be named and must not be the one
    who submitted them. Returns how many changed."""
    if not reviewer.strip():
        raise ReviewError("say who reviews (reviewer)")
    t = training_examples
    with engine.begin() as conn:
        found = {
            r.example_id: r
            for r in conn.execute(
                sa.select(t.c.example_id, t.c.status, t.c.submitted_by).where(
                    t.c.example_id.in_(list(ids))
                )
            )
        }
        missing = sorted(set(ids) - found.keys())
        if missing:
            raise ReviewError(f"no such example: {', '.join(missing)}")
        own = sorted(i for i, r in found.items() if r.submitted_by == reviewer)
        if own:
            raise ReviewError(
                f"{reviewer} submitted {', '.join(own)}: someone else must review them"
            )
        result = conn.execute(
            sa.update(t)
            .where(t.c.example_id.in_(list(ids)), t.c.status == "pending")
            .values(
                status="approved" if approve else "rejected",
                reviewed_by=reviewer,
                reviewed_at=datetime.now(UTC),
            )
        )
        return int(result.rowcount)


def list_examples(engine: sa.Engine, status: str | None = None) -> list[dict[str, Any]]:
    if status is not None and status not in STATUSES:
        raise ReviewError(f"status must be one of {STATUSES}, got {status!r}")
    t = training_examples
    q = sa.select(t).order_by(t.c.created_at, t.c.example_id)
    if status is not None:
        q = q.where(t.c.status == status)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def approved_examples(engine: sa.Engine) -> list[dict[str, Any]]:
    """The only way user data reaches a training set: approved rows as SFT rows."""
    return [
        {
            "instruction": r["prompt"],
            "response": r["answer"],
            "source": r["source"],
            "example_id": r["example_id"],
            "reviewed_by": r["reviewed_by"],
        }
        for r in list_examples(engine, "approved")
    ]


def count_approved(engine: sa.Engine) -> int:
    t = training_examples
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.status == "approved")
            ).scalar_one()
        )
