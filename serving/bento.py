"""Build a Bento of the champion: the registry version an alias points to, pinned.

1. Resolve the alias to a version (``refinery.core.registry.resolve``) and download that version.
2. Stage a build context: the service's sources, ``deploy/bentofile.yaml`` and
   ``serving/pins.json`` (which model versions and BentoML model tags the service loads).
3. In a child process with ``BENTOML_HOME`` set (BentoML fixes its store once per process),
   copy the chat and embedding models into the BentoML model store and build the Bento.

A Bento already built for the same version, embedding model and sources is reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refinery.core.processes import child_environment
from refinery.core.registry import (
    CHAMPION,
    ModelNotFoundError,
    NotAChatModel,
    artifact_uri,
    read_model_folder,
    resolve,
)
from refinery.core.settings import OFFLINE_ENV, REPO_ROOT, ServingSettings, Settings
from refinery.retrieval.embedding import resolve_embedding_model

BENTOFILE = REPO_ROOT / "deploy" / "bentofile.yaml"
IMAGE_MODEL = "refinery-image"  # the registered image model a Bento serves, if promoted
SERVICE_NAME = "refinery"  # the @bentoml.service name, and so the Bento's name
PINS_FILE = Path(__file__).resolve().parent / "pins.json"  # serving/pins.json
STAGED = {
    "serving": "**/*.py",
    # The domain packages the service runs; not refinery/ingestion (the Bento never ingests).
    "refinery": "*.py",
    "refinery/core": "*.py",
    "refinery/corpus": "*.py",  # parsing and OCR of images in requests
    "refinery/retrieval": "*.py",
    "refinery/generation": "**/*.py",
    "refinery/safety": "**/*.py",
    "refinery/rag": "*.py",
    "refinery/vision": "*.py",
    "data/guard": "*.*",  # the guard's and the document screen's weights (.npz, .json)
    "data/rag": "*.json",  # the RAG confidence model's coefficients
    "data/vision": "*.txt",  # ImageNet class names for the labels of images in requests
}


class BentoBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pins:
    """What a Bento serves. Read by ``serving.service`` when it is imported."""

    registered_model: str
    model_version: str
    run_id: str
    variant: str
    chat_model_tag: str
    embedding_model: str  # the name the vectors were made under
    embedding_model_tag: str
    refinery_home: str  # default home of the stores (REFINERY_HOME overrides)
    # The image model's champion, when one exists ("" otherwise: no image generation).
    image_model: str = ""
    image_model_version: str = ""
    image_model_tag: str = ""

    @property
    def model_label(self) -> str:
        return f"{self.registered_model}/{self.model_version}"

    @property
    def image_label(self) -> str:
        return f"{self.image_model}/{self.image_model_version}" if self.image_model_tag else ""

    def labels(self) -> dict[str, str]:
        return {
            "refinery.registered_model": self.registered_model,
            "refinery.model_version": self.model_version,
            "refinery.run_id": self.run_id,
            "refinery.variant": self.variant,
            "refinery.embedding_model": self.embedding_model,
            "refinery.image_model": self.image_label or "none",
        }

    @classmethod
    def load(cls, path: Path = PINS_FILE) -> Pins | None:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


@functools.cache
def service_settings() -> ServingSettings:
    """This process's serving settings, read from the environment on the first call.

    BentoML fixes a service's workers, logging and adaptive batching when its class is
    defined, so ``serving.service`` and ``serving.generations`` call this at class definition:
    the one place the serving side reads its settings at import, on purpose. (BentoML's own
    ``BENTOML_CONFIG_OPTIONS`` could set the workers and the access log, but not under the
    REFINERY_* names that deploy/ and the benchmarks set, nor the batching of an API.) The
    services' ``__init__`` take the same object, so a process reads its settings once.
    """
    return ServingSettings.from_env()


@dataclass(frozen=True)
class BuiltBento:
    tag: str
    path: str
    pins: Pins
    reused: bool
    # The image a deployment of this Bento uses: `bentoml containerize <tag>` tags it so, and
    # `refinery deploy render` puts it in the Kubernetes manifests (never `latest`).
    image: str = ""


def bento_tag_part(text: str) -> str:
    """BentoML names: lower-case letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def read_mlflow_model(folder: Path) -> tuple[Path, str]:
    """The weights folder and variant of a downloaded Refinery pyfunc model."""
    try:
        local = read_model_folder(folder)
    except NotAChatModel as err:
        raise BentoBuildError(str(err)) from err
    return local.weights, local.variant


def sources_hash() -> str:
    digest = hashlib.sha256(BENTOFILE.read_bytes())
    for folder, pattern in sorted(STAGED.items()):
        for path in sorted((REPO_ROOT / folder).glob(pattern)):
            if path.name != PINS_FILE.name and "__pycache__" not in path.parts:
                digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _stage(ctx: Path, pins: Pins) -> None:
    for folder, pattern in STAGED.items():
        for path in (REPO_ROOT / folder).glob(pattern):
            if path.name != PINS_FILE.name and "__pycache__" not in path.parts:
                target = ctx / path.relative_to(REPO_ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    shutil.copy2(BENTOFILE, ctx / "bentofile.yaml")
    (ctx / "serving" / PINS_FILE.name).write_text(json.dumps(asdict(pins), indent=2))


def _child_env(settings: Settings) -> dict[str, str]:
    return child_environment(
        {
            **OFFLINE_ENV,
            "BENTOML_HOME": str(settings.bentoml_home),
            "REFINERY_HOME": str(settings.home),
        }
    )


def find_bento(settings: Settings, labels: dict[str, str]) -> dict[str, Any] | None:
    """The newest Bento in this home's store whose labels include ``labels``."""
    for info in list_bentos(settings):
        if all(info["labels"].get(k) == v for k, v in labels.items()):
            return info
    return None


def list_bentos(settings: Settings) -> list[dict[str, Any]]:
    """Refinery Bentos in this home's store, newest first (read from their bento.yaml)."""
    import yaml

    root = settings.bentoml_home / "bentos" / SERVICE_NAME
    found = []
    for manifest in root.glob("*/bento.yaml") if root.exists() else []:
        info = yaml.safe_load(manifest.read_text()) or {}
        found.append(
            {
                "tag": f"{info.get('name')}:{info.get('version')}",
                "path": str(manifest.parent),
                "labels": {str(k): str(v) for k, v in (info.get("labels") or {}).items()},
                "created": str(info.get("creation_time", "")),
            }
        )
    return sorted(found, key=lambda b: b["created"], reverse=True)


def build_bento(
    settings: Settings,
    tracking_uri: str,
    registered_model: str,
    alias: str = CHAMPION,
    embedding_model: str | None = None,
    image_model: str = IMAGE_MODEL,
) -> BuiltBento:
    """``image_model``: the registered image model whose champion the Bento serves beside the
    chat model, if it has one ("" for none)."""
    ref = resolve(tracking_uri, registered_model, alias)
    image = _image_champion(tracking_uri, image_model)
    emb = resolve_embedding_model(embedding_model)
    code = sources_hash()
    pins = _pins(settings, ref, image, emb)
    labels = {**pins.labels(), "refinery.sources": code}
    existing = find_bento(settings, labels)
    if existing is not None:
        return BuiltBento(
            existing["tag"], existing["path"], pins, reused=True, image=existing["tag"]
        )
    if not Path(emb.location).exists():
        raise BentoBuildError(
            f"embedding model {emb.name!r} is not a local folder ({emb.location}): a Bento "
            "packages its models, so give a path"
        )
    proc = _build_in_child(settings, tracking_uri, ref, image, emb.location, pins, labels)
    if proc.returncode != 0:
        raise BentoBuildError(f"bentoml build failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return BuiltBento(out["tag"], out["path"], pins, reused=False, image=out["tag"])


def _pins(settings: Settings, ref: Any, image: Any, emb: Any) -> Pins:
    """The pins of a Bento of ``ref`` (and ``image``, if any): model tags that name the exact
    versions, so a new version is a new model in the store, never an overwrite."""
    emb_version = hashlib.sha256(f"{emb.name}|{emb.location}".encode()).hexdigest()[:12]
    return Pins(
        registered_model=ref.name,
        model_version=ref.version,
        run_id=ref.run_id,
        variant=ref.tags.get("refinery.variant", "none"),
        chat_model_tag=f"{bento_tag_part(ref.name)}:v{ref.version}-{ref.run_id[:8] or 'x'}",
        embedding_model=emb.name,
        embedding_model_tag=f"{bento_tag_part(Path(emb.name).name)}:{emb_version}",
        refinery_home=str(settings.home),
        image_model=image.name if image else "",
        image_model_version=image.version if image else "",
        image_model_tag=f"{bento_tag_part(image.name)}:v{image.version}-{image.run_id[:8] or 'x'}"
        if image
        else "",
    )


def _build_in_child(
    settings: Settings,
    tracking_uri: str,
    ref: Any,
    image: Any,
    embedding_dir: str,
    pins: Pins,
    labels: dict[str, str],
) -> subprocess.CompletedProcess[str]:
    """Download the models, stage the build context and run ``_package`` in a child process
    (BentoML fixes its store once per process); the temporary folder goes when it is done."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="refinery-bento-") as tmp:
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri(tracking_uri, ref),
                tracking_uri=tracking_uri,
                dst_path=str(Path(tmp) / "dl"),
            )
        )
        read_mlflow_model(model_dir)  # fail here, not in the service, if it is not ours
        image_dir = ""
        if image is not None:
            image_dir = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri(tracking_uri, image), tracking_uri=tracking_uri,
                dst_path=str(Path(tmp) / "image"),
            )  # fmt: skip
            read_mlflow_model(Path(image_dir))
        ctx = Path(tmp) / "ctx"
        _stage(ctx, pins)
        job = {
            "ctx": str(ctx),
            "chat_dir": str(model_dir),
            "embedding_dir": embedding_dir,
            "image_dir": image_dir,
            "labels": labels,
        }
        return subprocess.run(
            [sys.executable, "-m", "serving.bento", json.dumps(job)],
            cwd=ctx,
            env=_child_env(settings),
            capture_output=True,
            text=True,
            check=False,
        )


def _image_champion(tracking_uri: str, name: str) -> Any:
    """The image model's champion version, or None (none registered, or none promoted)."""
    if not name:
        return None
    try:
        return resolve(tracking_uri, name, CHAMPION)
    except ModelNotFoundError:
        return None


def _package(job: dict[str, Any]) -> dict[str, str]:
    """In the child process: import both models into the store, then build the Bento."""
    import bentoml
    from bentoml.exceptions import NotFound

    ctx = Path(job["ctx"])
    pins = Pins.load(ctx / "serving" / PINS_FILE.name)
    assert pins is not None
    models = [
        (pins.chat_model_tag, job["chat_dir"], pins.labels()),
        (pins.embedding_model_tag, job["embedding_dir"], {"name": pins.embedding_model}),
    ]
    if pins.image_model_tag:
        models.append((pins.image_model_tag, job["image_dir"], {"name": pins.image_label}))
    for tag, src, meta in models:
        try:
            bentoml.models.get(tag)
        except NotFound:
            with bentoml.models.create(tag, labels=meta) as model:
                shutil.copytree(src, model.path, dirs_exist_ok=True)
    sys.path.insert(0, str(ctx))  # the staged copy (with pins.json), not the checkout
    for name in [m for m in sys.modules if m == "serving" or m.startswith("serving.")]:
        del sys.modules[name]
    bento = bentoml.bentos.build_bentofile(
        str(ctx / "bentofile.yaml"), build_ctx=str(ctx), labels=job["labels"]
    )
    return {"tag": str(bento.tag), "path": str(bento.path)}


if __name__ == "__main__":  # the child process of build_bento
    print(json.dumps(_package(json.loads(sys.argv[1]))))
