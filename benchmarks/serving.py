"""The served Bento under 32 concurrent clients: adaptive batching against the same service
without batching (REFINERY_BATCHING=off) and against the bare models in-process, in one run;
then cache hits (the guard is measured in benchmarks/guard.py).

The champion is the packaged SmolLM2-135M-Instruct (what serving sees is the same model size
whatever the fine-tune did). Each request is unique (a counter in the text), so nothing is
served from the cache until the cache section, which repeats one request.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import fresh_home, percentile, write_table
from refinery.processes import stop_tree
from refinery.settings import OFFLINE_ENV

CLIENTS = 32
EMBED_REQUESTS = 640
CHAT_REQUESTS = 96
CHAT_TOKENS = 16
CACHE_REQUESTS = 2000
MODEL = "bench-chat"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(tag: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", tag, "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=3).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_tree(proc)
    raise TimeoutError("bentoml serve did not become ready")


async def _load(url: str, path: str, bodies: list[dict]) -> dict[str, float]:
    """Send every body with CLIENTS requests in flight; latency per request, status counts."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                resp = await client.post(path, json=body)
                latencies.append(time.perf_counter() - t0)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
        wall = time.perf_counter() - t0
    errors = sum(n for s, n in statuses.items() if s >= 500)
    return {
        "rps": len(bodies) / wall,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "5xx": errors,
        "n": len(bodies),
    }


def _embed_bodies(tag: str) -> list[dict]:
    return [
        {
            "input": f"Request {i} ({tag}): how warm do bees keep their brood?",
            "encoding_format": "base64",  # what the openai client sends
        }
        for i in range(EMBED_REQUESTS)
    ]


def _chat_bodies(tag: str) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"Question {i} ({tag}): name a bee product."}],
         "max_tokens": CHAT_TOKENS}
        for i in range(CHAT_REQUESTS)
    ]  # fmt: skip


def _in_process(model_dir: Path) -> dict[str, dict[str, float]]:
    """The bare models in this process: the embedding limit at batch 32, and generation one
    prompt at a time and 16 at a time."""
    from serving.corpus.embedding import Embedder
    from serving.runtime.generation import Generator

    embedder = Embedder()
    texts = [b["input"] for b in _embed_bodies("inproc")]
    embedder.encode(texts[:32])
    t0 = time.perf_counter()
    embedder.encode(texts, batch_size=32)
    embed_rps = len(texts) / (time.perf_counter() - t0)
    gen = Generator(model_dir)
    prompts = [b["messages"] for b in _chat_bodies("inproc")][:32]
    gen.generate(prompts[:1], 2)
    t0 = time.perf_counter()
    for p in prompts[:16]:
        gen.generate([p], CHAT_TOKENS)
    seq_rps = 16 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, 32, 16):
        gen.generate(prompts[i : i + 16], CHAT_TOKENS)
    batch_rps = 32 / (time.perf_counter() - t0)
    return {
        "embed": {"rps": embed_rps},
        "chat_seq": {"rps": seq_rps},
        "chat_b16": {"rps": batch_rps},
    }


def _fmt(r: dict[str, float]) -> list[str]:
    if "p50" not in r:
        return [f"{r['rps']:.1f}", "–", "–", "–"]
    return [
        f"{r['rps']:.1f}",
        f"{r['p50'] * 1000:.0f}",
        f"{r['p99'] * 1000:.0f}",
        str(int(r["5xx"])),
    ]


def champion_bento(settings: Any) -> tuple[str, Path, dict[str, str]]:
    """The packaged SmolLM2 registered as the champion of a fresh home and built as a Bento:
    its tag, the model folder, and the environment to serve it in (open, in-process cache,
    pinned: no keys, no Redis, no alias following)."""
    from refinery.stores import database_url, environment, prepare_mlflow
    from serving.api.bento import build_bento
    from training.base_model import resolve_base_model
    from training.registry import register_folder

    uri = prepare_mlflow(settings)
    base = resolve_base_model(None, settings.models_dir)
    register_folder(
        uri, MODEL, Path(base.path), alias="champion", artifact_root=settings.mlflow_artifacts_dir
    )
    built = build_bento(settings, uri, MODEL, "champion")
    env = {**os.environ, **OFFLINE_ENV, **environment(settings, database_url(settings))}
    for key in ("REFINERY_API_KEYS", "REFINERY_REDIS_URL", "REFINERY_FOLLOW_ALIAS"):
        env.pop(key, None)
    return built.tag, Path(base.path), env


def main() -> None:
    with fresh_home("serving") as settings:
        tag, model_dir, env = champion_bento(settings)
        results: dict[str, dict[str, float]] = {}
        for mode in ("on", "off"):
            proc, url = _serve(tag, {**env, "REFINERY_BATCHING": mode})
            try:
                for label, path, bodies in (
                    ("embed", "/v1/embeddings", _embed_bodies),
                    ("chat", "/v1/chat/completions", _chat_bodies),
                ):
                    asyncio.run(_load(url, path, bodies(f"warm-{mode}")[:CLIENTS]))
                    results[f"{label}_{mode}"] = asyncio.run(_load(url, path, bodies(mode)))
                    print(label, mode, results[f"{label}_{mode}"], flush=True)
                if mode == "on":
                    same = {"messages": [{"role": "user", "content": "Name a bee product."}],
                            "max_tokens": CHAT_TOKENS}  # fmt: skip
                    asyncio.run(_load(url, "/v1/chat/completions", [same]))
                    results["cache"] = asyncio.run(
                        _load(url, "/v1/chat/completions", [same] * CACHE_REQUESTS)
                    )
                    print("cache", results["cache"], flush=True)
            finally:
                stop_tree(proc)
        inproc = _in_process(model_dir)

    r = results
    rows = [
        ["embeddings, batched service", "/v1/embeddings", *_fmt(r["embed_on"])],
        ["embeddings, unbatched service", "/v1/embeddings", *_fmt(r["embed_off"])],
        ["embeddings, bare model in-process (batch 32)", "–", *_fmt(inproc["embed"])],
        ["chat, batched service", "/v1/chat/completions", *_fmt(r["chat_on"])],
        ["chat, unbatched service", "/v1/chat/completions", *_fmt(r["chat_off"])],
        ["chat, bare model in-process, one at a time", "–", *_fmt(inproc["chat_seq"])],
        ["chat, bare model in-process, batches of 16", "–", *_fmt(inproc["chat_b16"])],
        ["cache hits (one repeated chat request)", "/v1/chat/completions", *_fmt(r["cache"])],
    ]
    e_ratio = r["embed_on"]["rps"] / r["embed_off"]["rps"]
    e_limit = r["embed_on"]["rps"] / inproc["embed"]["rps"]
    c_ratio = r["chat_on"]["rps"] / r["chat_off"]["rps"]
    c_seq = r["chat_on"]["rps"] / inproc["chat_seq"]["rps"]
    notes = f"""
Ratios in this run: embeddings batched / unbatched **{e_ratio:.2f}×** (target ≥ 3×), batched /
in-process limit **{e_limit:.2f}×** (target ≥ 0.8×); chat batched / unbatched service
**{c_ratio:.2f}×**, batched / in-process one-at-a-time **{c_seq:.2f}×** (target ≥ 4×).
p99 target < 2000 ms; cache target ≥ 1000 requests/s with p99 < 50 ms. The load generator
(Python, httpx, asyncio) shares the 2 cores with the three service processes.

The prompt-injection guard has its own benchmark: `benchmarks/results/guard.md`.
"""
    write_table(
        "serving",
        "Serving: adaptive batching, cache and guard",
        f"""
{CLIENTS} concurrent clients; embeddings: {EMBED_REQUESTS} requests of one short text each;
chat: {CHAT_REQUESTS} requests, greedy, max_tokens {CHAT_TOKENS}, SmolLM2-135M-Instruct fp32.
Service limits: embeddings max batch 32, chat max batch 16 (serving/api/service.py).
""",
        ["configuration", "endpoint", "requests/s", "p50 ms", "p99 ms", "5xx"],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
