"""Baseline: transformers' plain `generate` over a left-padded batch of all the prompts at
once (what the current service does), fp32 and torch dynamic int8, same prompts, 32 tokens.

``python -m benchmarks.engine_research.hf_generate [fp32|int8 ...]``
"""

from __future__ import annotations

import sys

import torch


def main(kinds: list[str]) -> None:
    from benchmarks.engine_research.common import NEW_TOKENS, measure, save
    from benchmarks.engine_research.torch_loop import load

    torch.set_num_threads(2)
    results = {}
    for kind in kinds:
        model, tok = load(kind)
        model.generation_config.eos_token_id = None  # 32 tokens every time, as elsewhere
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0

        def run(prompts, model=model, pad=pad):
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=NEW_TOKENS, pad_token_id=pad)  # fmt: skip
            return int(out[:, width:].numel())

        results[f"hf-generate-{kind}"] = measure(f"hf-generate-{kind}", run, tok)
    save("hf_generate", results)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fp32", "int8"])
