"""What every engine candidate is measured on: the same model folder, the same prompts (the
chat template over SFT questions with a per-request nonce, as the HTTP load uses), 32-token
greedy answers, all requests submitted at once, at 1/8/32 concurrent sequences."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.chatload import chat_prompts
from benchmarks.common import WORK

ENGINE_WORK = WORK / "engine"
CONCURRENCY = (1, 8, 32)
NEW_TOKENS = 32
REPEATS = {1: 3, 8: 2, 32: 2}


def model_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as a safetensors folder (converted once)."""
    from training.base_model import resolve_base_model

    return Path(resolve_base_model(None, ENGINE_WORK / "models").path)


def prompt_texts(n: int, tag: str) -> list[str]:
    qs = chat_prompts()
    return [f"[{tag}-{i}] {qs[i % len(qs)]}" for i in range(n)]


def prompt_ids(tokenizer, n: int, tag: str) -> list[list[int]]:
    out = []
    for text in prompt_texts(n, tag):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def measure(
    name: str,
    run: Callable[[list[list[int]]], int],
    tokenizer,
    concurrency: Sequence[int] = CONCURRENCY,
) -> dict[int, float]:
    """``run(prompts)`` generates NEW_TOKENS for every prompt, all submitted at once, and
    returns the number of tokens generated; tokens/s per concurrency (median of repeats)."""
    run(prompt_ids(tokenizer, 2, f"{name}-warm"))
    result: dict[int, float] = {}
    for c in concurrency:
        rates = []
        for r in range(REPEATS[c]):
            prompts = prompt_ids(tokenizer, c, f"{name}-{c}-{r}")
            t0 = time.perf_counter()
            tokens = run(prompts)
            wall = time.perf_counter() - t0
            if tokens != c * NEW_TOKENS:
                print(f"  note: {name} c={c} produced {tokens} tokens, expected {c * NEW_TOKENS}")
            rates.append(tokens / wall)
        result[c] = statistics.median(rates)
        print(
            f"  {name}: {c} seq -> {result[c]:.1f} tok/s ({', '.join(f'{x:.1f}' for x in rates)})",
            flush=True,
        )
    return result


def save(name: str, data: dict) -> None:
    out = ENGINE_WORK / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
