"""Register models in the MLflow registry in a form MLflow loads back, with their lineage.

A registered version is an MLflow "model from code" (``refinery/generation/pyfunc_model.py``) whose
artifact is a model folder of safetensors (or an ONNX file): nothing pickled. Aliases, never
stages. Registering the same lineage twice returns the existing version.

Each version is an MLflow 3 LoggedModel (``create_logged_model`` -> ``log_model_artifacts`` ->
``finalize_logged_model``), an output of the training run, registered from ``models:/<model id>``:
the experiment's Models tab lists it, and evaluation links its metrics to it
(``evaluation.tracing.evaluate_in_mlflow``).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from refinery.core.registry import CHALLENGER, logged_model_id
from refinery.core.settings import REPO_ROOT

PYFUNC_FILE = REPO_ROOT / "refinery" / "generation" / "pyfunc_model.py"
GENERATION_FILE = REPO_ROOT / "refinery" / "generation" / "generator.py"
IMAGE_PYFUNC_FILE = REPO_ROOT / "refinery" / "vision" / "diffusion_pyfunc.py"
IMAGEGEN_FILE = REPO_ROOT / "refinery" / "vision" / "diffusion.py"
TAG_LINEAGE_KEY = "refinery.lineage_key"
ModelKind = Literal["chat", "image"]  # a causal LM, or an image model (refinery.vision.diffusion)
TAG_VARIANT = "refinery.variant"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    source: str
    reused: bool
    model_id: str = ""  # the LoggedModel ("m-..."); "" for a version registered before them

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """What the model needs to load, pinned to what made it."""
    from importlib.metadata import version

    pkgs = ["mlflow", "torch", "transformers", "safetensors", "numpy", "accelerate", *extra]
    optional = ["bitsandbytes", "onnxruntime"]
    out = []
    for pkg in pkgs + optional:
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except Exception:  # noqa: BLE001 - an optional package that is not installed
            continue
    return out


def image_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # prompts
        outputs=Schema([ColSpec("string")]),  # base64 PNGs
        params=ParamSchema(
            [
                ParamSpec("seed", "long", 0),
                ParamSpec("steps", "long", 0),
                ParamSpec("size", "long", 0),
            ]
        ),
    )


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # a list of prompts (or a one-column DataFrame)
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 64),
                ParamSpec("temperature", "double", 0.0),
                ParamSpec("batch_size", "long", 8),
            ]
        ),
    )


def find_version(client: Any, name: str, lineage_key: str) -> Any | None:
    try:
        versions = client.search_model_versions(
            f"name = '{name}' and tags.`{TAG_LINEAGE_KEY}` = '{lineage_key}'"
        )
    except Exception:  # noqa: BLE001 - the registered model does not exist yet
        return None
    return max(versions, key=lambda v: int(v.version), default=None)


def register(
    tracking_uri: str,
    *,
    run_id: str,
    name: str,
    model_dir: Path,
    variant: str,
    lineage_key: str,
    tags: Mapping[str, Any],
    alias: str | None = CHALLENGER,
    description: str = "",
    extra_artifacts: Mapping[str, Path] | None = None,
    kind: ModelKind = "chat",
) -> RegisteredVersion:
    """Log ``model_dir`` as a pyfunc model in run ``run_id`` and register it under ``name``.
    ``kind``: "chat" (a causal LM) or "image" (``refinery.vision.diffusion``).

    Through an explicit client: the fluent ``log_model`` would set process-wide tracking and
    registry URIs that outlive the call.
    """
    from refinery.core.tracking import client_for, process_tracking_uri

    _check_name(name)
    client = client_for(tracking_uri)
    existing = find_version(client, name, lineage_key)
    if existing is not None:
        if alias:
            client.set_registered_model_alias(name, alias, existing.version)
        return RegisteredVersion(
            name,
            str(existing.version),
            existing.run_id,
            existing.source,
            reused=True,
            model_id=logged_model_id(existing.source),
        )
    all_tags = {
        **{k: str(v) for k, v in tags.items()},
        TAG_LINEAGE_KEY: lineage_key,
        TAG_VARIANT: variant,
    }
    image = kind == "image"
    model_id = _log_model(
        client, run_id, name, model_dir, variant, image, extra_artifacts, all_tags
    )
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(
            name,
            description="Refinery image model (diffusers)."
            if image
            else f"Refinery chat model ({variant}).",
        )
    # A local store resolves a ``models:/<model id>`` source through MLflow's process-wide
    # tracking URI, not the client's (a TODO in MLflow's SQL registry store).
    with process_tracking_uri(tracking_uri):
        mv = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags=all_tags,
            description=description or None,
            model_id=model_id,
        )
    _list_version_on_model(client, model_id, name, str(mv.version))
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return RegisteredVersion(
        name, str(mv.version), run_id, mv.source or "", reused=False, model_id=model_id
    )


def _list_version_on_model(client: Any, model_id: str, name: str, version: str) -> None:
    """The LoggedModel names its registered versions (tag ``mlflow.modelVersions``, as MLflow's
    own ``register_model`` writes it), so its page links to them. An MLflow server writes the
    tag itself; a local store does not."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if any((v.get("name"), str(v.get("version"))) == (name, version) for v in listed):
        return
    listed.append({"name": name, "version": version})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


def _log_model(
    client: Any,
    run_id: str,
    name: str,
    model_dir: Path,
    variant: str,
    image: bool,
    extra_artifacts: Mapping[str, Path] | None,
    tags: Mapping[str, str],
) -> str:
    """Save ``model_dir`` as an MLflow model from code, log it as a LoggedModel output of run
    ``run_id`` (in the run's experiment) and return its id. A failed upload leaves the
    LoggedModel FAILED, never READY."""
    from mlflow.entities import LoggedModelOutput

    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        tags=dict(tags),
        params={"variant": variant},
        model_type="image" if image else "chat",
    )
    try:
        _upload_pyfunc(client, model.model_id, model_dir, variant, image, extra_artifacts)
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return str(model.model_id)


def _upload_pyfunc(
    client: Any,
    model_id: str,
    model_dir: Path,
    variant: str,
    image: bool,
    extra_artifacts: Mapping[str, Path] | None,
) -> None:
    """Save ``model_dir`` as an MLflow model from code into LoggedModel ``model_id``."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow warns that predict's type hints give no schema and that no input example
        # was given: the signature below says what the model takes.
        warnings.simplefilter("ignore", UserWarning)
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(local),
            python_model=str(IMAGE_PYFUNC_FILE if image else PYFUNC_FILE),
            # "model": the weights MLflow's pyfunc loads; extra ones (an OpenVINO export for
            # the CPU serving engine) travel with the version.
            artifacts={
                "model": str(model_dir),
                **{k: str(v) for k, v in (extra_artifacts or {}).items()},
            },
            code_paths=[str(IMAGEGEN_FILE if image else GENERATION_FILE)],
            model_config={"variant": variant},
            signature=image_signature() if image else signature(),
            pip_requirements=pip_requirements(("diffusers", "pillow") if image else ()),
        )
        client.log_model_artifacts(model_id, str(local))


def register_folder(
    tracking_uri: str,
    name: str,
    model_dir: Path,
    *,
    alias: str,
    artifact_root: Path | None,
    experiment: str = "refinery-imports",
    tags: Mapping[str, Any] | None = None,
    extra_artifacts: Mapping[str, Path] | None = None,
    kind: ModelKind = "chat",
) -> RegisteredVersion:
    """Register a model folder as it is, in a run of its own (for serving tests, benchmarks,
    or a model trained elsewhere); the version gets ``alias``. ``artifact_root``: where a local
    store keeps artifacts (``Settings.mlflow_artifacts_dir``); None for a server's default."""
    from refinery.core.tracking import client_for, ensure_experiment

    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    run = client.create_run(experiment_id, tags={"refinery.imported_from": str(model_dir)})
    try:
        return register(
            tracking_uri,
            run_id=run.info.run_id,
            name=name,
            model_dir=model_dir,
            variant="none",
            lineage_key=f"import:{model_dir}",
            tags=tags or {},
            alias=alias,
            extra_artifacts=extra_artifacts,
            kind=kind,
        )
    finally:
        client.set_terminated(run.info.run_id)


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise ValueError(f"registered model name {name!r}: use letters, digits, '.', '_' or '-'")


@dataclass(frozen=True)
class CandidateRef:
    """The hand-off of ``candidate_model``: the registered version (alias challenger) and the
    versions its variants got, registered as ``<name>-<variant>``."""

    registered_model: str
    version: str
    reused: bool
    variants: dict[str, str]  # registered name -> version
    mlflow_run_id: str
    mlflow_run_url: str

    @property
    def label(self) -> str:
        return f"{self.registered_model}/{self.version}"


def register_candidate(
    tracking_uri: str,
    name: str,
    *,
    merged_dir: Path,
    openvino_dir: Path | None = None,
    openvino_draft_dir: Path | None = None,
    variants: Mapping[str, str],
    run_id: str,
    run_url: str,
    lineage_key: str,
    tags: Mapping[str, Any],
) -> CandidateRef:
    """Register the merged model as ``name`` and each variant folder as ``name-<variant>``,
    all with alias challenger and the same lineage tags; variants point back at the main
    version (``refinery.source_version``)."""
    main = register(
        tracking_uri,
        run_id=run_id,
        name=name,
        model_dir=merged_dir,
        variant="none",
        lineage_key=lineage_key,
        tags=tags,
        description="Merged LoRA fine-tune (fp32 safetensors)"
        + (", with its OpenVINO export for CPU serving." if openvino_dir else "."),
        extra_artifacts={
            k: v
            for k, v in (("openvino", openvino_dir), ("openvino_draft", openvino_draft_dir))
            if v is not None
        },
    )
    registered = {}
    for variant, path in variants.items():
        v = register(
            tracking_uri,
            run_id=run_id,
            name=f"{name}-{variant}",
            model_dir=Path(path),
            variant=variant,
            lineage_key=lineage_key,
            tags={**tags, "refinery.source_version": f"{name}/{main.version}"},
            description=f"{variant} variant of {name} version {main.version}.",
        )
        registered[v.name] = v.version
    return CandidateRef(name, main.version, main.reused, registered, run_id, run_url)
