"""Served traces' cost on request latency: the same Bento with tracing off
(REFINERY_TRACE_SAMPLE=0), at the default share (0.1) and on every answer (1.0: each generated
answer written as an MLflow trace, with its spans, by the service's writer thread into the
home's MLflow store, a local SQLite one, so the store's own work runs in the service's process).

Every request is a chat completion of a new prompt (so each one is generated and, when on,
traced) with 4 new tokens at most, where the writer's share of the time is largest. Server
starts move throughput on this 2-core machine, so the modes alternate over fresh servers (0,
0.1, 1, 1, 0.1, 0) and the table shows medians. The load comes from asyncio clients in this process
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
ORDER = ["0", "0.1", "1", "1", "0.1", "0"]


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
            try:
                resp = await http.post(url + "/v1/chat/completions", json=body)
            except httpx.HTTPError:  # a timeout counts as an error, the run goes on
                errors += 1
                continue
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

    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in ORDER}
    with fresh_home("traces") as settings:
        tag, _, _, env = champion_bento(settings)
        uri = prepare_mlflow(settings)
        for n, mode in enumerate(ORDER):
            with serve(tag, {**env, "REFINERY_TRACE_SAMPLE": mode}) as url:
                asyncio.run(_load(url, f"warm {n}", 3.0))
                result = asyncio.run(_load(url, f"round {n} ({mode})", SECONDS))
            runs[mode].append(result)
            print(n, mode, result, flush=True)
        written = _traces(uri)

    def med(mode: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[mode])

    rows = [
        [
            f"sample {mode}",
            f"{med(mode, 'rps'):.1f}",
            f"{med(mode, 'p50') * 1000:.0f}",
            f"{med(mode, 'p99') * 1000:.0f}",
            " / ".join(f"{r['p50'] * 1000:.0f}" for r in runs[mode]),
            sum(r["answers"] for r in runs[mode]),
            sum(r["errors"] for r in runs[mode]),
        ]
        for mode in dict.fromkeys(ORDER)
    ]

    def overhead(mode: str, field: str) -> str:
        return f"{med(mode, field) / med('0', field) - 1:+.1%}"

    lines = [
        f"- sample {mode} against 0: throughput **{overhead(mode, 'rps')}**, p50 "
        f"**{overhead(mode, 'p50')}**, p99 **{overhead(mode, 'p99')}**"
        for mode in dict.fromkeys(ORDER)
        if mode != "0"
    ]
    notes = (
        "\n".join(lines)
        + f"""

The store holds {written} served traces at the end, written by the services' writer threads
(measured requests and warm-ups). The spread between servers of the same mode (the p50 column
of each run) is the noise floor.
"""
    )
    write_table(
        "traces",
        f"Served traces' overhead at {CLIENTS} concurrent clients",
        __doc__ or "",
        ["tracing", "requests/s", "p50 ms", "p99 ms", "p50 per server", "answers", "errors"],
        rows,
        notes=notes,
    )
