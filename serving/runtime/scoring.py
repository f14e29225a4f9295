"""Scoring a causal LM on question → answer pairs: the chat formatting shared by training,
evaluation and serving, answer-only labels, and the likelihood of reference answers."""

from __future__ import annotations

from typing import Any


def messages(instruction: str, response: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": instruction}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def tokenize_for_sft(
    rows: list[dict[str, Any]], tokenizer: Any, max_tokens: int
) -> list[dict[str, list[int]]]:
    """input_ids and labels; the prompt's tokens are masked (-100) so only the answer is learned."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            messages(row["instruction"]), tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            messages(row["instruction"], row["response"]), tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_tokens]
        n_prompt = min(len(prompt_ids), len(ids))
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def answer_nll(
    generator: Any, rows: list[dict[str, Any]], batch_size: int = 8
) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference answers' tokens, and their count."""
    import torch

    tok = generator.tokenizer
    examples = tokenize_for_sft(rows, tok, max_tokens=512)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e["input_ids"])) + e["input_ids"] for e in chunk])
        labels = torch.tensor([[-100] * (width - len(e["labels"])) + e["labels"] for e in chunk])
        mask = (
            torch.arange(width)[None, :]
            >= torch.tensor([width - len(e["input_ids"]) for e in chunk])[:, None]
        ).long()
        logits = generator.logits(ids, mask)  # (batch, width, vocab)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    return total, count
