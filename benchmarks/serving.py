"""Serving benchmark: the generation engine, the service around it, and two llama.cpp servers
on the same model, all measured in one run on this machine.

Chat: closed-loop clients (1, 8, 32) sending unique prompts (no cache can answer), greedy,
``max_tokens`` 32; output tokens/s counted from what each server reports it generated. Against:
- the bare engine in-process (OpenVINO continuous batching on the int8 export; an asyncio
  driver calling ``Engine.complete`` directly: no HTTP, no JSON);
- the service (``bentoml serve`` of the champion's Bento, the default engine);
- the service before the engine (``REFINERY_ENGINE=static``: fixed padded batches, fp32);
- llama.cpp's C++ ``llama-server`` (2 threads, 32 parallel slots) and llama-cpp-python's
  server (one sequence at a time; the better of 1 and 2 threads), both built by
  ``benchmarks/peers.py`` from the llama-cpp-python sdist, on the packaged Q4_1 GGUF.
Also: time to first token at 8 streaming clients; speculative decoding (prompt lookup) on the
RAG question set at 1 client, in-process, with and without, on the test split; cache hits and
embeddings at 32 connections with ``wrk`` (compiled, so the client leaves the cores to the
server); embeddings vs the bare model in-process, and whether the service's vectors are the
model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.chatload import ChatLoadResult, chat_prompts, run_chat_load, run_wrk
from benchmarks.common import WORK, fresh_home, machine, write_table
from refinery.core.processes import stop_tree
from refinery.core.settings import OFFLINE_ENV, REPO_ROOT

MODEL = "refinery-chat"
CLIENTS = (1, 8, 32)
TOKENS = 32
WRK_SECONDS = 15


def champion_bento(settings: Any) -> tuple[str, Path, Path, dict[str, str]]:
    """The packaged SmolLM2 (with its OpenVINO export) as the champion of a fresh home, built
    as a Bento: its tag, the weights, the export, and the environment to serve it in (open,
    in-process cache, pinned: no keys, no Redis, no alias following)."""
    from refinery.core.stores import database_url, environment, prepare_mlflow
    from serving.bento import build_bento
    from training.base_model import resolve_base_model
    from training.openvino_export import export_openvino
    from training.registry import register_folder

    uri = prepare_mlflow(settings)
    base = Path(resolve_base_model(None, settings.models_dir).path)
    openvino, _ = export_openvino(base, settings.models_dir / "openvino-int8")
    register_folder(
        uri, MODEL, base, alias="champion", artifact_root=settings.mlflow_artifacts_dir,
        extra_artifacts={"openvino": openvino},
    )  # fmt: skip
    built = build_bento(settings, uri, MODEL, "champion")
    env = {**os.environ, **OFFLINE_ENV, **environment(settings, database_url(settings))}
    for key in ("REFINERY_API_KEYS", "REFINERY_REDIS_URL", "REFINERY_FOLLOW_ALIAS"):
        env.pop(key, None)
    return built.tag, base, openvino, env


def ingest(settings: Any) -> None:
    """The sample corpus, for RAG (the speculative-decoding prompts and the service's /rag)."""
    from refinery.core.stores import make_engine
    from refinery.corpus.chunking import ChunkingConfig
    from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
    from refinery.retrieval.embedding import Embedder
    from refinery.retrieval.vectorstore import VectorStore

    store = VectorStore(make_engine(settings=settings, create_schema=True))
    embedder = Embedder()
    sync_documents(store, REPO_ROOT / "data" / "corpus")
    sync_chunks(store, make_chunker(ChunkingConfig(), embedder))
    sync_embeddings(store, embedder, batch_size=32)
    store.engine.dispose()


@contextlib.contextmanager
def serve(tag: str, env: dict[str, str]) -> Iterator[str]:
    from benchmarks.peers import free_port

    port = free_port()
    bentoml = str(Path(sys.executable).parent / "bentoml")
    log = WORK / f"serve-{port}.log"  # the service's own log, to read when a run goes wrong
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [bentoml, "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    print("service log:", log, flush=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=3).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}")
            time.sleep(1)
        else:
            raise TimeoutError("the service did not become ready in 300 s")
        yield url
    finally:
        stop_tree(proc)


def engine_load(engine: Any, prompts: list[str], clients: int, tag: str) -> ChatLoadResult:
    """The same closed loop as ``run_chat_load``, calling the engine in-process."""
    from refinery.generation.engine.base import SamplingParams

    n = max(4 * clients, 16)
    result = ChatLoadResult(clients=clients, stream=False)
    params = SamplingParams(max_tokens=TOKENS)

    async def drive(indices: list[int], count: bool) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in indices:
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                out = await engine.complete(f"[{tag}-{i}] {prompts[i % len(prompts)]}", params)
                if count:
                    result.ok_2xx += 1
                    result.output_tokens += out.completion_tokens
                    result.latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(min(clients, len(indices)))))

    async def run() -> None:
        await drive(list(range(n, n + clients)), count=False)  # warm-up, not counted
        t0 = time.perf_counter()
        await drive(list(range(n)), count=True)
        result.wall_s = time.perf_counter() - t0

    asyncio.run(run())
    result.requests = n
    return result


def chat_loads(
    url: str, prompts: list[str], tag: str, model: str = MODEL
) -> dict[int, ChatLoadResult]:
    out = {}
    for clients in CLIENTS:
        out[clients] = asyncio.run(
            run_chat_load(url, model, prompts, clients, max_tokens=TOKENS, tag=f"{tag}-{clients}")
        )
        print(tag, clients, out[clients].summary(), *out[clients].errors, flush=True)
    return out


def rag_prompts(settings: Any) -> tuple[list[Any], list[Any]]:
    """The RAG question set as the service would prompt the model (retrieved chunks and the
    question), split in two by question id: tune (first half) and test."""
    from evaluation.datasets import load_rag_questions
    from refinery.core.stores import make_engine
    from refinery.rag.prompt import build_messages
    from refinery.retrieval.embedding import Embedder
    from refinery.retrieval.search import Retriever
    from refinery.retrieval.vectorstore import VectorStore

    rows, _ = load_rag_questions()
    store = VectorStore(make_engine(settings=settings))
    retriever = Retriever(store, Embedder())
    prompts = [build_messages(r["question"], retriever.search(r["question"], k=3)) for r in rows]
    store.engine.dispose()
    half = len(prompts) // 2
    return prompts[:half], prompts[half:]


def _one_client(engine: Any, prompts: list[Any], tokens: int = 64) -> tuple[float, list[str]]:
    """Tokens/s answering ``prompts`` one at a time (a single client), and the answers."""
    engine.generate(prompts[:2], max_new_tokens=8)  # warm-up
    n, t0, answers = 0, time.perf_counter(), []
    for p in prompts:
        (c,) = engine.generate([p], max_new_tokens=tokens)
        n += c.completion_tokens
        answers.append(c.text)
    return n / (time.perf_counter() - t0), answers


def speculation(base: Path, openvino: Path, tune: list[Any], test: list[Any]) -> dict[str, Any]:
    """Prompt lookup at one client: the number of draft tokens chosen on the tune half of the
    RAG question set, then tokens/s with and without it, and acceptance, on the test half."""
    from refinery.generation.engine.loader import load_engine

    def engine(mode: str, lookup: int = 4) -> Any:
        return load_engine(base, backend="openvino", openvino_dir=openvino, speculation=mode,
                           lookup_tokens=lookup)  # fmt: skip

    tried = {}
    for lookup in (2, 3, 5, 8):
        e = engine("prompt_lookup", lookup)
        try:
            tried[lookup] = _one_client(e, tune[:12])[0]
        finally:
            e.close()
    best = max(tried, key=lambda k: tried[k])
    print("speculation on the tune half (tok/s by draft tokens):", tried, flush=True)
    out: dict[str, Any] = {"tried_on_tune": tried, "lookup_tokens": best}
    texts = {}
    for mode in ("none", "prompt_lookup"):
        e = engine(mode, best)
        try:
            before = e.stats()
            rate, texts[mode] = _one_client(e, test)
            s = e.stats()
        finally:
            e.close()
        proposed = s.draft_proposed - before.draft_proposed
        accepted = s.draft_accepted - before.draft_accepted
        out[mode] = {"tok/s": rate, "acceptance": accepted / proposed if proposed else 0.0}
        print("speculation", mode, out[mode], flush=True)
    out["identical"] = texts["none"] == texts["prompt_lookup"]
    return out


def embeddings_in_process(texts: list[str]) -> float:
    """Texts/s of the bare model, batches of 32 (its best on this CPU)."""
    from refinery.retrieval.embedding import Embedder

    embedder = Embedder()
    embedder.encode(texts[:32])
    t0 = time.perf_counter()
    for i in range(0, len(texts), 32):
        embedder.encode(texts[i : i + 32])
    return len(texts) / (time.perf_counter() - t0)


def embedding_agreement(url: str, texts: list[str]) -> float:
    """Largest |difference| between the service's vectors and the model's in-process ones."""
    import numpy as np

    from refinery.retrieval.embedding import Embedder

    got = httpx.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "float"},
                     timeout=120).json()  # fmt: skip
    served = np.array([d["embedding"] for d in got["data"]])
    return float(np.abs(served - Embedder().encode(texts)).max())


SENTENCES = [
    f"Sentence {i}: the colony keeps its brood near 35 degrees in spring." for i in range(640)
]


def main() -> None:
    from benchmarks import peers
    from refinery.generation.engine.loader import load_engine

    build = peers.setup()
    prompts = chat_prompts()
    chat: dict[str, dict[int, ChatLoadResult]] = {}
    with fresh_home("serving") as settings:
        ingest(settings)
        tag, base, openvino, env = champion_bento(settings)
        engine = load_engine(base, backend="openvino", openvino_dir=openvino)
        try:
            chat["bare engine in-process"] = {
                c: engine_load(engine, prompts, c, f"bare{c}") for c in CLIENTS
            }
        finally:
            engine.close()
        tune, test = rag_prompts(settings)
        spec = speculation(base, openvino, tune, test)
        with serve(tag, env) as url:
            chat["service (engine)"] = chat_loads(url, prompts, "svc")
            ttft = asyncio.run(run_chat_load(url, MODEL, prompts, 8, max_tokens=TOKENS,
                                             stream=True, tag="ttft"))  # fmt: skip
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a bee product."}],
                    "max_tokens": TOKENS}  # fmt: skip
            httpx.post(url + "/v1/chat/completions", json=body, timeout=120)  # now cached
            cache = run_wrk(url + "/v1/chat/completions", body, duration_s=WRK_SECONDS)
            emb_body = {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "Bee fact @N: the hive keeps its brood warm.", "encoding_format": "base64"}  # fmt: skip
            embeddings = run_wrk(
                url + "/v1/embeddings", emb_body, duration_s=WRK_SECONDS, vary="@N"
            )
            agreement = embedding_agreement(url, SENTENCES[:16])
        entry = {}  # cache hits by entry configuration: access log, workers
        for label, extra in (("access log off", {"REFINERY_ACCESS_LOG": "off"}),
                             ("2 entry workers", {"REFINERY_ENTRY_WORKERS": "2"})):  # fmt: skip
            with serve(tag, {**env, **extra}) as url:
                httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
                entry[label] = run_wrk(url + "/v1/chat/completions", body, duration_s=WRK_SECONDS)
                print("cache hits,", label, entry[label], flush=True)
        with serve(tag, {**env, "REFINERY_ENGINE": "static"}) as url:
            chat["service before (fixed batches, fp32)"] = chat_loads(url, prompts, "static")
        with peers.llama_server(build) as url:
            chat["llama-server (C++, 32 slots)"] = chat_loads(
                url, prompts, "llama", peers.MODEL_ALIAS
            )
        best: dict[int, ChatLoadResult] = {}
        for threads in (1, 2):
            with peers.python_server(build, threads) as url:
                for c, r in chat_loads(url, prompts, f"py{threads}", peers.MODEL_ALIAS).items():
                    if c not in best or r.tokens_per_s > best[c].tokens_per_s:
                        best[c] = r
        chat["llama-cpp-python server (one at a time)"] = best
        bare_embed = embeddings_in_process(SENTENCES)
    report(chat, ttft, spec, cache, embeddings, bare_embed, agreement, entry)


def report(chat, ttft, spec, cache, embeddings, bare_embed, agreement, entry) -> None:
    rows = []
    for name, by_clients in chat.items():
        for c, r in sorted(by_clients.items()):
            rows.append([name, str(c), *r.row()])
    svc, llama = chat["service (engine)"], chat["llama-server (C++, 32 slots)"]
    py, bare = chat["llama-cpp-python server (one at a time)"], chat["bare engine in-process"]
    ratio = {c: svc[c].tokens_per_s / llama[c].tokens_per_s for c in CLIENTS}
    vs_py = {c: svc[c].tokens_per_s / py[c].tokens_per_s for c in CLIENTS}
    vs_bare = {c: svc[c].tokens_per_s / bare[c].tokens_per_s for c in CLIENTS}
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    sp = spec["prompt_lookup"]["tok/s"] / spec["none"]["tok/s"]
    emb_ratio = embeddings.requests_per_s / bare_embed
    notes = f"""
Targets, from this run:
- output tokens/s vs llama-server: 32 clients **{ratio[32]:.2f}×** (target ≥ 1: {met(ratio[32] >= 1)}),
  8 clients **{ratio[8]:.2f}×**, 1 client **{ratio[1]:.2f}×** (target ≥ 0.7: {met(ratio[8] >= 0.7)} at 8,
  {met(ratio[1] >= 0.7)} at 1);
- vs the Python server: 8 clients **{vs_py[8]:.2f}×**, 32 clients **{vs_py[32]:.2f}×** (target ≥ 3: {met(min(vs_py[8], vs_py[32]) >= 3)});
- p99 at 8 clients **{svc[8].p99:.2f} s** (target ≤ 1.5 s: {met(svc[8].p99 <= 1.5)}); time to first token at 8
  streaming clients: p50 **{ttft.ttft_p50 * 1000:.0f} ms**, p99 {ttft.ttft_p99 * 1000:.0f} ms (target p50 ≤ 250 ms: {met(ttft.ttft_p50 <= 0.25)});
- served vs the bare engine: {", ".join(f"{c} clients {vs_bare[c]:.2f}×" for c in CLIENTS)} (target ≥ 0.8);
- speculative decoding (prompt lookup, RAG question set, test half, 1 client, 64 tokens):
  {spec["none"]["tok/s"]:.1f} → {spec["prompt_lookup"]["tok/s"]:.1f} tok/s, **{sp:.2f}×** (target ≥ 1.5: {met(sp >= 1.5)}),
  acceptance rate {spec["prompt_lookup"]["acceptance"]:.2f}; greedy answers identical: {spec["identical"]}; draft tokens
  per step {spec["lookup_tokens"]}, chosen on the tune half (tok/s by draft tokens: {spec["tried_on_tune"]});
- cache hits at 32 connections (wrk): **{cache.requests_per_s:.0f} requests/s**, p99 **{cache.p99_ms:.1f} ms**
  (target ≥ 1000/s, p99 < 50 ms: {met(cache.requests_per_s >= 1000 and cache.p99_ms < 50)}), non-2xx {cache.non_2xx};
- embeddings at 32 connections (wrk, a different sentence per request): **{embeddings.requests_per_s:.0f} requests/s**,
  p99 {embeddings.p99_ms:.0f} ms, non-2xx {embeddings.non_2xx}; the bare model in-process (batches of 32)
  {bare_embed:.0f} texts/s: **{emb_ratio:.2f}×** (target ≥ 0.8 and ≥ 220/s: {met(emb_ratio >= 0.8 and embeddings.requests_per_s >= 220)});
  service vectors vs the model's in-process: max |difference| {agreement:.1e} (retrieval unchanged).
- entry configuration, cache hits at 32 connections: default (1 worker, access log on)
  {cache.requests_per_s:.0f}/s p99 {cache.p99_ms:.1f} ms; {"; ".join(f"{k} {r.requests_per_s:.0f}/s p99 {r.p99_ms:.1f} ms" for k, r in entry.items())}.
"""
    write_table(
        "serving",
        "Serving: the generation engine against llama.cpp's servers",
        f"""
All in one run on {machine()}. Chat: closed-loop clients, unique prompts, greedy, max_tokens
{TOKENS}; tokens counted from each server's usage report. SmolLM2-135M-Instruct: OpenVINO int8
export (engine, service), fp32 (service before), Q4_1 GGUF (llama.cpp). The Python load
generator shares the 2 cores with the servers (wrk for cache hits and embeddings).
""",
        ["system", "clients", *ChatLoadResult.HEADER],
        rows,
        notes,
    )
    print(json.dumps({"ratio_vs_llama_server": ratio}, indent=2))


if __name__ == "__main__":
    main()
