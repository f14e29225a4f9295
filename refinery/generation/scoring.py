"""Scoring a causal LM on question → answer pairs: the chat formatting shared by training,
evaluation and serving, answer-only labels, and the likelihood of reference answers."""

from __future__ import annotations

from typing import Any


def messages(instruction: str, response: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": instruction}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def row_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    """The messages a training or evaluation row asks with: its ``prompt`` (a system turn and
    the documents, as ``/rag`` serves them) when it has one, else its bare ``instruction``."""
    prompt = row.get("prompt")
    if prompt:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    return messages(row["instruction"])


def row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The row's prompt followed by its reference ``response`` as the assistant's turn."""
    return [*row_prompt(row), {"role": "assistant", "content": row["response"]}]


def tokenize_for_sft(
    rows: list[dict[str, Any]], tokenizer: Any, max_tokens: int
) -> list[dict[str, list[int]]]:
    """input_ids and labels; the prompt's tokens are masked (-100) so only the answer is learned."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            row_prompt(row), tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(row_messages(row), tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_tokens]
        n_prompt = min(len(prompt_ids), len(ids))
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def answer_nll(
    generator: Any, rows: list[dict[str, Any]], batch_size: int = 8
) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference answers' tokens, and their count."""
    per_row = answer_nll_rows(generator, rows, batch_size)
    return sum(n for n, _ in per_row), sum(c for _, c in per_row)


def answer_nll_rows(
    generator: Any, rows: list[dict[str, Any]], batch_size: int = 8
) -> list[tuple[float, int]]:
    """Per row, in order: the summed negative log-likelihood of its reference answer's tokens
    and their count (a paired comparison of two models resamples these)."""
    import torch

    tok = generator.tokenizer
    examples = tokenize_for_sft(rows, tok, max_tokens=2048)
    out: list[tuple[float, int]] = []
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
        targets = labels[:, 1:]  # (batch, width - 1)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).reshape(targets.shape)  # (batch, width - 1); 0 where ignored
        counts = (targets != -100).sum(dim=1)  # (batch,)
        out += [(float(n), int(c)) for n, c in zip(loss.sum(dim=1), counts, strict=True)]
    return out


class QueryLikelihoodReranker:
    """Reranks passages by how likely the causal LM finds the question after reading each one:
    the mean log-probability of the question's tokens given "Passage: ... Question:" (query
    likelihood, as in unsupervised passage reranking). Works with any chat/causal LM the
    runtime loads (``Generator.logits``); no reranker weights need to ship."""

    def __init__(self, generator: Any, *, max_passage_tokens: int = 320, name: str = ""):
        self.generator = generator
        self.max_passage_tokens = max_passage_tokens
        self.name = name or f"query-likelihood:{getattr(generator, 'model_dir', 'lm')}"

    def score(self, question: str, passages: list[str] | Any) -> list[float]:
        import torch

        tok = self.generator.tokenizer
        q_ids = tok(" " + question.strip(), add_special_tokens=False)["input_ids"]
        rows, n_question = [], len(q_ids)
        for passage in passages:
            p_ids = tok("Passage: " + passage.strip(), add_special_tokens=False, truncation=False)[
                "input_ids"
            ][: self.max_passage_tokens]
            suffix = tok("\nA question this passage answers:", add_special_tokens=False)[
                "input_ids"
            ]
            rows.append(p_ids + suffix + q_ids)
        if not rows:
            return []
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (n, width), left pad
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        logits = self.generator.logits(ids, mask)  # (n, width, vocab)
        logprobs = torch.log_softmax(logits[:, -n_question - 1 : -1].float(), dim=-1)
        target = ids[:, -n_question:]  # the question's tokens, the same in every row
        picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (n, n_question)
        return [float(x) for x in picked.mean(dim=1)]
