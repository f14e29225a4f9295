"""The chat model as an OpenVINO model with int8 weights, for the CPU generation engine
(OpenVINO GenAI's continuous batching, ``refinery.generation.engine.ov``).

The exporter (``optimum-intel``) pins ``transformers<5.6`` and declares ``torchvision``, which
the project's environment must not get (it pulls a CUDA build of torch; see ENVIRONMENT.md).
So the export runs in an environment of its own: ``.venv-openvino`` beside the checkout's
``.venv``, built by ``scripts/openvino-export-env.sh`` (which holds its pins; ``make install``
builds it alongside ``.venv``, and the export builds it on first use when it is missing), or
any Python that has those packages, given as ``python`` (``RunSettings.openvino_python``,
``REFINERY_OPENVINO_PYTHON``). The serving side
needs only the OpenVINO runtime, which is in the project's own dependencies, same release.
"""

from __future__ import annotations

import enum
import fcntl
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from refinery.core.lineage import sha256_hex
from refinery.core.processes import child_environment
from refinery.core.settings import OFFLINE_ENV, REPO_ROOT

EXPORT_VENV = REPO_ROOT / ".venv-openvino"
EXPORT_ENV_SCRIPT = REPO_ROOT / "scripts" / "openvino-export-env.sh"  # its pins live there
OPENVINO_VERSION = "2026.4.1"  # the runtime in pyproject.toml must be the same release


class WeightFormat(enum.StrEnum):
    int8 = "int8"  # weight-only int8 (the default: fastest on CPU at 8 or more clients)
    int4 = "int4"  # symmetric, groups of 64
    fp16 = "fp16"


WEIGHT_FORMATS = tuple(f.value for f in WeightFormat)
STAMP = "refinery_export.json"


class ExportError(RuntimeError):
    pass


def export_python(
    progress: Callable[[str], None] | None = None, python: Path | None = None
) -> Path:
    """The interpreter of the export environment: ``python`` when given, else
    ``.venv-openvino``'s, made if it does not exist yet."""
    if python is not None:
        return python
    python = EXPORT_VENV / "bin" / "python"
    cli = EXPORT_VENV / "bin" / "optimum-cli"
    EXPORT_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(REPO_ROOT / ".venv-openvino.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once make it once
        if cli.exists():
            return python
        if progress:
            progress(f"creating the OpenVINO export environment in {EXPORT_VENV} (once)")
        t0 = time.perf_counter()
        _run(["bash", str(EXPORT_ENV_SCRIPT), str(EXPORT_VENV)])
        if progress:
            progress(f"export environment ready in {time.perf_counter() - t0:.0f} s")
    return python


def export_openvino(
    model_dir: Path,
    out_dir: Path,
    weight_format: str = "int8",
    progress: Callable[[str], None] | None = None,
    python: Path | None = None,
) -> tuple[Path, bool]:
    """``model_dir`` (safetensors) as an OpenVINO model in ``out_dir``; reused when it was made
    from the same weights with the same format. Returns (folder, reused). ``python``: the
    exporter's interpreter (default: see ``export_python``)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ExportError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ExportError(f"{model_dir} holds no safetensors weights to export")
    key = sha256_hex(
        json.dumps(
            {
                "weights": [sha256_hex(w.read_bytes()) for w in weights],
                "format": weight_format,
                "openvino": OPENVINO_VERSION,
            }
        )
    )[:20]
    stamp = out_dir / STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return out_dir, True
    python = export_python(progress, python)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cli = [str(python.parent / "optimum-cli"), "export", "openvino"]
    args = ["--model", str(model_dir), "--task", "text-generation-with-past"]
    args += ["--weight-format", weight_format]
    if weight_format == "int4":
        args += ["--sym", "--group-size", "64", "--ratio", "1.0"]
    if progress:
        progress(f"exporting {model_dir.name} to OpenVINO ({weight_format} weights)")
    t0 = time.perf_counter()
    _run([*cli, *args, str(tmp)])
    if not (tmp / "openvino_model.xml").exists():
        raise ExportError(f"the export wrote no openvino_model.xml in {tmp}")
    (tmp / STAMP).write_text(json.dumps({"key": key, "weight_format": weight_format}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # whole, or not at all
    if progress:
        progress(f"OpenVINO export done in {time.perf_counter() - t0:.0f} s")
    return out_dir, False


def _run(cmd: list[str]) -> None:
    env = child_environment(OFFLINE_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise ExportError(
            f"{' '.join(cmd[:6])} … failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )


def truncated_copy(model_dir: Path, out_dir: Path, layers: int) -> Path:
    """A draft model for speculative decoding: the first ``layers`` decoder layers of the model
    with its own embeddings, final norm and output head (same tokenizer), as safetensors.
    Reused when made from the same weights with the same depth."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = sorted(model_dir.glob("*.safetensors"))
    key = sha256_hex(
        json.dumps({"weights": [sha256_hex(w.read_bytes()) for w in weights], "layers": layers})
    )[:20]
    stamp = out_dir / STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return out_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    total = int(model.config.num_hidden_layers)
    if not 1 <= layers < total:
        raise ExportError(f"draft_layers must be between 1 and {total - 1}, got {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps({"key": key, "layers": layers}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
