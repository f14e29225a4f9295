"""OpenVINO GenAI's ContinuousBatchingPipeline on an exported IR folder: tokens/s at 1/8/32
sequences (same prompts as the other candidates, fed as token ids, 32 tokens, ignore_eos),
then a tour of the APIs an engine would use (add_request + streaming reads, cancel, per-request
settings, stop strings, prompt-lookup speculation, metrics, memory).

``python -m benchmarks.engine_research.ov_bench IR_FOLDER [LABEL]``
Needs only openvino, openvino-genai and openvino-tokenizers at run time (no torch).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pipeline(folder: Path, prefix_caching: bool = True, properties: dict | None = None):
    import openvino_genai as ov_genai

    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 1  # GB of KV cache (paged); 32 × 100-token sequences need a few MB
    sc.max_num_seqs = 32
    sc.max_num_batched_tokens = 256
    sc.dynamic_split_fuse = True
    sc.enable_prefix_caching = prefix_caching
    # OV_PROPS (JSON) adds plugin properties for a whole run, e.g. no dynamic quantization
    extra = json.loads(os.environ.get("OV_PROPS", "{}"))
    props = {"INFERENCE_NUM_THREADS": 2, **extra, **(properties or {})}
    return ov_genai.ContinuousBatchingPipeline(str(folder), sc, "CPU", props)


def config(max_new: int = 32, ignore_eos: bool = True):
    import openvino_genai as ov_genai

    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = max_new
    gc.ignore_eos = ignore_eos
    gc.do_sample = False
    gc.apply_chat_template = False  # prompts arrive templated (or as token ids)
    return gc


def bench(folder: Path, label: str, prefix_caching: bool) -> dict[int, float]:
    import openvino as ov
    from transformers import AutoTokenizer

    from benchmarks.engine_research.common import measure

    tok = AutoTokenizer.from_pretrained(folder)
    pipe = pipeline(folder, prefix_caching)

    def run(prompts):
        inputs = [ov.Tensor(__import__("numpy").array([p], dtype="int64")) for p in prompts]
        out = pipe.generate(inputs, [config() for _ in prompts])
        return sum(len(r.m_generation_ids[0]) for r in out)

    return measure(label, run, tok)


def api_tour(folder: Path) -> dict:
    """What the engine needs, checked on the real pipeline; returns facts for the notes."""
    import openvino_genai as ov_genai

    facts: dict = {"openvino_genai": ov_genai.__version__}
    t0 = time.perf_counter()
    pipe = pipeline(folder)
    facts["load_s"] = round(time.perf_counter() - t0, 2)
    facts["rss_after_load_mib"] = round(rss_mib())
    tokenizer = pipe.get_tokenizer()
    chat = [{"role": "user", "content": "How long does a worker bee take to develop?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)

    # add a request, step the pipeline, read tokens as they come
    h1 = pipe.add_request(1, prompt, config(32, ignore_eos=False))
    h2 = pipe.add_request(2, prompt, config(64, ignore_eos=True))
    streamed: list[int] = []
    steps = 0
    while pipe.has_non_finished_requests():
        pipe.step()
        steps += 1
        if h1.can_read():
            for out in h1.read().values():
                streamed += list(out.generated_ids)
        if steps == 5:
            h2.cancel()  # the sequence leaves the batch, its blocks are freed
    facts["handle_methods"] = sorted(m for m in dir(h1) if not m.startswith("_"))
    facts["streamed_tokens"] = len(streamed)
    facts["streamed_text"] = tokenizer.decode(streamed)
    facts["cancelled_status"] = str(h2.get_status())
    facts["finished_status"] = str(h1.get_status())
    facts["steps"] = steps

    # per-request settings in one generate call: max_new_tokens, stop strings, sampling
    gc_stop = config(32, ignore_eos=False)
    gc_stop.stop_strings = {"days"}
    gc_stop.include_stop_str_in_output = True
    gc_short = config(4, ignore_eos=False)
    gc_sample = config(32, ignore_eos=False)
    gc_sample.do_sample = True
    gc_sample.temperature = 0.7
    gc_sample.top_p = 0.9
    gc_sample.rng_seed = 7
    res = pipe.generate([prompt] * 3, [gc_stop, gc_short, gc_sample])
    facts["per_request"] = [r.m_generation_ids[0] for r in res]
    metrics = pipe.get_metrics()
    facts["metrics_fields"] = sorted(m for m in dir(metrics) if not m.startswith("_"))
    facts["metrics"] = {
        k: getattr(metrics, k)
        for k in (
            "requests",
            "scheduled_requests",
            "cache_usage",
            "max_cache_usage",
            "avg_cache_usage",
        )
        if hasattr(metrics, k)
    }
    facts["rss_after_runs_mib"] = round(rss_mib())
    facts["pipeline_methods"] = sorted(m for m in dir(pipe) if not m.startswith("_"))
    facts["scheduler_fields"] = sorted(
        m for m in dir(ov_genai.SchedulerConfig()) if not m.startswith("_")
    )
    return facts


def prompt_lookup(folder: Path) -> dict:
    """Prompt-lookup speculation at 1 request on prompts that quote a passage (RAG-like):
    tokens/s with and without, and whether the greedy text is identical."""

    passage = (
        "A worker honey bee takes about 21 days from the egg being laid to the adult "
        "emerging. The egg stage lasts about three days and the cell is capped around day 9."
    )
    chat = [{"role": "user", "content": f"Context: {passage}\n\nQuestion: how long does a "
             "worker bee take to develop, and when is its cell capped? Quote the context."}]  # fmt: skip
    out: dict = {}
    texts = {}
    for mode in ("plain", "prompt_lookup"):
        props = {"prompt_lookup": True} if mode == "prompt_lookup" else {}
        pipe = pipeline(folder, properties=props)
        prompt = pipe.get_tokenizer().apply_chat_template(chat, add_generation_prompt=True)
        gc = config(64, ignore_eos=False)
        if mode == "prompt_lookup":
            gc.num_assistant_tokens = 5
            gc.max_ngram_size = 3
        pipe.generate([prompt], [gc])  # warm-up
        t0 = time.perf_counter()
        n = 0
        for _ in range(3):
            r = pipe.generate([prompt], [gc])[0]
            n += len(r.m_generation_ids[0]) if hasattr(r, "m_generation_ids") else 0
            texts[mode] = r.m_generation_ids[0]
        wall = time.perf_counter() - t0
        out[mode] = {"wall_s": round(wall, 3)}
        ext = getattr(r, "extended_perf_metrics", None)
        if ext is not None and hasattr(ext, "get_draft_acceptance_rate"):
            out[mode]["acceptance_rate"] = ext.get_draft_acceptance_rate()
            out[mode]["accepted_tokens"] = ext.get_num_accepted_tokens()
            out[mode]["draft_tokens"] = ext.get_num_draft_tokens()
        m = pipe.get_metrics()
        out[mode]["metrics_fields"] = sorted(x for x in dir(m) if not x.startswith("_"))
    out["identical_text"] = texts.get("plain") == texts.get("prompt_lookup")
    out["text"] = texts.get("plain")
    out["speedup"] = round(out["plain"]["wall_s"] / out["prompt_lookup"]["wall_s"], 2)
    return out


def main(argv: list[str]) -> None:
    from benchmarks.engine_research.common import save

    folder = Path(argv[0])
    label = argv[1] if len(argv) > 1 else folder.name
    what = argv[2] if len(argv) > 2 else "bench"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict = {}
    if what in ("bench", "all"):
        result["bench"] = {str(k): v for k, v in bench(folder, label, True).items()}
    if what in ("noprefix",):
        result["bench_noprefix"] = {
            str(k): v for k, v in bench(folder, label + "-noprefix", False).items()
        }
    if what in ("api", "all"):
        result["api"] = api_tour(folder)
        print(json.dumps(result["api"], indent=1, default=str)[:4000])
    if what in ("lookup", "all"):
        result["prompt_lookup"] = prompt_lookup(folder)
        print(json.dumps(result["prompt_lookup"], indent=1, default=str)[:3000])
    save(f"ov_{label}_{what}", result)


if __name__ == "__main__":
    main(sys.argv[1:])
