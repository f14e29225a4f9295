"""Pick and build the backend for a model folder (``REFINERY_ENGINE`` overrides the choice)."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any

from refinery.generation.engine.base import Engine, stop_token_ids

log = logging.getLogger(__name__)


class BackendName(enum.StrEnum):
    auto = "auto"
    openvino = "openvino"  # OpenVINO GenAI continuous batching (CPU, int8/int4 weights)
    hf = "hf"  # transformers' continuous batching (CUDA; CPU without an OpenVINO export)
    static = "static"  # fixed padded batches: every variant; the benchmark's baseline


def choose_backend(
    variant: str, device: str, openvino_dir: Path | None, wanted: str = "auto"
) -> BackendName:
    """``auto``: OpenVINO on a CPU when the version has an OpenVINO export, transformers'
    continuous batching otherwise (and on CUDA); quantized variants run in fixed batches."""
    choice = BackendName(wanted)
    if variant != "none":
        return BackendName.static  # quantized variants have no continuous-batching runtime here
    if choice == BackendName.openvino and openvino_dir is None:
        raise ValueError("REFINERY_ENGINE=openvino, but this model version has no OpenVINO export")
    if choice != BackendName.auto:
        return choice
    if not device.startswith("cuda") and openvino_dir is not None and _has_openvino():
        return BackendName.openvino
    return BackendName.hf


def _has_openvino() -> bool:
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return False
    return True


def load_engine(
    model_dir: str | Path,
    variant: str = "none",
    *,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    max_batch: int = 32,
    openvino_dir: str | Path | None = None,
    **options: Any,
) -> Engine:
    """An engine over the model in ``model_dir`` (safetensors, or a variant's folder), or over
    its OpenVINO export in ``openvino_dir`` (see ``choose_backend``)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    ov_dir = Path(openvino_dir) if openvino_dir else None
    name = choose_backend(variant, device, ov_dir, backend)
    # (the export carries the tokenizer too)
    tokenizer = AutoTokenizer.from_pretrained(ov_dir if name == BackendName.openvino else model_dir)
    eos = stop_token_ids(tokenizer)
    log.info("generation engine: %s backend on %s (%s)", name.value, device, model_dir)
    if name == BackendName.openvino:
        from refinery.generation.engine.ov import OpenVINOBackend

        assert ov_dir is not None  # choose_backend picks openvino only with an export

        return Engine(
            OpenVINOBackend(ov_dir, eos, threads=threads, max_batch=max_batch, **options),
            tokenizer,
        )
    if name == BackendName.hf:
        from refinery.generation.engine.hf import HFBackend

        return Engine(
            HFBackend(model_dir, eos, device=device, threads=threads, max_requests=max_batch),
            tokenizer,
        )
    from refinery.generation.engine.static import StaticBackend
    from refinery.generation.generator import load_generator

    generator = load_generator(model_dir, variant=variant, device=device, threads=threads)
    return Engine(StaticBackend(generator, max_batch=max_batch), tokenizer)
