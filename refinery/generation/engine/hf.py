"""Backend: transformers' own continuous batching (``ContinuousBatchingManager``) over a
PyTorch model: paged KV cache, requests join and leave the batch between steps. On CUDA it
uses fp16/bf16 with SDPA/flash attention; on a CPU, bf16 where the CPU has native bf16
(AVX-512 BF16 or AMX), else fp32.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

from refinery.generation.engine.base import EngineStats, SamplingParams, Sink, Speculation


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls are fast only with AVX-512 BF16 or AMX; elsewhere torch emulates them."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def best_dtype(device: str) -> Any:
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


class HFBackend:
    name = "transformers-cb"
    speculation = Speculation.none

    def __init__(
        self,
        model_dir: str | Path,
        eos_ids: list[int],
        *,
        device: str = "cpu",
        dtype: Any = None,
        max_batch_tokens: int = 512,
        max_requests: int = 32,
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.dtype = dtype if dtype is not None else best_dtype(device)
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, use_safetensors=True, attn_implementation="sdpa"
        )
        model = model.to(device)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = eos_ids
        generation = GenerationConfig(
            max_new_tokens=256,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
        )
        config = ContinuousBatchingConfig(
            max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_requests
        )
        self.manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=config
        )
        self._seen: dict[str, int] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._sink: Sink | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self.manager.start()
        self._reader = threading.Thread(target=self._read, name="hf-cb-results", daemon=True)
        self._reader.start()

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        kwargs: dict[str, Any] = {}
        if params.temperature > 0:
            kwargs = {"temperature": params.temperature, "top_p": params.top_p}
        with self._lock:
            self._seen[rid] = 0
            self._stats.requests += 1
        self.manager.add_request(
            prompt_ids,
            request_id=rid,
            max_new_tokens=params.max_tokens,
            streaming=True,
            eos_token_id=self.eos_ids,
            **kwargs,
        )

    def cancel(self, rid: str) -> None:
        with self._lock:
            if rid not in self._seen:
                return
            self._seen.pop(rid, None)
            self._cancelled.add(rid)
        self.manager.cancel_request(rid)

    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**vars(self._stats))
        s.waiting = self.manager.input_queue.qsize()
        s.running = len(self._seen)
        return s

    def close(self) -> None:
        self._stop.set()
        self.manager.stop(block=True, timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _read(self) -> None:
        assert self._sink is not None
        while not self._stop.is_set():
            try:
                out = self.manager.get_result(timeout=0.1)
            except queue.Empty:
                continue
            if out is None:
                continue
            rid = out.request_id
            with self._lock:
                if rid in self._cancelled:
                    if out.is_finished():
                        self._cancelled.discard(rid)
                    continue
                seen = self._seen.get(rid, 0)
                new = out.generated_tokens[seen:]
                finished = out.is_finished()
                if finished:
                    self._seen.pop(rid, None)
                else:
                    self._seen[rid] = len(out.generated_tokens)
                self._stats.generated_tokens += len(new)
            reason = None
            if finished:
                if out.error:
                    reason = "error"
                elif out.generated_tokens and out.generated_tokens[-1] in self.eos_ids:
                    reason = "stop"
                else:
                    reason = "length"
            self._sink(rid, new, finished, f"error: {out.error}" if reason == "error" else reason)
