"""The capacity plan of docs/deploy.md, computed from deploy/capacity.yaml (measured figures per
replica, the traffic mix, prices). ``python -m serving.api.capacity --write`` rewrites the
generated part of docs/deploy.md; a test checks that the two agree.

The model is deliberately simple. Each service runs at ``utilization`` of the throughput one
replica reached in the benchmark, so replicas = ceil(load / (rps x utilization)). The entry
service also holds every request until its model answers, so it needs enough replicas for the
requests in flight (Little's law: rate x median latency) at ``entry_inflight_target`` per
replica. Every chat request is screened by the embedding service (the guard), so the embedder's
load is the embedding requests plus the chat requests; cache hits stop at the entry service.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinery.settings import REPO_ROOT

INPUTS = REPO_ROOT / "deploy" / "capacity.yaml"
DOC = REPO_ROOT / "docs" / "deploy.md"
BEGIN, END = "<!-- capacity:begin (generated) -->", "<!-- capacity:end -->"


@dataclass(frozen=True)
class Row:
    service: str
    load_rps: float
    per_replica_rps: float | None
    replicas: int | None
    cores: int | None
    note: str


def load_inputs(path: Path = INPUTS) -> dict[str, Any]:
    import yaml

    inputs = yaml.safe_load(path.read_text())
    if abs(sum(inputs["mix"].values()) - 1) > 1e-9:
        raise ValueError(f"the traffic mix in {path} must add up to 1: {inputs['mix']}")
    return inputs


def _replicas(load: float, rps: float, utilization: float) -> int:
    return max(1, math.ceil(load / (rps * utilization) - 1e-9))


def plan(inputs: dict[str, Any]) -> dict[str, Any]:
    total, mix, rep, util = (
        inputs["target_rps"],
        inputs["mix"],
        inputs["replica"],
        inputs["utilization"],
    )
    price = inputs["price"]
    load = {k: total * share for k, share in mix.items()}
    inflight = (
        load["cache_hit"] * rep["entry"]["p50_ms"]
        + load["embeddings"] * rep["embedder"]["p50_ms"]
        + load["chat"] * rep["chat_cpu"]["p50_ms"]
    ) / 1000
    entry_by_rps = _replicas(total, rep["entry"]["rps"], util)
    entry_by_inflight = math.ceil(inflight / inputs["entry_inflight_target"])
    entry = max(entry_by_rps, entry_by_inflight)
    embed_load = load["embeddings"] + load["chat"]
    embedder = _replicas(embed_load, rep["embedder"]["rps"], util)
    chat = _replicas(load["chat"], rep["chat_cpu"]["rps"], util)
    cores = {
        "entry": entry * rep["entry"]["cores"],
        "embedder": embedder * rep["embedder"]["cores"],
        "chat": chat * rep["chat_cpu"]["cores"],
    }
    cpu_hour = sum(cores.values()) * price["cpu_core_hour"]
    # GPU: the chat model on one GPU node; the entry and embedding services as on CPU, the
    # entry sized by throughput (its requests in flight shrink with the GPU's latency).
    gpu_entry = entry_by_rps
    gpu_cores = (gpu_entry * rep["entry"]["cores"]) + cores["embedder"]
    gpu_hour = gpu_cores * price["cpu_core_hour"] + price["gpu_node_hour"]
    # The chat latency at which the entry's in-flight bound stays under its throughput bound.
    room = gpu_entry * inputs["entry_inflight_target"] * 1000 - (
        load["cache_hit"] * rep["entry"]["p50_ms"] + load["embeddings"] * rep["embedder"]["p50_ms"]
    )
    return {
        "load": load,
        "inflight": inflight,
        "cpu": {
            "rows": [
                Row(
                    "entry (`refinery`)",
                    total,
                    rep["entry"]["rps"],
                    entry,
                    cores["entry"],
                    f"{entry_by_rps} for throughput, {entry_by_inflight} for "
                    f"{inflight:,.0f} requests in flight",
                ),
                Row(
                    "embedder (`refinery-embedder`)",
                    embed_load,
                    rep["embedder"]["rps"],
                    embedder,
                    cores["embedder"],
                    "embedding requests + the guard's screen of each chat request",
                ),
                Row(
                    "chat (`refinery-chat`), CPU",
                    load["chat"],
                    rep["chat_cpu"]["rps"],
                    chat,
                    cores["chat"],
                    f"max_tokens 16; p99 {rep['chat_cpu']['p99_ms'] / 1000:.1f} s",
                ),
            ],
            "cores": sum(cores.values()),
            "usd_per_hour": cpu_hour,
            "usd_per_request": cpu_hour / 3600 / total,
        },
        "gpu": {
            "rows": [
                Row(
                    "entry (`refinery`)",
                    total,
                    rep["entry"]["rps"],
                    gpu_entry,
                    gpu_entry * rep["entry"]["cores"],
                    f"enough while chat's median latency stays under {room / load['chat'] / 1000:.1f} s",
                ),
                Row(
                    "embedder (`refinery-embedder`)",
                    embed_load,
                    rep["embedder"]["rps"],
                    embedder,
                    cores["embedder"],
                    "as on CPU",
                ),
                Row(
                    "chat (`refinery-chat`), one GPU",
                    load["chat"],
                    None,
                    1,
                    None,
                    f"must sustain {load['chat'] / util:,.0f} requests/s "
                    f"({load['chat'] / util * 16:,.0f} generated tokens/s): not measured here",
                ),
            ],
            "cores": gpu_cores,
            "usd_per_hour": gpu_hour,
            "usd_per_request": gpu_hour / 3600 / total,
        },
    }


def render(inputs: dict[str, Any]) -> str:
    p = plan(inputs)
    mix = ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in inputs["mix"].items())
    lines = [
        BEGIN,
        f"Target: **{inputs['target_rps']:,} requests/s**, mix: {mix}. Replicas at "
        f"{inputs['utilization']:.0%} of their measured throughput (the HPAs' CPU target). "
        f"Measured per replica: {inputs['source']}.",
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
            per = f"{r.per_replica_rps:g}" if r.per_replica_rps else "–"
            cores = str(r.cores) if r.cores is not None else "–"
            lines.append(
                f"| {r.service} | {r.load_rps:,.0f} | {per} | {r.replicas} | {cores} | {r.note} |"
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
