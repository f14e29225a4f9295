"""Does OpenVINO GenAI release the GIL while it computes? An engine thread that steps the
pipeline must leave the HTTP event loop free. A background thread runs 8 requests through
`step()` (then through `generate()`); the main thread meanwhile sleeps 5 ms at a time and
records how late each wake-up is.

``python -m benchmarks.engine_research.ov_gil IR_FOLDER``
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    from benchmarks.chatload import _pct
    from benchmarks.engine_research.ov_bench import config, pipeline

    pipe = pipeline(Path(argv[0]))
    tok = pipe.get_tokenizer()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"[{i}] Why do bees swarm?"}], add_generation_prompt=True
        )
        for i in range(8)
    ]

    def by_step() -> None:
        for i, p in enumerate(prompts):
            pipe.add_request(100 + i, p, config(32))
        while pipe.has_non_finished_requests():
            pipe.step()

    def by_generate() -> None:
        pipe.generate(prompts, [config(32) for _ in prompts])

    for name, fn in (("step", by_step), ("generate", by_generate)):
        worker = threading.Thread(target=fn)
        lags = []
        t_start = time.perf_counter()
        worker.start()
        while worker.is_alive():
            t0 = time.perf_counter()
            time.sleep(0.005)
            lags.append((time.perf_counter() - t0 - 0.005) * 1000)
        wall = time.perf_counter() - t_start
        print(f"{name}: {wall:.2f} s, main-thread wake-up lag p50 {_pct(lags, 0.5):.1f} ms, "
              f"p99 {_pct(lags, 0.99):.1f} ms, max {max(lags):.1f} ms over {len(lags)} sleeps")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
