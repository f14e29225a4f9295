"""Served traces' cost on request latency: the same Bento with tracing off
(REFINERY_TRACE_SAMPLE=0) and on (1.0: every generated answer written as an MLflow trace, with
its spans, by the service's writer thread into the home's MLflow store).

Every request is a chat completion of a new prompt (so each one is generated and, when on,
traced) with 4 new tokens at most, where the writer's share of the time is largest. Server
starts move throughput on this 2-core machine, so the modes alternate over fresh servers (off,
on, on, off) and the table shows medians. The load comes from asyncio clients in this process
(httpx), the same for both modes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from benchmarks.common import fresh_home, write_table

CLIENTS = 16
SECONDS = 15.0  # of load per server
ORDER = ["off", "on", "on", "off"]


async def _load(url: str, tag: str, seconds: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            n = next(counter)
            body = {"messages": [{"role": "user", "content": f"{tag} {n}: name a bee product."}],
                    "max_tokens": 4}  # fmt: skip
            t0 = time.perf_counter()
            resp = await http.post(url + "/v1/chat/completions", json=body)
            if resp.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    took = time.perf_counter() - t0
    ordered = sorted(latencies)
    return {
        "rps": len(latencies) / took,
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "errors": errors,
        "answers": len(latencies),
    }


def _traces(tracking_uri: str) -> int:
    from refinery.core.tracking import client_for

    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name("refinery-served")
    if exp is None:
        return 0
    total, token = 0, None
    while True:
        page = client.search_traces([exp.experiment_id], max_results=500, page_token=token,
                                    include_spans=False)  # fmt: skip
        total += len(page)
        token = page.token
        if not token:
            return total


def main() -> None:
    from benchmarks.serving import champion_bento, serve
    from refinery.core.stores import prepare_mlflow

    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with fresh_home("traces") as settings:
        tag, _, _, env = champion_bento(settings)
        uri = prepare_mlflow(settings)
        for n, mode in enumerate(ORDER):
            sample = "1" if mode == "on" else "0"
            with serve(tag, {**env, "REFINERY_TRACE_SAMPLE": sample}) as url:
                asyncio.run(_load(url, f"warm {n}", 3.0))
                result = asyncio.run(_load(url, f"round {n} ({mode})", SECONDS))
            runs[mode].append(result)
            print(n, mode, result, flush=True)
        written = _traces(uri)

    def med(mode: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[mode])

    rows = [
        [
            "on (sample 1.0)" if mode == "on" else "off (sample 0)",
            f"{med(mode, 'rps'):.1f}",
            f"{med(mode, 'p50') * 1000:.0f}",
            f"{med(mode, 'p99') * 1000:.0f}",
            " / ".join(f"{r['p50'] * 1000:.0f}" for r in runs[mode]),
            sum(r["answers"] for r in runs[mode]),
            sum(r["errors"] for r in runs[mode]),
        ]
        for mode in ("off", "on")
    ]

    def overhead(field: str) -> str:
        return f"{med('on', field) / med('off', field) - 1:+.1%}"

    answered_on = sum(r["answers"] for r in runs["on"])
    notes = f"""
Overhead (median on / median off − 1): throughput **{overhead("rps")}**, p50
**{overhead("p50")}**, p99 **{overhead("p99")}**. The "on" servers answered {answered_on}
measured requests (plus their warm-ups); the store holds {written} served traces at the end,
written by the services' writer threads. The spread between servers of the same mode (the
p50 column of each run) is the noise floor.
"""
    write_table(
        "traces",
        f"Served traces' overhead at {CLIENTS} concurrent clients",
        __doc__ or "",
        ["tracing", "requests/s", "p50 ms", "p99 ms", "p50 per server", "answers", "errors"],
        rows,
        notes=notes,
    )
