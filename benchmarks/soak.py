"""Soak: mixed traffic at 80% of the measured maximum for SOAK_S seconds (default 600).

Against `bentoml serve` of the packaged SmolLM2 champion (the serving benchmark's set-up: the
sample corpus ingested, OpenVINO engine), one request mix throughout: chat with unique prompts
(24 tokens), RAG with unique questions, one-sentence embeddings, and repeated chat requests
that the cache answers. First the maximum: the mix closed-loop at 32 clients for MAX_S
seconds. Then the soak: the same mix at 80% of that rate, open loop (arrivals on a clock, not
waiting for answers). Every 10 s the service's processes are sampled: resident memory (PSS,
summed over the process tree), open files and TCP connections. After WARMUP_S seconds the
first sample is the baseline for growth. Checked: no error, no request over 10x its
endpoint's p50, memory growth under 5%, no growth of open files or connections.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from benchmarks.chatload import chat_prompts
from benchmarks.common import fresh_home, percentile, write_table
from benchmarks.serving import MODEL, champion_bento, ingest, serve

SOAK_S = float(os.environ.get("REFINERY_SOAK_S", 600))
MAX_S = 60.0
WARMUP_S = 60.0
SAMPLE_S = 10.0
LOAD = 0.8
MIX = {"chat": 0.15, "rag": 0.10, "embeddings": 0.45, "cache_hit": 0.30}
TOKENS = 24
SENTENCE = "Bee fact {n}: a colony keeps its brood near 35 degrees."


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: list[str] = field(default_factory=list)  # the first few error bodies

    def ok(self) -> int:
        return sum(len(v) for v in self.latencies.values())


def request(kind: str, n: int, prompts: list[str]) -> tuple[str, dict[str, Any]]:
    if kind == "chat":
        text = f"{prompts[n % len(prompts)]} (#{n})"
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        return "/v1/chat/completions", {**body, "max_tokens": TOKENS}
    if kind == "cache_hit":
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a bee product."}]}
        return "/v1/chat/completions", {**body, "max_tokens": TOKENS}
    if kind == "rag":
        return "/rag", {"question": f"How do I count varroa mites? (#{n})", "k": 2,
                        "max_tokens": TOKENS}  # fmt: skip
    return "/v1/embeddings", {"input": SENTENCE.format(n=n)}


async def send(client: httpx.AsyncClient, kind: str, n: int, prompts: list[str], tally: Tally):
    path, body = request(kind, n, prompts)
    t0 = time.perf_counter()
    try:
        r = await client.post(path, json=body)
        ok = r.status_code == 200
        detail = f"{kind} HTTP {r.status_code}: {r.text[:160]}"
    except httpx.HTTPError as err:
        ok, detail = False, f"{kind} {type(err).__name__}: {err}"
    if ok:
        tally.latencies[kind].append(time.perf_counter() - t0)
    else:
        tally.errors[kind] += 1
        if len(tally.samples) < 5:
            tally.samples.append(detail)


def kinds(seed: int) -> Any:
    rng = random.Random(seed)
    names, weights = list(MIX), list(MIX.values())
    while True:
        yield rng.choices(names, weights)[0]


async def closed_loop(url: str, prompts: list[str], seconds: float, clients: int = 32) -> float:
    """Requests/s of the mix with ``clients`` each sending the next request when one ends."""
    tally, counter, mix = Tally(), itertools.count(), kinds(1)
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker() -> None:
            while time.monotonic() < end:
                await send(client, next(mix), next(counter), prompts, tally)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return tally.ok() / (time.monotonic() - t0)


def service_tree(port: int) -> list[psutil.Process]:
    """The process listening on ``port``, its parents up to `bentoml serve`, and all children."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            top = psutil.Process(conn.pid)
            while (parent := top.parent()) and "bentoml" in " ".join(parent.cmdline()):
                top = parent
            return [top, *top.children(recursive=True)]
    raise RuntimeError(f"nothing listens on port {port}")


def sample(port: int) -> dict[str, float]:
    pss = files = conns = 0
    for proc in service_tree(port):
        try:
            pss += proc.memory_full_info().pss
            files += proc.num_fds()
            conns += len(proc.net_connections("tcp"))
        except psutil.NoSuchProcess:
            continue
    return {"t": time.monotonic(), "pss_mib": pss / 2**20, "fds": files, "conns": conns}


async def open_loop(url: str, prompts: list[str], rate: float, seconds: float, port: int):
    tally, counter, mix = Tally(), itertools.count(10_000), kinds(2)
    samples: list[dict[str, float]] = []
    rng = random.Random(3)
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=httpx.Limits(max_connections=256)
    ) as client:
        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        next_at, next_sample = start, start
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                samples.append({**sample(port), "t": now - start})
                next_sample += SAMPLE_S
                print(f"soak {now - start:5.0f} s: {samples[-1]}, ok {tally.ok()}, "
                      f"errors {dict(tally.errors)}", flush=True)  # fmt: skip
            if now >= next_at:
                task = asyncio.create_task(send(client, next(mix), next(counter), prompts, tally))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += rng.expovariate(rate)  # Poisson arrivals
            await asyncio.sleep(max(0.0, min(next_at, next_sample) - time.monotonic()))
        await asyncio.gather(*tasks)
        samples.append({**sample(port), "t": time.monotonic() - start})
    return tally, samples


def main() -> None:
    prompts = chat_prompts()
    with fresh_home("soak") as settings:
        ingest(settings)
        tag, _base, _openvino, env = champion_bento(settings)
        with serve(tag, env) as url:
            port = int(url.rsplit(":", 1)[1])
            httpx.post(url + "/v1/chat/completions", json=request("cache_hit", 0, prompts)[1],
                       timeout=120)  # fmt: skip
            maximum = asyncio.run(closed_loop(url, prompts, MAX_S))
            rate = LOAD * maximum
            print(f"maximum {maximum:.1f} requests/s; soaking at {rate:.1f}", flush=True)
            tally, samples = asyncio.run(open_loop(url, prompts, rate, SOAK_S, port))
    report(maximum, rate, tally, samples)


def report(maximum: float, rate: float, tally: Tally, samples: list[dict[str, float]]) -> None:
    base = next((s for s in samples if s["t"] >= WARMUP_S), samples[0])
    last = samples[-1]
    rows = []
    worst_ratio = 0.0
    for kind in MIX:
        lat = tally.latencies.get(kind, [])
        p50 = percentile(lat, 0.5)
        ratio = max(lat) / p50 if lat else float("nan")
        worst_ratio = max(worst_ratio, ratio if lat else 0.0)
        rows.append([
            kind, str(len(lat)), str(tally.errors.get(kind, 0)), f"{p50 * 1000:.0f}",
            f"{percentile(lat, 0.99) * 1000:.0f}", f"{max(lat, default=0) * 1000:.0f}",
            f"{ratio:.1f}×",
        ])  # fmt: skip
    growth = (last["pss_mib"] - base["pss_mib"]) / base["pss_mib"]
    errors = sum(tally.errors.values())
    verdict = {
        "no error": errors == 0,
        "no request over 10× its p50": worst_ratio <= 10,
        "memory growth < 5% after warm-up": growth < 0.05,
        "no growth of open files": last["fds"] <= base["fds"],
        "no growth of connections": last["conns"] <= base["conns"] + 2,
    }
    lines = [
        f"Maximum of the mix (closed loop, 32 clients, {MAX_S:.0f} s): {maximum:.1f} requests/s; "
        f"soak at {LOAD:.0%} of it: {rate:.1f} requests/s, open loop, for {SOAK_S:.0f} s.",
        f"Mix: {', '.join(f'{k} {v:.0%}' for k, v in MIX.items())}; chat and RAG answers at most "
        f"{TOKENS} tokens.",
        f"Service processes (PSS, summed) after {WARMUP_S:.0f} s warm-up: {base['pss_mib']:.0f} MiB"
        f" → {last['pss_mib']:.0f} MiB at the end ({growth:+.1%}); open files {base['fds']:.0f} → "
        f"{last['fds']:.0f}; TCP connections {base['conns']:.0f} → {last['conns']:.0f}.",
        "Checks: " + ", ".join(f"{k}: {'yes' if v else '**no**'}" for k, v in verdict.items()),
    ]
    if tally.samples:
        lines.append("First errors: " + "; ".join(tally.samples))
    lines.append("Memory over time (MiB): " + ", ".join(
        f"{s['t']:.0f} s {s['pss_mib']:.0f}" for s in samples[:: max(1, len(samples) // 12)]
    ))  # fmt: skip
    write_table(
        "soak",
        "Soak: mixed traffic at 80% of the maximum",
        __doc__ or "",
        ["endpoint", "answered", "errors", "p50 ms", "p99 ms", "max ms", "max / p50"],
        rows,
        "\n\n".join(lines),
    )
