"""Backend: OpenVINO GenAI's ``ContinuousBatchingPipeline`` on int8 (or int4) weights: paged
attention, requests join and leave the running batch between steps, and speculative decoding
(prompt lookup, or a draft model with the same tokenizer) inside the same batches.

The model is an OpenVINO export of the chat model (``training.openvino_export``), made by the
``openvino_model`` step beside the quantized variants. One thread runs the pipeline: it admits
new requests, runs a step, reads what each request produced and hands it to the engine.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

from refinery.generation.engine.base import EngineStats, SamplingParams, Sink, Speculation

DRAFT_DIR = "draft"  # a draft model's export beside the main one
# Speculative decoding settings, measured on the RAG question set (benchmarks/results/serving.md).
PROMPT_LOOKUP_TOKENS = 4  # candidate tokens copied from the prompt per step
PROMPT_LOOKUP_NGRAM = 3  # the n-gram matched against the prompt
DRAFT_TOKENS = 4
# "exact": f32 arithmetic and no dynamic (per-step) quantization of activations, so a token's
# logits do not depend on how many tokens a step computes. Speculation verifies several tokens
# in one step; on CPUs with bf16 (AVX-512 BF16) the plugin's defaults (bf16, int8 activations)
# then gave different greedy text than one-token steps ("…its life cycle." against "…the
# development process."). With "exact" the answers were token-identical on that machine.
# "fast": the plugin's defaults for the CPU (bf16 where the CPU has it).
PRECISION_PROPERTIES: dict[str, dict[str, Any]] = {
    "exact": {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0},
    "fast": {},
}


class OpenVINOBackend:
    name = "openvino-cb"

    def __init__(
        self,
        model_dir: str | Path,
        eos_ids: list[int],
        *,
        threads: int | None = None,
        max_batch: int = 32,
        max_batch_tokens: int = 256,
        cache_gb: float = 1.0,
        speculation: str = "none",
        draft_dir: str | Path | None = None,
        lookup_tokens: int = PROMPT_LOOKUP_TOKENS,
        precision: str | None = None,
    ) -> None:
        import openvino_genai as ov_genai

        self._ov = ov_genai
        model_dir = Path(model_dir)
        self.eos_ids = eos_ids
        self.max_context = int(_max_positions(model_dir))
        self.speculation = Speculation(speculation)
        self.lookup_tokens = lookup_tokens
        self._spec_tokens = {
            Speculation.none: 0,
            Speculation.prompt_lookup: lookup_tokens,
            Speculation.draft_model: DRAFT_TOKENS,
        }[self.speculation]
        scheduler = ov_genai.SchedulerConfig()
        scheduler.max_num_seqs = max_batch
        scheduler.max_num_batched_tokens = max_batch_tokens
        scheduler.cache_size = max(1, round(cache_gb))
        scheduler.dynamic_split_fuse = (
            True  # long prompts are prefilled in slices between decode steps
        )
        scheduler.enable_prefix_caching = True  # a shared system prompt is prefilled once
        # Speculation's claim (greedy answers as without it) holds only with exact numerics.
        self.precision = precision or ("exact" if self.speculation != Speculation.none else "fast")
        if self.precision not in PRECISION_PROPERTIES:
            raise ValueError(f"precision must be one of {sorted(PRECISION_PROPERTIES)}")
        properties: dict[str, Any] = dict(PRECISION_PROPERTIES[self.precision])
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        if self.speculation == Speculation.prompt_lookup:
            properties["prompt_lookup"] = True
        elif self.speculation == Speculation.draft_model:
            draft = Path(draft_dir) if draft_dir else model_dir.parent / DRAFT_DIR
            properties["draft_model"] = ov_genai.draft_model(str(draft), "CPU")
        self.pipe = ov_genai.ContinuousBatchingPipeline(
            str(model_dir), scheduler_config=scheduler, device="CPU", properties=properties
        )
        self._incoming: queue.SimpleQueue[tuple[str, list[int], SamplingParams] | None]
        self._incoming = queue.SimpleQueue()
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._handles: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._sink: Sink | None = None
        self._next_id = 0
        self._thread = threading.Thread(target=self._run, name="openvino-cb", daemon=True)

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._thread.start()

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            self._stats.requests += 1
            self._stats.waiting += 1
        self._incoming.put((rid, prompt_ids, params))
        self._wake.set()

    def cancel(self, rid: str) -> None:
        self._cancels.put(rid)
        self._wake.set()

    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**vars(self._stats))
        s.running = len(self._handles)
        return s

    def close(self) -> None:
        self._incoming.put(None)
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the pipeline's thread --
    def _config(self, params: SamplingParams) -> Any:
        cfg = self._ov.GenerationConfig()
        cfg.max_new_tokens = params.max_tokens
        cfg.stop_token_ids = set(self.eos_ids)
        if params.temperature > 0:
            cfg.do_sample = True
            cfg.temperature = params.temperature
            cfg.top_p = params.top_p
            if params.seed is not None:
                cfg.rng_seed = params.seed
        speculation = params.speculation or self.speculation
        if speculation == Speculation.prompt_lookup and self.speculation == speculation:
            cfg.num_assistant_tokens = self.lookup_tokens
            cfg.max_ngram_size = PROMPT_LOOKUP_NGRAM
        elif speculation == Speculation.draft_model and self.speculation == speculation:
            cfg.num_assistant_tokens = DRAFT_TOKENS
        return cfg

    def _admit(self) -> bool:
        import numpy as np
        import openvino as ov

        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            rid, ids, params = item
            tensor = ov.Tensor(np.asarray([ids], dtype=np.int64))
            self._next_id += 1
            handle = self.pipe.add_request(self._next_id, tensor, self._config(params))
            self._handles[rid] = handle
            self._counts[rid] = 0
            with self._lock:
                self._stats.waiting -= 1

    def _drop_cancelled(self) -> None:
        while True:
            try:
                rid = self._cancels.get_nowait()
            except queue.Empty:
                return
            handle = self._handles.pop(rid, None)
            self._counts.pop(rid, None)
            if handle is not None:
                handle.cancel()

    def _run(self) -> None:
        assert self._sink is not None
        while True:
            if not self._admit():
                return
            self._drop_cancelled()
            if not self.pipe.has_non_finished_requests():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            running = len(self._handles)
            self.pipe.step()
            with self._lock:
                self._stats.steps += 1
                self._stats.batch_tokens += running
            for rid, handle in list(self._handles.items()):
                self._read(rid, handle)

    def _read(self, rid: str, handle: Any) -> None:
        status = handle.get_status()
        new: list[int] = []
        while handle.can_read():
            for output in handle.read().values():
                new.extend(int(t) for t in output.generated_ids)
        finished = status != self._ov.GenerationStatus.RUNNING
        if not new and not finished:
            return
        with self._lock:
            self._stats.generated_tokens += len(new)
            if self._spec_tokens and new:
                # The pipeline does not report acceptance: a step that gave this request n
                # tokens accepted n - 1 drafts of the ``_spec_tokens`` it could propose.
                self._stats.draft_proposed += self._spec_tokens
                self._stats.draft_accepted += len(new) - 1
        self._counts[rid] = self._counts.get(rid, 0) + len(new)
        reason = None
        if finished:
            self._handles.pop(rid, None)
            count = self._counts.pop(rid, 0)
            if status == self._ov.GenerationStatus.FINISHED:
                reason = "stop" if new and new[-1] in self.eos_ids else "length"
                if count and not new:
                    reason = "stop"
            else:
                reason = f"error: the pipeline dropped the request ({status})"
        assert self._sink is not None
        self._sink(rid, new, finished, reason)


def _max_positions(model_dir: Path) -> int:
    import json

    config = model_dir / "config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("max_position_embeddings", 2048))
    return 2048
