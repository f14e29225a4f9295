"""Resident memory of OpenVINO GenAI's continuous-batching pipeline as unique prompts go
through it: does it level off? (The soak saw the chat service grow all along its 10 minutes.)

    python -m benchmarks.engine_research.kv_cache_rss MODEL_DIR [--prefix-caching] [--rounds N]

Each round: 16 unique prompts of 250 random words, 8 new tokens each; prints the growth of
this process's RSS after each round. With ``cache_size`` = 1 GB, the KV blocks are touched
for the first time as they are handed out, so RSS climbs until the whole cache has been used
once, then stays flat, with or without prefix caching.
"""

from __future__ import annotations

import argparse
import random

import psutil

WORDS = [
    "bee",
    "hive",
    "queen",
    "honey",
    "wax",
    "drone",
    "pollen",
    "nectar",
    "brood",
    "comb",
    "smoker",
    "frame",
    "swarm",
    "colony",
]


def main() -> None:
    import openvino_genai as ov_genai

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--rounds", type=int, default=28)
    args = parser.parse_args()
    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_seqs = 32
    scheduler.max_num_batched_tokens = 512
    scheduler.cache_size = 1
    scheduler.dynamic_split_fuse = True
    scheduler.enable_prefix_caching = args.prefix_caching
    pipe = ov_genai.ContinuousBatchingPipeline(
        args.model_dir, scheduler_config=scheduler, device="CPU", properties={}
    )
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = 8
    proc = psutil.Process()
    start = proc.memory_info().rss
    rng = random.Random(1)
    growth = []
    for i in range(args.rounds):
        prompts = [
            " ".join(rng.choice(WORDS) for _ in range(250)) + f" #{i}-{j}" for j in range(16)
        ]
        pipe.generate(prompts, [config] * len(prompts))
        growth.append(round((proc.memory_info().rss - start) / 2**20))
    print(f"prefix caching {args.prefix_caching}; RSS growth (MiB) after each round: {growth}")


if __name__ == "__main__":
    main()
