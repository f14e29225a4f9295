"""The llama-server peer measured the way the in-process candidates are (N requests sent at
once, 32 tokens each with ignore_eos, same prompts), and under the closed-loop chat load.

``python -m benchmarks.engine_research.peer_session``
"""

from __future__ import annotations

import asyncio

from benchmarks.chatload import run_chat_load
from benchmarks.engine_research.common import CONCURRENCY, REPEATS, prompt_texts, save
from benchmarks.peers import MODEL_ALIAS, llama_server, setup


def main() -> None:
    build = setup()
    out: dict[str, dict[int, float]] = {"at_once": {}, "closed_loop": {}}
    questions = [p.split("] ", 1)[1] for p in prompt_texts(64, "x")]
    with llama_server(build) as url:
        for c in CONCURRENCY:
            rates = []
            for r in range(REPEATS[c]):
                res = asyncio.run(
                    run_chat_load(url, MODEL_ALIAS, questions, clients=c, requests=c,
                                  warmup=c if r == 0 else 0, tag=f"peer-{c}-{r}",
                                  extra={"ignore_eos": True})
                )  # fmt: skip
                assert res.ok_2xx == c, res.errors
                rates.append(res.tokens_per_s)
            out["at_once"][c] = sorted(rates)[len(rates) // 2]
            res = asyncio.run(
                run_chat_load(url, MODEL_ALIAS, questions, clients=c, tag=f"peer-cl-{c}",
                              extra={"ignore_eos": True})
            )  # fmt: skip
            out["closed_loop"][c] = res.tokens_per_s
            print(f"llama-server {c}: at once {rates}, closed loop {res.summary()}", flush=True)
    save("peer_session", out)


if __name__ == "__main__":
    main()
