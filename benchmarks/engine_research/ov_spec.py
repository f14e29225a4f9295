"""OpenVINO GenAI prompt-lookup speculation, measured through the step API (tokens per
pipeline step give the acceptance), with and without the CPU plugin's dynamic quantization of
activations (which makes a K-token verification step round differently from a 1-token step);
plus a stop-string check.

``python -m benchmarks.engine_research.ov_spec IR_FOLDER``
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PASSAGE = (
    "A worker honey bee takes about 21 days from the egg being laid to the adult emerging. "
    "The egg stage lasts about three days and the cell is capped around day 9. Drones take "
    "the longest, about 24 days from egg to adult, and their cells are capped around day 10."
)
QUESTIONS = [
    "How long does a worker bee take to develop, and when is its cell capped?",
    "How long do drones take to develop?",
    "How long does the egg stage last?",
]
K = 4  # draft tokens per step


def run(folder: Path, lookup: bool, props: dict) -> dict:
    from benchmarks.engine_research.ov_bench import config, pipeline

    pipe = pipeline(folder, properties={**props, **({"prompt_lookup": True} if lookup else {})})
    tok = pipe.get_tokenizer()
    texts, tokens, steps, wall = [], 0, 0, 0.0
    for qi, q in enumerate([QUESTIONS[0], *QUESTIONS]):  # the first one warms up
        chat = [{"role": "user", "content": f"Context: {PASSAGE}\n\nQuestion: {q} "
                 "Answer by quoting the context."}]  # fmt: skip
        prompt = tok.apply_chat_template(chat, add_generation_prompt=True)
        gc = config(48, ignore_eos=False)
        if lookup:
            gc.num_assistant_tokens = K
            gc.max_ngram_size = 3
        t0 = time.perf_counter()
        h = pipe.add_request(qi, prompt, gc)
        ids: list[int] = []
        n_steps = 0
        while pipe.has_non_finished_requests():
            pipe.step()
            n_steps += 1
            if h.can_read():
                for out in h.read().values():
                    ids += list(out.generated_ids)
        if qi == 0:
            continue
        wall += time.perf_counter() - t0
        tokens += len(ids)
        steps += n_steps
        texts.append(tok.decode(ids))
    per_step = tokens / steps
    return {
        "tokens": tokens,
        "steps": steps,
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_step": round(per_step, 2),
        # each step yields 1 verified token plus the accepted drafts
        "acceptance": round((per_step - 1) / K, 3) if lookup else None,
        "texts": texts,
    }


def stop_string(folder: Path) -> dict:
    from benchmarks.engine_research.ov_bench import config, pipeline

    pipe = pipeline(folder)
    tok = pipe.get_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "How long does a worker bee take to develop?"}],
        add_generation_prompt=True,
    )
    plain = pipe.generate([prompt], [config(32, ignore_eos=False)])[0].m_generation_ids[0]
    gc = config(32, ignore_eos=False)
    gc.stop_strings = {"bee"}
    stopped = pipe.generate([prompt], [gc])[0].m_generation_ids[0]
    return {"plain": plain, "stop_bee": stopped}


def main(argv: list[str]) -> None:
    from benchmarks.engine_research.common import save

    folder = Path(argv[0])
    out: dict = {"stop": stop_string(folder)}
    for label, props in (
        ("default", {}),
        ("no-dynamic-quant", {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}),
    ):
        plain = run(folder, False, props)
        lookup = run(folder, True, props)
        out[label] = {
            "plain": plain,
            "lookup": lookup,
            "speedup": round(lookup["tokens_per_s"] / plain["tokens_per_s"], 2),
            "identical": plain["texts"] == lookup["texts"],
        }
        print(label, json.dumps(out[label], indent=1)[:3000], flush=True)
    print(json.dumps(out["stop"], indent=1))
    save(f"ov_spec_{folder.name}", out)


if __name__ == "__main__":
    main(sys.argv[1:])
