"""The capacity plan of docs/deploy.md, computed from deploy/capacity.yaml (measured figures per
replica, the traffic mix, prices). ``python -m serving.capacity --write`` rewrites the
generated part of docs/deploy.md; a test checks that the two agree.

The model is deliberately simple; two services share the work:

- The entry service (``refinery``) answers cache hits and embeddings itself and screens every
  chat request with the guard, which embeds its user turn, so a chat request costs the entry
  about one embedding request. Its replicas run at ``utilization`` of what one replica measured
  (the CPU target of its HPA): replicas = ceil(sum(load / rps) / utilization). It also holds
  every chat request until the chat service answers, so it needs enough replicas for the
  requests in flight (Little's law: chat rate x median latency) at ``entry_inflight_target``
  per replica.
- The chat service (``refinery-chat``) scales on requests in flight, ``chat_inflight_target``
  per replica (a full running batch), which is the load the benchmark measured it under
  (``clients``): at its target a replica answers what it answered there, so replicas =
  ceil(chat load / measured requests/s).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinery.core.settings import REPO_ROOT

INPUTS = REPO_ROOT / "deploy" / "capacity.yaml"
DOC = REPO_ROOT / "docs" / "deploy.md"
BEGIN, END = "<!-- capacity:begin (generated) -->", "<!-- capacity:end -->"


@dataclass(frozen=True)
class Row:
    service: str
    load_rps: float
    per_replica_rps: str  # what one replica answers, as measured ("–": not measured)
    replicas: int
    cores: int | None
    note: str


def load_inputs(path: Path = INPUTS) -> dict[str, Any]:
    import yaml

    inputs = yaml.safe_load(path.read_text())
    if abs(sum(inputs["mix"].values()) - 1) > 1e-9:
        raise ValueError(f"the traffic mix in {path} must add up to 1: {inputs['mix']}")
    chat = inputs["replica"]["chat_cpu"]
    if chat["clients"] != inputs["chat_inflight_target"]:
        raise ValueError(
            f"{path}: the chat figures must be measured at the chat HPA's target "
            f"({inputs['chat_inflight_target']} requests in flight), not {chat['clients']} clients"
        )
    return inputs


def _ceil(x: float) -> int:
    return max(1, math.ceil(x - 1e-9))


@dataclass(frozen=True)
class _Sizing:
    """Replica counts of both services, and the chat requests in flight they hold."""

    entry_by_cpu: int
    entry_by_inflight: int
    inflight: float
    n_entry: int
    n_chat: int


def plan(inputs: dict[str, Any]) -> dict[str, Any]:
    total, mix = inputs["target_rps"], inputs["mix"]
    load = {k: total * share for k, share in mix.items()}
    sizing = _size_replicas(inputs, load)
    return {
        "load": load,
        "inflight": sizing.inflight,
        "cpu": _cpu_plan(inputs, load, sizing),
        "gpu": _gpu_plan(inputs, load, sizing),
    }


def _size_replicas(inputs: dict[str, Any], load: dict[str, float]) -> _Sizing:
    util = inputs["utilization"]
    entry, chat = inputs["replica"]["entry"], inputs["replica"]["chat_cpu"]
    # Replica-seconds of entry work per second: a chat request costs it one embedding (the guard).
    screened = load["embeddings"] + load["chat"]
    entry_work = load["cache_hit"] / entry["cache_hit_rps"] + screened / entry["embeddings_rps"]
    entry_by_cpu = _ceil(entry_work / util)
    inflight = load["chat"] * chat["p50_ms"] / 1000
    entry_by_inflight = _ceil(inflight / inputs["entry_inflight_target"])
    return _Sizing(
        entry_by_cpu=entry_by_cpu,
        entry_by_inflight=entry_by_inflight,
        inflight=inflight,
        n_entry=max(entry_by_cpu, entry_by_inflight),
        n_chat=_ceil(load["chat"] / chat["rps"]),
    )


def _entry_capacity(entry: dict[str, Any]) -> str:
    return f"{entry['cache_hit_rps']:g} cache hits/s or {entry['embeddings_rps']:g} embeddings/s"


def _cpu_plan(inputs: dict[str, Any], load: dict[str, float], s: _Sizing) -> dict[str, Any]:
    total, price = inputs["target_rps"], inputs["price"]
    entry, chat = inputs["replica"]["entry"], inputs["replica"]["chat_cpu"]
    cpu_cores = s.n_entry * entry["cores"] + s.n_chat * chat["cores"]
    cpu_hour = cpu_cores * price["cpu_core_hour"]
    return {
        "rows": [
            Row(
                "entry (`refinery`)",
                total,
                _entry_capacity(entry),
                s.n_entry,
                s.n_entry * entry["cores"],
                f"{s.entry_by_cpu} for CPU (cache hits, embeddings, the guard's screen of each "
                f"chat request), {s.entry_by_inflight} for {s.inflight:,.0f} chat requests in "
                "flight",
            ),
            Row(
                "chat (`refinery-chat`), CPU",
                load["chat"],
                f"{chat['rps']:g}",
                s.n_chat,
                s.n_chat * chat["cores"],
                f"at {chat['clients']} requests in flight per replica (its HPA target): "
                f"{chat['tokens_per_s']:g} tokens/s, p50 {chat['p50_ms'] / 1000:.1f} s, "
                f"p99 {chat['p99_ms'] / 1000:.1f} s; {chat['tokens_per_answer']:g} tokens "
                "per answer",
            ),
        ],
        "cores": cpu_cores,
        "usd_per_hour": cpu_hour,
        "usd_per_request": cpu_hour / 3600 / total,
    }


def _gpu_plan(inputs: dict[str, Any], load: dict[str, float], s: _Sizing) -> dict[str, Any]:
    total, price = inputs["target_rps"], inputs["price"]
    entry, chat = inputs["replica"]["entry"], inputs["replica"]["chat_cpu"]
    # GPU: the chat model on one GPU node; the entry as on CPU, sized by CPU (its requests in
    # flight shrink with the GPU's latency) while chat's median latency stays under `room`.
    gpu_cores = s.entry_by_cpu * entry["cores"]
    gpu_hour = gpu_cores * price["cpu_core_hour"] + price["gpu_node_hour"]
    room = s.entry_by_cpu * inputs["entry_inflight_target"] / load["chat"]
    tokens = load["chat"] * chat["tokens_per_answer"]
    return {
        "rows": [
            Row(
                "entry (`refinery`)",
                total,
                _entry_capacity(entry),
                s.entry_by_cpu,
                gpu_cores,
                f"enough while chat's median latency stays under {room:.1f} s",
            ),
            Row(
                "chat (`refinery-chat`), one GPU",
                load["chat"],
                "–",
                1,
                None,
                f"must sustain {load['chat']:,.0f} requests/s ({tokens:,.0f} generated "
                "tokens/s): not measured here",
            ),
        ],
        "cores": gpu_cores,
        "usd_per_hour": gpu_hour,
        "usd_per_request": gpu_hour / 3600 / total,
    }


def render(inputs: dict[str, Any]) -> str:
    p = plan(inputs)
    mix = ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in inputs["mix"].items())
    lines = [
        BEGIN,
        f"Target: **{inputs['target_rps']:,} requests/s**, mix: {mix}. Entry replicas at "
        f"{inputs['utilization']:.0%} of their measured throughput (their HPA's CPU target), chat "
        f"replicas at {inputs['chat_inflight_target']} requests in flight (theirs). Measured per "
        f"replica: {inputs['source']}.",
        "",
    ]
    for key, title in (("cpu", "CPU nodes only"), ("gpu", "chat on one GPU node")):
        s = p[key]
        lines += [
            f"**{title}**: {s['cores']} CPU cores"
            + (" + 1 GPU" if key == "gpu" else "")
            + f", ${s['usd_per_hour']:,.2f}/hour, **${s['usd_per_request']:.2e} per request**",
            "",
            "| service | load (req/s) | one replica (req/s) | replicas | cores | why |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            cores = str(r.cores) if r.cores is not None else "–"
            lines.append(
                f"| {r.service} | {r.load_rps:,.0f} | {r.per_replica_rps} | {r.replicas} "
                f"| {cores} | {r.note} |"
            )
        lines.append("")
    lines.append(
        f"Prices assumed: ${inputs['price']['cpu_core_hour']}/core-hour, "
        f"${inputs['price']['gpu_node_hour']}/GPU-node-hour."
    )
    lines.append(END)
    return "\n".join(lines)


def splice(doc: str, generated: str) -> str:
    head, sep, rest = doc.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"{DOC} has no {BEGIN} ... {END} section")
    return head + generated + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help="rewrite docs/deploy.md's section")
    args = parser.parse_args(argv)
    generated = render(load_inputs())
    if args.write:
        DOC.write_text(splice(DOC.read_text(), generated))
    else:
        print(generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
