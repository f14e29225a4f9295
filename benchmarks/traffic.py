"""The traffic log's cost on request latency at 32 concurrent clients.

The same Bento served with the log off (REFINERY_TRAFFIC_SAMPLE=0) and on (1.0: every request
queued and COPYed into the embedded Postgres by the writer thread). Server starts alone move
throughput by tens of percent on this 2-core machine, so each mode gets three fresh servers in
the order off, on, on, off, off, on (drift over time cancels out) and the table shows medians.
Requests: cache hits (the cheapest request, where the log's share is largest) and embeddings.
Also: the writer's CPU per row, COPY against a multi-row INSERT, in one process.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime

from benchmarks.common import fresh_home, write_table

CLIENTS = 32
SECONDS = 10  # of load per server and kind of request
ORDER = ["off", "on", "on", "off", "off", "on"]


def writer_cpu(database: str) -> dict[str, float]:
    """CPU microseconds per row for the writer: COPY (what it does) vs INSERT."""
    import sqlalchemy as sa

    from refinery.core.schema import traffic_log
    from refinery.core.stores import make_engine
    from serving.traffic import TrafficLog, TrafficSettings

    engine = make_engine(database, create_schema=True)
    log = TrafficLog(lambda: engine, TrafficSettings(flush_s=3600))
    row = {
        "ts": datetime.now(UTC), "endpoint": "chat", "model": "m/1", "status": 200,
        "prompt": "What is propolis, and why do bees collect it?",
        "answer": "A resin from tree buds that bees use to seal and disinfect the hive.",
        "retrieval_scores": [0.52, 0.61, 0.70], "latency_ms": 12.0, "prompt_tokens": 20,
        "completion_tokens": 16, "cost_usd": 1e-5, "cache_hit": False, "guard": "passed",
    }  # fmt: skip
    rows = [dict(row) for _ in range(256)]

    def insert(batch: list[dict]) -> None:
        with engine.begin() as conn:
            conn.execute(sa.insert(traffic_log), [log.finish(r) for r in batch])

    out = {}
    for name, write in (("copy", log._write), ("insert", insert)):
        write(rows)  # warm
        t0 = time.thread_time()
        for _ in range(20):
            write(rows)
        out[name] = (time.thread_time() - t0) / (20 * len(rows)) * 1e6
    log.close()
    engine.dispose()
    return out


def main() -> None:
    from benchmarks.chatload import run_wrk
    from benchmarks.serving import champion_bento, serve
    from refinery.core.stores import database_url, make_engine

    runs: dict[str, list[dict[str, float]]] = {}
    with fresh_home("traffic") as settings:
        tag, _, _, env = champion_bento(settings)
        db = database_url(settings)
        hit = {"messages": [{"role": "user", "content": "Name a bee product."}], "max_tokens": 8}
        for n, mode in enumerate(ORDER):
            sample = "1" if mode == "on" else "0"
            with serve(tag, {**env, "REFINERY_TRAFFIC_SAMPLE": sample}) as url:
                chat, emb = url + "/v1/chat/completions", url + "/v1/embeddings"
                run_wrk(chat, hit, connections=CLIENTS, duration_s=3)  # warm (and cached)
                hits = run_wrk(chat, hit, connections=CLIENTS, duration_s=SECONDS)
                body = {"input": f"round {n} ({mode}) text @N: how do bees cool the hive?"}
                run_wrk(emb, body, connections=CLIENTS, duration_s=3, vary="@N")  # warm
                embs = run_wrk(emb, body, connections=CLIENTS, duration_s=SECONDS, vary="@N")
            for key, r in (("hit", hits), ("emb", embs)):
                runs.setdefault(f"{key}_{mode}", []).append(
                    {
                        "rps": r.requests_per_s,
                        "p50": r.p50_ms / 1000,
                        "p99": r.p99_ms / 1000,
                        "errors": r.non_2xx + r.socket_errors,
                    }
                )
            print(n, mode, hits, embs, flush=True)
            time.sleep(2)
        import sqlalchemy as sa

        from refinery.core.schema import traffic_log

        engine = make_engine(db)
        with engine.connect() as conn:
            logged = conn.execute(sa.select(sa.func.count()).select_from(traffic_log)).scalar_one()
        engine.dispose()
        cpu = writer_cpu(db)

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    rows = []
    for label, key in (("cache hits (chat)", "hit"), ("embeddings", "emb")):
        for mode in ("off", "on"):
            k = f"{key}_{mode}"
            rows.append(
                [
                    label,
                    "on (sample 1.0)" if mode == "on" else "off (sample 0)",
                    f"{med(k, 'rps'):.1f}",
                    f"{med(k, 'p50') * 1000:.0f}",
                    f"{med(k, 'p99') * 1000:.0f}",
                    " / ".join(f"{r['p50'] * 1000:.0f}" for r in runs[k]),
                    int(sum(r["errors"] for r in runs[k])),
                ]
            )

    def overhead(key: str, field: str) -> str:
        return f"{med(f'{key}_on', field) / med(f'{key}_off', field) - 1:+.1%}"

    notes = f"""
Overhead (median on / median off − 1): cache hits p50 **{overhead("hit", "p50")}**, p99
**{overhead("hit", "p99")}**; embeddings p50 **{overhead("emb", "p50")}**, p99
**{overhead("emb", "p99")}** (target < 5%). {logged} rows were logged by the "on" servers.
The spread between servers of the same mode (the p50 column of each run) is the noise floor.

Writer CPU per logged row, in the writer thread (which shares the interpreter with the request
handlers): COPY **{cpu["copy"]:.0f} µs** (what the log does), a multi-row INSERT through
SQLAlchemy {cpu["insert"]:.0f} µs. On the request path `record()` only appends a dict to a
queue; ids, hashes and lengths are computed by the writer.
"""
    write_table(
        "traffic",
        "Traffic log overhead at 32 concurrent clients",
        f"""
Order of servers: {", ".join(ORDER)}; per server {SECONDS} s of cache hits (one repeated chat
request) and {SECONDS} s of embeddings requests (a different text each), each after a warm-up,
from {CLIENTS} wrk connections; SmolLM2-135M champion, MiniLM embeddings, in-process cache,
embedded Postgres on the same 2 cores.
""",
        ["requests", "traffic log", "requests/s", "p50 ms", "p99 ms", "p50 per server", "errors"],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
