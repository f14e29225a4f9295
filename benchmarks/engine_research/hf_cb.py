"""transformers 5's own continuous batching (`generate_batch`, its ContinuousBatchingManager
with a paged KV cache), on CPU, fp32 and bf16.

``python -m benchmarks.engine_research.hf_cb [fp32|bf16 ...]``
"""

from __future__ import annotations

import sys
import time

import torch


def main(kinds: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from benchmarks.engine_research.common import NEW_TOKENS, measure, model_dir, save

    torch.set_num_threads(2)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    results = {}
    for kind in kinds:
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa"
        ).eval()
        # eos_token_id -1: every answer runs the full 32 tokens, as in the other candidates
        gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1,
                               pad_token_id=tok.pad_token_id or 0)  # fmt: skip
        cb = ContinuousBatchingConfig(max_batch_tokens=512, num_blocks=64, page_size=64,
                                      auto_switch_to_flash=False)  # fmt: skip

        def run(prompts, model=model, gen=gen, cb=cb):
            out = model.generate_batch(prompts, generation_config=gen,
                                       continuous_batching_config=cb, warmup=False)  # fmt: skip
            return sum(len(o.generated_tokens) for o in out.values())

        t0 = time.perf_counter()
        results[f"hf-cb-{kind}"] = measure(f"hf-cb-{kind}", run, tok)
        print(f"hf-cb-{kind} took {time.perf_counter() - t0:.0f} s", flush=True)
    save("hf_cb", results)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fp32", "bf16"])
