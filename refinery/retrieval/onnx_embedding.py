"""The query side's embedder: the sentence-transformers model exported once to ONNX and run by
onnxruntime with the model's own fast tokenizer, so a query loads neither torch nor
sentence-transformers (about 0.3 s instead of about 5 s from a cold start).

The export lives under the home (``<home>/models/onnx-embedding/<key>/``) and is made by
``ensure_export`` (ingestion calls it; ``refinery query`` makes it on first use). It is checked
against the sentence-transformers model when it is made: vectors of a few sentences must agree
(cosine >= 0.9999), so a query vector from the export searches vectors made by the original.
Only models that are a transformer followed by mean pooling (and optionally normalization) are
exported, which is what all-MiniLM-L6-v2 is; others keep the sentence-transformers path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from refinery.core.lineage import sha256_hex
from refinery.retrieval.embedding import EmbeddingModelRef

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
MANIFEST = "refinery-onnx.json"
_CHECK_SENTENCES = [
    "How long does a worker bee take to develop?",
    "Varroa mites are counted with a sugar roll or an alcohol wash.",
    "x",
    "A longer passage about hive inspections, smoke, frames and brood, " * 6,
]


class ExportError(RuntimeError):
    pass


def export_dir(models_dir: Path, ref: EmbeddingModelRef) -> Path:
    key = sha256_hex(f"{ref.name}\x00{ref.location}\x00{EXPORT_VERSION}")[:16]
    return Path(models_dir) / "onnx-embedding" / key


def find_export(models_dir: Path, ref: EmbeddingModelRef) -> Path | None:
    folder = export_dir(models_dir, ref)
    return folder if (folder / MANIFEST).exists() else None


def _pooling(location: Path) -> tuple[str, bool]:
    """('mean', normalize?) for a transformer + mean pooling model; ExportError otherwise."""
    modules_file = location / "modules.json"
    if not modules_file.exists():
        raise ExportError(f"{location} has no modules.json (not a sentence-transformers folder)")
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in ("Normalize",) for k in kinds[2:]):
        raise ExportError(f"unsupported module stack {kinds}")
    pooling = json.loads((location / modules[1]["path"] / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ExportError(f"unsupported pooling {modes}")
    return "mean", "Normalize" in kinds


def ensure_export(models_dir: Path, embedder: Any) -> Path:
    """The export of ``embedder``'s model, made now if missing (needs torch; ~10 s)."""
    found = find_export(models_dir, embedder.ref)
    if found is not None:
        return found
    return export(models_dir, embedder)


def export(models_dir: Path, embedder: Any) -> Path:
    """Export ``embedder`` (a loaded ``refinery.retrieval.embedding.Embedder``) and check it."""
    ref: EmbeddingModelRef = embedder.ref
    location = Path(ref.location)
    if ref.tokenizer_path is None:
        raise ExportError(f"{ref.name} has no tokenizer.json")
    pooling, normalize = _pooling(location)
    target = export_dir(models_dir, ref)
    target.parent.mkdir(parents=True, exist_ok=True)
    transformer = embedder.transformer.eval()
    max_len = int(embedder.max_seq_length)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        _export_graph(transformer, work / "model.onnx")
        shutil.copy(ref.tokenizer_path, work / "tokenizer.json")
        manifest = {
            "name": ref.name,
            "location": ref.location,
            "dim": int(embedder.dim),
            "max_seq_length": max_len,
            "pooling": pooling,
            "normalize": normalize,
            "export_version": EXPORT_VERSION,
        }
        agreement = _check_against_model(work, manifest, embedder)
        if target.exists():  # made meanwhile by another process
            shutil.rmtree(work, ignore_errors=True)
            return target
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("exported %s to ONNX at %s (check cosine %.6f)", ref.name, target, agreement)
    return target


def _export_graph(transformer: Any, path: Path) -> None:
    """The transformer's token states as an ONNX graph, batch and sequence length dynamic."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]

    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # The TorchScript exporter (3 s here; the dynamo one takes ~30 s) warns about
        # Python conditions it traces; the check below is what proves the graph right.
        warnings.simplefilter("ignore")
        # eval(): the exporter puts every module back in the wrapper's mode afterwards, and a
        # new module is in training mode, which left the shared model with dropout on.
        torch.onnx.export(
            Encoder(transformer).eval(),
            (ids, mask),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes},
            opset_version=17,
        )


def _check_against_model(work: Path, manifest: dict[str, Any], embedder: Any) -> float:
    """Write the manifest, and the export's lowest cosine with the model on the check
    sentences into it; raises ``ExportError`` when they disagree."""
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    check = OnnxEmbedder(work).encode(_CHECK_SENTENCES)
    reference = embedder.encode(_CHECK_SENTENCES)
    agreement = float(np.min(np.sum(check * reference, axis=1)))
    if agreement < 0.9999:
        raise ExportError(f"the ONNX export disagrees with the model (cosine {agreement:.6f})")
    manifest["check_cosine"] = agreement
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return agreement


class OnnxEmbedder:
    """Same contract as ``Embedder.encode``: L2-normalized float32 vectors, shape (n, dim)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.ref = EmbeddingModelRef(self.manifest["name"], self.manifest["location"])
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(self.manifest["max_seq_length"]))
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[start : start + batch_size])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (b, seq)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (b, seq)
            (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
            # mean over real tokens: (b, seq, dim) -> (b, dim)
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            if self.manifest.get("normalize", True):
                pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out.append(pooled.astype(np.float32))
        return np.concatenate(out)
