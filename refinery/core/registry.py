"""Registered chat models: resolve an alias to a version and load it, with an explicit
tracking URI (no process-wide MLflow state)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refinery.core.tracking import client_for

CHALLENGER, CHAMPION = "challenger", "champion"


class ModelNotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    source: str  # the version's source: models:/<LoggedModel id>, or an artifact URI before them
    run_id: str
    tags: dict[str, str]
    model_id: str = ""  # its MLflow LoggedModel; "" for a version registered before them

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


def logged_model_id(source: str | None) -> str:
    """The LoggedModel id of a ``models:/m-...`` version source ("" for any other source)."""
    import re

    match = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", source or "")
    return match.group(1) if match else ""


def resolve(tracking_uri: str, name: str, alias_or_version: str) -> ModelRef:
    """The model version an alias points to (or a version given by number)."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        if alias_or_version.isdigit():
            mv = client.get_model_version(name, alias_or_version)
        else:
            mv = client.get_model_version_by_alias(name, alias_or_version)
    except MlflowException as err:
        raise ModelNotFoundError(
            f"no version {alias_or_version!r} of registered model {name!r}"
        ) from err
    source = mv.source or ""
    return ModelRef(
        name, str(mv.version), source, mv.run_id or "", dict(mv.tags or {}), logged_model_id(source)
    )


def artifact_uri(tracking_uri: str, ref: ModelRef) -> str:
    """Where to download the version's files from. A LoggedModel's version: the artifact
    location the registry resolved it to (MLflow would resolve a ``models:/`` URI again through
    its process-wide tracking URI, not ``tracking_uri``). Asked only when downloading, so
    resolving an alias (the follower's poll) stays one call."""
    if not ref.model_id:
        return ref.source
    return str(client_for(tracking_uri).get_model_version_download_uri(ref.name, ref.version))


class NotAChatModel(ValueError):
    """A folder that is not a downloaded Refinery chat model."""


@dataclass(frozen=True)
class LocalModel:
    """A registered version on local disk: its weights folder, variant and artifacts."""

    weights: Path
    variant: str
    artifacts: dict[str, Path]

    @property
    def openvino(self) -> Path | None:
        """The OpenVINO export the CPU engine serves, when the version has one."""
        return self.artifacts.get("openvino")

    @property
    def openvino_draft(self) -> Path | None:
        """A draft model's export for speculative decoding, when the version has one."""
        return self.artifacts.get("openvino_draft")


def read_model_folder(folder: Path) -> LocalModel:
    """Read a downloaded Refinery pyfunc model's MLmodel file (plain YAML: nothing to
    unpickle) for its artifacts and variant."""
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.exists():
        raise NotAChatModel(f"{folder} is not an MLflow model folder (no MLmodel file)")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function")
    if not flavor or "model" not in (flavor.get("artifacts") or {}):
        raise NotAChatModel(f"{mlmodel} is not a Refinery chat model (no 'model' artifact)")
    artifacts = {name: folder / a["path"] for name, a in flavor["artifacts"].items()}
    variant = str((flavor.get("model_config") or {}).get("variant", "none"))
    return LocalModel(artifacts["model"], variant, artifacts)


def download(tracking_uri: str, ref: ModelRef, dst: Path) -> LocalModel:
    """The version's artifacts under ``dst``."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=artifact_uri(tracking_uri, ref), tracking_uri=tracking_uri, dst_path=str(dst)
    )
    return read_model_folder(Path(local))
