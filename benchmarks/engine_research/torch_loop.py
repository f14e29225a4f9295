"""A plain PyTorch continuous-batching loop over transformers' Llama classes.

The KV cache is one buffer per layer, ``[slots, kv_heads, max_len, head_dim]``; live sequences
occupy rows ``0..n-1`` (a finished row is refilled by moving the last live row into it, so a
decode step reads a view of the buffer, never a gathered copy). A decode step feeds one token
per live row with its own position and a 4-D boolean mask ``[n, 1, 1, L]`` (transformers passes
a 4-D mask through untouched). A joining request is prefilled alone between decode steps, into
its row, after an optional copy of the KV of the prompt prefix that every chat request shares
(the chat template's system turn). Greedy only.

``python -m benchmarks.engine_research.torch_loop [fp32|bf16|int8 ...]``
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch


class SlotCache:
    """Duck-types the one method Llama's attention calls on a cache: ``update``."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype) -> None:  # fmt: skip
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        # set before each forward:
        self.decode = True
        self.n = 0  # decode: live rows
        self.pos: torch.Tensor = torch.zeros(0, dtype=torch.long)  # decode: write position per row
        self.length = 0  # decode: keys to attend over (max position + 1)
        self.row = 0  # prefill: the row being filled
        self.start = 0  # prefill: first position written

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.decode:
            rows = torch.arange(self.n)
            # key: [n, kv_heads, 1, head_dim] -> one position per row
            k[rows, :, self.pos] = key[:, :, 0].to(k.dtype)
            v[rows, :, self.pos] = value[:, :, 0].to(v.dtype)
            return k[: self.n, :, : self.length], v[: self.n, :, : self.length]
        # prefill: key [rows, kv_heads, width, head_dim] into rows row.., positions start..
        end, last = self.start + key.shape[2], self.row + key.shape[0]
        k[self.row : last, :, self.start : end] = key.to(k.dtype)
        v[self.row : last, :, self.start : end] = value.to(v.dtype)
        return k[self.row : last, :, :end], v[self.row : last, :, :end]

    def move(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


@dataclass
class Sequence:
    rid: int
    prompt: list[int]
    max_new: int
    out: list[int] = field(default_factory=list)
    pos: int = 0  # next position to write


class LoopEngine:
    def __init__(self, model, slots: int = 32, max_len: int = 512, prefix: list[int] | None = None,
                 eos: set[int] | None = None, batch_prefill: bool = False) -> None:  # fmt: skip
        cfg = model.config
        self.model = model
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = SlotCache(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len,
                               head_dim, torch.float32 if self.dtype == torch.qint8 else self.dtype)  # fmt: skip
        self.slots = slots
        self.max_len = max_len
        self.eos = eos or set()
        self.live: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.done: dict[int, list[int]] = {}
        self.batch_prefill = batch_prefill
        self.prefix: list[int] = []
        self.prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        if prefix:
            self._cache_prefix(prefix)

    @torch.inference_mode()
    def _cache_prefix(self, prefix: list[int]) -> None:
        c = self.cache
        c.decode, c.row, c.start = False, 0, 0
        self._forward(
            torch.tensor([prefix]), torch.arange(len(prefix))[None], self._causal(0, len(prefix))
        )
        self.prefix = list(prefix)
        self.prefix_kv = (c.k[:, 0, :, : len(prefix)].clone(), c.v[:, 0, :, : len(prefix)].clone())

    @staticmethod
    def _causal(start: int, n: int) -> torch.Tensor:
        # [1, 1, n, start + n]: query i (at position start + i) sees keys 0..start + i
        q = torch.arange(start, start + n)[:, None]
        kpos = torch.arange(start + n)[None, :]
        return (kpos <= q)[None, None]

    def _forward(self, ids, positions, mask):
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1]

    def add(self, rid: int, prompt: list[int], max_new: int) -> None:
        if len(prompt) + max_new > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} + {max_new} new tokens > {self.max_len}")
        self.waiting.append(Sequence(rid, prompt, max_new))

    @torch.inference_mode()
    def _admit(self, seq: Sequence) -> None:
        c = self.cache
        row = len(self.live)
        start = 0
        n_pre = len(self.prefix)
        if (
            self.prefix_kv is not None
            and seq.prompt[:n_pre] == self.prefix
            and len(seq.prompt) > n_pre
        ):
            c.k[:, row, :, :n_pre] = self.prefix_kv[0]
            c.v[:, row, :, :n_pre] = self.prefix_kv[1]
            start = n_pre
        rest = seq.prompt[start:]
        c.decode, c.row, c.start = False, row, start
        logits = self._forward(
            torch.tensor([rest]),
            torch.arange(start, len(seq.prompt))[None],
            self._causal(start, len(rest)),
        )
        seq.out.append(int(logits.argmax(-1)))
        seq.pos = len(seq.prompt)
        self.live.append(seq)

    @torch.inference_mode()
    def _admit_batch(self, seqs: list[Sequence]) -> None:
        """Prefill several joining requests in one forward: right-padded to the longest, a
        plain causal mask (a real query never reaches a pad key), logits only at each row's
        last real token."""
        c = self.cache
        row0, k = len(self.live), len(seqs)
        n_pre = len(self.prefix)
        start = 0
        if self.prefix_kv is not None and all(
            s.prompt[:n_pre] == self.prefix and len(s.prompt) > n_pre for s in seqs
        ):
            c.k[:, row0 : row0 + k, :, :n_pre] = self.prefix_kv[0][:, None]
            c.v[:, row0 : row0 + k, :, :n_pre] = self.prefix_kv[1][:, None]
            start = n_pre
        rests = [s.prompt[start:] for s in seqs]
        width = max(len(r) for r in rests)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rests])
        positions = torch.arange(start, start + width)[None].expand(k, width)
        mask = self._causal(start, width).expand(k, 1, width, start + width)
        c.decode, c.row, c.start = False, row0, start
        hidden = self.model.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                  past_key_values=c, use_cache=True).last_hidden_state  # fmt: skip
        lens = torch.tensor([len(r) for r in rests])
        logits = self.model.lm_head(hidden[torch.arange(k), lens - 1])  # [k, vocab]
        for s, t in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            s.out.append(t)
            s.pos = len(s.prompt)
            self.live.append(s)

    def _retire(self) -> None:
        i = 0
        while i < len(self.live):
            s = self.live[i]
            if len(s.out) >= s.max_new or (s.out and s.out[-1] in self.eos):
                self.done[s.rid] = s.out
                last = len(self.live) - 1
                if i != last:
                    self.cache.move(last, i)
                    self.live[i] = self.live[last]
                self.live.pop()
            else:
                i += 1

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, one decode step for every live row, retire the finished ones."""
        if self.batch_prefill and self.waiting and len(self.live) < self.slots:
            free = self.slots - len(self.live)
            self._admit_batch([self.waiting.popleft() for _ in range(min(free, len(self.waiting)))])
        while self.waiting and len(self.live) < self.slots:
            self._admit(self.waiting.popleft())
        self._retire()
        if not self.live:
            return
        c = self.cache
        n = len(self.live)
        pos = torch.tensor([s.pos for s in self.live])
        c.decode, c.n, c.pos = True, n, pos
        c.length = int(pos.max()) + 1
        mask = (torch.arange(c.length)[None, :] <= pos[:, None])[:, None, None, :]
        ids = torch.tensor([[s.out[-1]] for s in self.live])
        logits = self._forward(ids, pos[:, None], mask)
        nxt = logits.argmax(-1).tolist()
        for s, t in zip(self.live, nxt, strict=True):
            s.out.append(t)
            s.pos += 1
        self._retire()

    def run(self) -> None:
        while self.live or self.waiting:
            self.step()


def load(kind: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.engine_research.common import model_dir

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa"
    ).eval()
    if kind in ("int8", "int8h"):
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # int8h keeps the output projection (lm_head) in fp32
        spec = {
            name: per_channel_dynamic_qconfig
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and not (kind == "int8h" and name == "lm_head")
        }
        model = quantize_dynamic(model, spec, dtype=torch.qint8)
    return model, tok


def template_prefix(tok) -> list[int]:
    """The tokens every chat prompt starts with (the template up to the user's text)."""
    from benchmarks.engine_research.common import prompt_ids

    a, b = prompt_ids(tok, 2, "prefix-probe")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    # stop before the user's text: the '[' of the nonce may merge with what precedes it
    return a[: max(n - 1, 0)]


def check(n: int = 6, new: int = 24) -> None:
    """The loop's greedy tokens equal transformers' generate, one prompt at a time (fp32), with
    requests joining mid-stream (fewer slots than requests) and the shared-prefix copy on."""
    from benchmarks.engine_research.common import prompt_ids

    torch.set_num_threads(2)
    model, tok = load("fp32")
    prompts = prompt_ids(tok, n, "check")
    engines = []
    for bp in (False, True):
        engine = LoopEngine(
            model, slots=3, max_len=256, prefix=template_prefix(tok), batch_prefill=bp
        )
        for i, p in enumerate(prompts):
            engine.add(i, p, new if i % 2 else new // 2)
        engine.run()
        engines.append(engine)
    ties = 0
    # the loop neither stops at nor suppresses EOS: generate the same way
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id or 0
    for i, p in enumerate(prompts):
        n_new = new if i % 2 else new // 2
        with torch.inference_mode():
            ref = model.generate(torch.tensor([p]), max_new_tokens=n_new, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)  # fmt: skip
        ref_new = ref.sequences[0, len(p) :].tolist()
        for engine in engines:
            ties += _compare(i, engine.done[i], ref_new, ref.scores)
    print(
        f"check: {n} prompts match generate ({ties} near-ties); prefix {len(engine.prefix)} tokens"
    )


def _compare(i: int, got: list[int], ref_new: list[int], scores) -> int:
    """0 when identical, 1 for a flip between two tokens within 1e-3 logits (a batched step
    sums in another order than a lone one); anything else fails."""
    if got == ref_new:
        return 0
    j = next(k for k, (a, b) in enumerate(zip(got, ref_new, strict=True)) if a != b)
    top2 = scores[j][0].topk(2).values
    margin = float(top2[0] - top2[1])
    if margin > 1e-3:
        raise AssertionError(f"prompt {i}: loop {got} != generate {ref_new} (margin {margin})")
    print(f"prompt {i}: near-tie at token {j} (top-2 logit margin {margin:.2e})")
    return 1


def profile(kind: str = "int8", n: int = 32) -> None:
    """Where the time of one all-at-once round goes: prefills vs decode steps."""
    from benchmarks.engine_research.common import NEW_TOKENS, prompt_ids

    torch.set_num_threads(2)
    model, tok = load(kind)
    engine = LoopEngine(model, slots=32, max_len=256, prefix=template_prefix(tok))
    spent = {"prefill": 0.0, "decode": 0.0}
    admit, step_ = engine._admit, LoopEngine.step

    def timed_admit(seq):
        t = time.perf_counter()
        admit(seq)
        spent["prefill"] += time.perf_counter() - t

    engine._admit = timed_admit  # type: ignore[method-assign]
    for warm in (True, False):
        spent.update(prefill=0.0, decode=0.0)
        for i, p in enumerate(prompt_ids(tok, n, f"profile-{warm}")):
            engine.add(i, p, NEW_TOKENS)
        t0 = time.perf_counter()
        steps = 0
        while engine.live or engine.waiting:
            step_(engine)
            steps += 1
        wall = time.perf_counter() - t0
    spent["decode"] = wall - spent["prefill"]
    lens = [len(p) - len(engine.prefix) for p in prompt_ids(tok, n, "profile-x")]
    print(f"profile {kind} n={n}: wall {wall:.2f} s, prefill {spent['prefill']:.2f} s "
          f"({sum(lens)} tokens after the {len(engine.prefix)}-token shared prefix), decode "
          f"{spent['decode']:.2f} s over {steps} steps ({spent['decode'] / steps * 1000:.0f} ms/step)")  # fmt: skip


def main(kinds: list[str]) -> None:
    """Each kind is fp32|bf16|int8, optionally with +bp (prefill joining requests in one
    forward) and +np (no shared-prefix copy)."""
    from benchmarks.engine_research.common import NEW_TOKENS, measure, save

    torch.set_num_threads(2)
    results = {}
    for name in kinds:
        base, *flags = name.split("+")
        model, tok = load(base)
        prefix = None if "np" in flags else template_prefix(tok)

        def run(prompts, model=model, prefix=prefix, bp="bp" in flags):
            engine = LoopEngine(model, slots=32, max_len=256, prefix=prefix, batch_prefill=bp)
            for i, p in enumerate(prompts):
                engine.add(i, p, NEW_TOKENS)
            engine.run()
            return sum(len(v) for v in engine.done.values())

        t0 = time.perf_counter()
        results[f"torch-loop-{name}"] = measure(f"torch-loop-{name}", run, tok)
        print(f"torch-loop-{name} took {time.perf_counter() - t0:.0f} s", flush=True)
    save("torch_loop_" + "_".join(k.replace("+", "-") for k in kinds), results)


if __name__ == "__main__":
    if sys.argv[1:] == ["check"]:
        check()
    elif sys.argv[1:2] == ["profile"]:
        for k in sys.argv[2:] or ["fp32", "int8"]:
            for n in (1, 32):
                profile(k, n)
    else:
        main(sys.argv[1:] or ["fp32", "fp32+np", "bf16", "int8"])
