"""The instruction dataset: JSONL rows validated, formatted with the model's chat template,
split with a fixed seed, and hashed.

Each row is ``{"instruction": str, "response": str, ...}``; other fields (id, source) ride
along for lineage. Bad rows are dropped and counted by reason, never fatal; a dataset with no
usable row is.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery.core.artifacts import ARTIFACT
from refinery.core.jsonl import json_objects
from refinery.core.lineage import sha256_hex
from refinery.core.settings import REPO_ROOT
from refinery.generation.scoring import row_messages

DEFAULT_SFT_PATH = REPO_ROOT / "data" / "sft" / "beekeeping_qa.jsonl"


class DatasetError(ValueError):
    """The dataset cannot be used at all; the message says what to fix."""


@dataclass(frozen=True)
class SFTConfig:
    path: str = str(DEFAULT_SFT_PATH)
    eval_fraction: float = 0.1
    seed: int = 42
    max_instruction_chars: int = 1000
    max_response_chars: int = 2000
    max_tokens: int = 256  # prompt + response, in the base model's tokens

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 0.5:
            raise DatasetError(f"eval_fraction must be in (0, 0.5), got {self.eval_fraction}")
        if self.max_tokens < 16:
            raise DatasetError(f"max_tokens must be at least 16, got {self.max_tokens}")


@dataclass
class SFTDataset:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    content_hash: str
    rows_read: int
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def rows_kept(self) -> int:
        return len(self.train) + len(self.eval)


def _normalized(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def read_rows(
    path: Path, max_instruction_chars: int = 1000, max_response_chars: int = 2000
) -> tuple[list[dict[str, Any]], int, Counter[str]]:
    """Parse and validate the JSONL file; return the good rows, rows read, drops by reason."""
    if not path.exists():
        raise DatasetError(f"SFT dataset {path} does not exist")
    if path.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"SFT dataset {path} must be a JSON Lines file (.jsonl)")
    dropped: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"SFT dataset {path} is not UTF-8 text: {err}") from err
    n = sum(1 for line in lines if line.strip())
    for row in json_objects(lines, dropped):
        instruction, response = row.get("instruction"), row.get("response")
        if not isinstance(instruction, str) or not isinstance(response, str):
            dropped["missing_field"] += 1
            continue
        instruction, response = instruction.strip(), response.strip()
        if not instruction or not response:
            dropped["empty_field"] += 1
            continue
        if len(instruction) > max_instruction_chars or len(response) > max_response_chars:
            dropped["too_long"] += 1
            continue
        key = _normalized(instruction)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        rows.append({**row, "instruction": instruction, "response": response})
    if n == 0:
        raise DatasetError(f"SFT dataset {path} is empty")
    return rows, n, dropped


# Rows -> (rows in another format, rows dropped by reason): ``training.rag_sft.rag_rows``.
RowFormat = Callable[[list[dict[str, Any]]], tuple[list[dict[str, Any]], Counter[str]]]


def build_dataset(
    config: SFTConfig,
    tokenizer: Any,
    extra: Sequence[dict[str, Any]] = (),
    row_format: RowFormat | None = None,
) -> SFTDataset:
    """Validate, drop rows too long for ``max_tokens`` once formatted, split, hash.

    ``extra``: approved user examples (``training.user_data.approved_examples``), validated
    like file rows and kept with their ``source`` and ``example_id``. ``row_format``: turns
    the file's rows into the served prompt format (``training.rag_sft``); its drops are
    counted with the others. The hash covers the formatted rows, chunks included.
    """
    path = Path(config.path)
    rows, n, dropped = read_rows(path, config.max_instruction_chars, config.max_response_chars)
    if row_format is not None:
        rows, format_dropped = row_format(rows)
        dropped.update(format_dropped)
    seen = {_normalized(r["instruction"]) for r in rows}
    for row in extra:
        n += 1
        instruction = str(row.get("instruction") or "").strip()
        response = str(row.get("response") or "").strip()
        if not instruction or not response:
            dropped["user_empty_field"] += 1
        elif (
            len(instruction) > config.max_instruction_chars
            or len(response) > config.max_response_chars
        ):
            dropped["user_too_long"] += 1
        elif _normalized(instruction) in seen:
            dropped["user_duplicate"] += 1
        else:
            seen.add(_normalized(instruction))
            rows.append({**row, "instruction": instruction, "response": response})
    kept = []
    for row in rows:
        text = tokenizer.apply_chat_template(row_messages(row), tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > config.max_tokens:
            dropped["too_many_tokens"] += 1
            continue
        kept.append(row)
    if len(kept) < 4:
        raise DatasetError(
            f"SFT dataset {path}: only {len(kept)} usable rows of {n} (dropped: {dict(dropped)}); "
            "need at least 4"
        )
    order = list(range(len(kept)))
    random.Random(config.seed).shuffle(order)
    n_eval = max(1, round(len(kept) * config.eval_fraction))
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(kept) if i not in eval_idx]
    evals = [r for i, r in enumerate(kept) if i in eval_idx]
    canonical = json.dumps(
        {"train": train, "eval": evals, "max_tokens": config.max_tokens},
        sort_keys=True,
        ensure_ascii=False,
    )
    return SFTDataset(train, evals, sha256_hex(canonical), n, dropped)


def save_dataset(ds: SFTDataset, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", ds.train), ("eval", ds.eval)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "manifest.json").write_text(
        json.dumps(
            {"content_hash": ds.content_hash, "rows_read": ds.rows_read, "dropped": dict(ds.dropped),
             "train": len(ds.train), "eval": len(ds.eval)},
            indent=2,
        )
    )  # fmt: skip


def load_split(folder: Path, split: str) -> list[dict[str, Any]]:
    path = folder / f"{split}.jsonl"
    if not path.exists():
        raise DatasetError(f"{path} is missing: materialize sft_dataset first")
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


@dataclass(frozen=True)
class SFTDatasetRef:
    """The hand-off of the ``sft_dataset`` step: where the splits are and what they hold."""

    path: str = field(metadata=ARTIFACT)  # folder with train.jsonl and eval.jsonl
    source: str  # the JSONL file it was built from
    content_hash: str
    rows_read: int
    train_rows: int
    eval_rows: int
    dropped: dict[str, int]
    user_example_sources: tuple[str, ...]  # approved user examples it contains

    def split(self, name: str) -> list[dict[str, Any]]:
        return load_split(Path(self.path), name)


def prepare_sft_dataset(
    config: SFTConfig,
    base_model_dir: str,
    user_rows: Sequence[dict[str, Any]],
    datasets_dir: Path,
    run: Any,
    row_format: RowFormat | None = None,
) -> SFTDatasetRef:
    """Build, save and record the dataset: counts, hash and the approved user examples it
    contains (ids, sources, reviewers) go to the MLflow run ``run`` (a ``TrackedRun``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    ds = build_dataset(config, tokenizer, extra=user_rows, row_format=row_format)
    folder = datasets_dir / "sft" / ds.content_hash[:16]
    save_dataset(ds, folder)
    used = sorted(
        (r for r in (*ds.train, *ds.eval) if r.get("example_id")), key=lambda r: r["example_id"]
    )
    run.log_metrics(
        {
            "rows_read": ds.rows_read,
            "train_rows": len(ds.train),
            "eval_rows": len(ds.eval),
            **{f"dropped_{k}": v for k, v in ds.dropped.items()},
            **{
                f"rows_{k}": v
                for k, v in Counter(r.get("kind", "closed_book") for r in ds.train).items()
            },
        }
    )
    run.log_dict(ds.train[:5], "sft_examples.json")  # what the model is taught, to read
    run.set_tags(
        {
            "refinery.sft_dataset_hash": ds.content_hash,
            "refinery.user_examples": str(len(used)),
            "refinery.user_examples_hash": sha256_hex(",".join(r["example_id"] for r in used))[:16],
        }
    )
    run.log_dict(
        [{k: r[k] for k in ("example_id", "source", "reviewed_by")} for r in used],
        "user_examples.json",
    )
    return SFTDatasetRef(
        path=str(folder),
        source=config.path,
        content_hash=ds.content_hash,
        rows_read=ds.rows_read,
        train_rows=len(ds.train),
        eval_rows=len(ds.eval),
        dropped=dict(ds.dropped),
        user_example_sources=tuple(sorted(r["source"] for r in used)),
    )
