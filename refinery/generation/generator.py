"""Text generation from a causal LM folder: batched, left-padded generate over chat prompts.

Self-contained on purpose (torch, transformers, numpy, optionally onnxruntime; nothing from
Refinery), because MLflow ships this file inside every registered model (``code_paths``) so a
model loads wherever MLflow runs.

Variants (how the weights are held in memory):
  none        the folder's weights as saved (fp32 safetensors)
  torch-int8  torch dynamic int8 (see ``torch_int8``), applied at load (nothing pickled on disk)
  bnb-nf4     a folder saved by bitsandbytes in 4-bit NF4 (its config says so)
  bnb-int8    a folder saved by bitsandbytes in 8-bit
  onnx-int8   model.onnx (int8 weight blocks, int4 embeddings) run by onnxruntime; no KV cache
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VARIANTS = ("none", "torch-int8", "bnb-nf4", "bnb-int8", "onnx-int8")
ONNX_FILE = "model.onnx"

Message = dict[str, str]


# --- the loop stop ---------------------------------------------------------------------------
# Greedy decoding of a small model can fall into repeating a few tokens until the token limit
# ("... the brood the brood the brood ..."). A run of one cycle of 1-16 tokens repeated so that
# it spans at least MIN_LOOP_TOKENS tokens and LOOP_REPEATS cycles ends the answer, which keeps
# the text up to the end of the run's first cycle. `loop_cut` looks at one prefix length at a
# time, so a backend that hands over several tokens at once (speculative decoding) cuts where
# one that hands over one token at a time does. Used here after generation and by the serving
# engine (refinery.generation.engine.base) as tokens come.
LOOP_REPEATS = 4  # cycles of a run, at least
MIN_LOOP_TOKENS = 12  # tokens a run spans, at least ("the the the …" needs 12)
MAX_PERIOD = 16  # the longest cycle looked for


def loop_cut(
    ids: Sequence[int],
    n: int | None = None,
    repeats: int = LOOP_REPEATS,
    min_tokens: int = MIN_LOOP_TOKENS,
    max_period: int = MAX_PERIOD,
) -> int | None:
    """Where to end ``ids[:n]`` (all of it when n is None) if it ends in a loop: just after
    the first cycle of the periodic run it ends with; None when it does not end in one."""
    n = len(ids) if n is None else n
    for period in range(1, max_period + 1):
        span = max(period * repeats, min_tokens)
        if span > n:
            break
        if all(ids[j] == ids[j - period] for j in range(n - span + period, n)):
            start = n - span
            while start > 0 and ids[start - 1] == ids[start - 1 + period]:
                start -= 1
            return start + period
    return None


def first_loop_cut(ids: Sequence[int], since: int = 0) -> int | None:
    """The cut of the first prefix longer than ``since`` that ends in a loop (``loop_cut``):
    what a decoder that checked after every token would have cut."""
    for n in range(since + 1, len(ids) + 1):
        cut = loop_cut(ids, n)
        if cut is not None:
            return cut
    return None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    seconds: float
    # Log-probability of each kept token under the decoding distribution; only when asked
    # (``generate(..., logprobs=True)``), None otherwise.
    token_logprobs: list[float] | None = None


def per_row(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One token limit per prompt: a batch generates up to the largest and cuts each row to its
    own (greedy rows are unaffected by their neighbours' limits)."""
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != n or any(m < 1 for m in limits):
        raise ValueError(f"need {n} token limits >= 1, got {limits}")
    return limits


def as_messages(prompt: str | list[Message]) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


class _ChatLM:
    """What both backends share: the tokenizer, the chat template, stop tokens, decoding."""

    variant: str

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)

    def chat_text(self, prompt: str | list[Message]) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                as_messages(prompt), tokenize=False, add_generation_prompt=True
            )
        )

    def prompt_ids(self, prompt: str | list[Message]) -> list[int]:
        return list(self.tokenizer(self.chat_text(prompt), add_special_tokens=False)["input_ids"])

    def _pad_left(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        width = max(len(i) for i in prompt_ids)
        pad = self.tokenizer.pad_token_id
        ids = [[pad] * (width - len(i)) + list(i) for i in prompt_ids]
        mask = [[0] * (width - len(i)) + [1] * len(i) for i in prompt_ids]
        return ids, mask

    def _completion(
        self,
        generated: list[int],
        prompt_tokens: int,
        seconds: float,
        logprobs: list[float] | None = None,
    ) -> Completion:
        stop_at = next((j for j, t in enumerate(generated) if t in self.eos_ids), None)
        kept = generated if stop_at is None else generated[:stop_at]
        cut = first_loop_cut(kept)  # the engine's loop stop, applied after the fact
        if cut is not None:
            kept, stop_at = kept[:cut], cut
        return Completion(
            text=str(self.tokenizer.decode(kept, skip_special_tokens=True)).strip(),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept),
            finish_reason="stop" if stop_at is not None else "length",
            seconds=seconds,
            token_logprobs=None if logprobs is None else logprobs[: len(kept)],
        )

    def generate(
        self,
        prompts: list[str | list[Message]],
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        logprobs: bool = False,
    ) -> list[Completion]:
        """One padded batch. Greedy when temperature == 0. ``logprobs=True`` also returns each
        generated token's log-probability (the default path records nothing)."""
        if not prompts:
            return []
        limits = per_row(max_new_tokens, len(prompts))
        ids = [self.prompt_ids(p) for p in prompts]
        t0 = time.perf_counter()
        generated, picked = self._generate(ids, limits, temperature, top_p, seed, logprobs)
        seconds = time.perf_counter() - t0
        return [
            self._completion(g, len(i), seconds, None if picked is None else picked[n])
            for n, (g, i) in enumerate(zip(generated, ids, strict=True))
        ]

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        limits: list[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        """Token ids in, generated ids out (each cut to its own limit): one left-padded batch."""
        return self._generate(prompt_ids, limits, temperature, top_p, seed, False)[0]

    def _generate(
        self,
        prompt_ids: list[list[int]],
        limits: list[int],
        temperature: float,
        top_p: float,
        seed: int | None,
        logprobs: bool,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        raise NotImplementedError


class Generator(_ChatLM):
    """A causal LM and its tokenizer, ready to answer batches of chat prompts."""

    def __init__(
        self,
        model_dir: str | Path,
        variant: str = "none",
        device: str = "cpu",
        threads: int | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        if variant not in VARIANTS or variant == "onnx-int8":
            raise ValueError(
                f"variant must be one of {VARIANTS[:-1]} for Generator, got {variant!r}"
            )
        if threads:
            torch.set_num_threads(threads)
        super().__init__(model_dir)
        self.variant = variant
        kwargs: dict[str, Any] = {"use_safetensors": True}
        if variant in ("bnb-nf4", "bnb-int8"):
            kwargs["device_map"] = "cuda:0" if device.startswith("cuda") else "cpu"
        else:
            kwargs["dtype"] = torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        if variant == "torch-int8":
            model = torch_int8(model)
        elif variant == "none" and device != "cpu":
            model = model.to(device)
        self.model = model.eval()
        self.device = (
            device if variant == "none" else "cpu" if variant == "torch-int8" else str(model.device)
        )

    def _generate(
        self,
        prompt_ids: list[list[int]],
        limits: list[int],
        temperature: float,
        top_p: float,
        seed: int | None,
        logprobs: bool,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        import torch

        ids, mask = self._pad_left(prompt_ids)
        if seed is not None:
            torch.manual_seed(seed)
        extra: dict[str, Any] = {}
        recorder = _LogprobRecorder() if logprobs else None
        if recorder is not None:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([recorder])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor(ids, device=self.device),
                attention_mask=torch.tensor(mask, device=self.device),
                **self._decoding(max(limits), temperature, top_p),
                **extra,
            )
        new = out[:, len(ids[0]) :]  # (batch, generated)
        picked = recorder.finish(out) if recorder is not None else None  # (batch, generated)
        generated = [new[i, : limits[i]].tolist() for i in range(len(prompt_ids))]
        if picked is None:
            return generated, None
        return generated, [picked[i, : limits[i]].tolist() for i in range(len(prompt_ids))]

    def stream(
        self,
        prompt: str | list[Message],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[str]:
        """Text pieces as they are generated (generate runs in a thread; the streamer hands
        decoded text over as soon as it forms whole words)."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        enc = self.tokenizer(
            [self.chat_text(prompt)], return_tensors="pt", add_special_tokens=False
        ).to(self.device)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120
        )

        def run() -> None:
            with torch.inference_mode():
                self.model.generate(
                    **enc, streamer=streamer, **self._decoding(max_new_tokens, temperature, top_p)
                )

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()

    def _decoding(self, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        """``generate`` settings: greedy when temperature == 0, nucleus sampling otherwise."""
        sampling = temperature > 0
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": sampling,
            "temperature": temperature if sampling else None,
            "top_p": top_p if sampling else None,
            "top_k": None,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }

    def logits(self, input_ids: Any, attention_mask: Any) -> Any:
        """(batch, seq, vocab) float32 logits on the CPU."""
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            )
        return out.logits.float().cpu()


class _LogprobRecorder:
    """A logits processor that records the log-probability of each token generate picks.

    Called at step t with the sequences so far (whose last token is the one picked at t-1) and
    step t's scores: it looks that token up in step t-1's distribution, then keeps step t's.
    ``finish`` does the same for the last step with the final sequences."""

    def __init__(self) -> None:
        self.previous: Any = None  # (batch, vocab) log-softmax of the last step
        self.picked: list[Any] = []  # one (batch,) tensor per generated token

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.previous is not None:
            self.picked.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: Any) -> Any:
        import torch

        if self.previous is not None:
            self.picked.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
            self.previous = None
        if not self.picked:
            return torch.zeros((sequences.shape[0], 0))
        return torch.stack(self.picked, dim=1).cpu()  # (batch, generated)


class OnnxGenerator(_ChatLM):
    """An ONNX export (logits from input_ids and attention_mask) run by onnxruntime."""

    variant = "onnx-int8"

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(model_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.model_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )

    def logits(self, input_ids: Any, attention_mask: Any) -> Any:
        import numpy as np
        import torch

        (logits,) = self.session.run(
            None,
            {
                "input_ids": input_ids.numpy().astype(np.int64),
                "attention_mask": attention_mask.numpy().astype(np.int64),
            },
        )
        return torch.from_numpy(logits).float()

    def stream(
        self,
        prompt: str | list[Message],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[str]:
        """No incremental decoding here: the whole answer arrives as one piece."""
        (completion,) = self.generate([prompt], max_new_tokens, temperature, top_p)
        if completion.text:
            yield completion.text

    def _generate(
        self,
        prompt_ids: list[list[int]],
        limits: list[int],
        temperature: float,
        top_p: float,
        seed: int | None,
        logprobs: bool,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        import numpy as np

        rng = np.random.default_rng(seed)
        picked: list[Any] = []  # one (batch,) array of log-probabilities per step
        padded, pad_mask = self._pad_left(prompt_ids)
        ids = np.asarray(padded, dtype=np.int64)
        mask = np.asarray(pad_mask, dtype=np.int64)
        n_prompt = ids.shape[1]
        done = np.zeros(len(prompt_ids), dtype=bool)
        for _ in range(max(limits)):
            # No KV cache in this export: every step runs the whole sequence.
            (logits,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
            last = logits[:, -1, :].astype(np.float64)  # (batch, vocab)
            if temperature > 0:
                probs = np.exp((last - last.max(axis=1, keepdims=True)) / temperature)
                probs /= probs.sum(axis=1, keepdims=True)
                nxt = np.array([rng.choice(len(p), p=_nucleus(p, top_p)) for p in probs])
            else:
                nxt = last.argmax(axis=1)
            if logprobs:
                shifted = last - last.max(axis=1, keepdims=True)
                log_z = np.log(np.exp(shifted).sum(axis=1))
                picked.append(shifted[np.arange(len(nxt)), nxt] - log_z)
            nxt = np.where(done, self.tokenizer.pad_token_id, nxt)
            just_done = np.isin(nxt, self.eos_ids) & ~done
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, (~done).astype(np.int64)[:, None]], axis=1)
            done |= just_done
            if done.all():
                break
        generated = [
            ids[i, n_prompt : n_prompt + limits[i]].tolist() for i in range(len(prompt_ids))
        ]
        if not logprobs:
            return generated, None
        return generated, [
            [float(s[i]) for s in picked][: limits[i]] for i in range(len(prompt_ids))
        ]


def _nucleus(probs: Any, top_p: float) -> Any:
    """Keep the smallest set of tokens whose probability reaches top_p; renormalize."""
    import numpy as np

    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def torch_int8(model: Any) -> Any:
    """torch dynamic int8 with per-channel weight scales on every Linear but the MLP's
    down_proj, whose inputs carry the outliers that int8 activations clip: on SmolLM2-135M
    held-out perplexity is +34% this way, +277% with down_proj quantized too (measured)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("down_proj")
    }
    return quantize_dynamic(model, spec, dtype=torch.qint8)


DEVICES = ("auto", "cpu", "cuda")


def select_device(requested: str, cuda_available: bool) -> str:
    """The device a served model runs on. ``auto``: CUDA where present; ``cuda``: refuse to
    start without it (a GPU pod without a GPU should fail its start-up, not serve on CPU)."""
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested == "cuda" and not cuda_available:
        raise RuntimeError(
            "device 'cuda' was asked for (REFINERY_DEVICE) but no CUDA device is visible"
        )
    return "cuda" if cuda_available and requested != "cpu" else "cpu"


def load_generator(
    model_dir: str | Path, variant: str = "none", device: str = "cpu", threads: int | None = None
) -> Generator | OnnxGenerator:
    if variant == "onnx-int8":
        return OnnxGenerator(model_dir, threads=threads)
    return Generator(model_dir, variant=variant, device=device, threads=threads)
