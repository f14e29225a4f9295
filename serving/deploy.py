"""Kubernetes manifests for the champion's Bento: ``deploy/k8s`` rendered with its image tag.

The Kustomize base and overlays (``cpu``, ``gpu``) name the image ``refinery`` with a placeholder
tag; rendering adds a Kustomize ``images`` entry that points it at the image of the Bento built
for the version the ``champion`` alias points to (what ``bentoml containerize`` tags it), and
runs ``kubectl kustomize``. Nothing here talks to a cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from refinery.core.registry import CHAMPION, resolve
from refinery.core.settings import REPO_ROOT, Settings
from serving.bento import SERVICE_NAME, find_bento

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
IMAGE_NAME = SERVICE_NAME  # the image name the manifests use (deploy/k8s/base)


class DeployError(RuntimeError):
    pass


def image_tag(bento_tag: str, repository: str | None = None) -> str:
    """The image a deployment of a Bento uses: ``bentoml containerize name:version`` tags it
    ``name:version``; ``repository`` (e.g. ``registry.example/team/refinery``) replaces the name."""
    name, sep, version = bento_tag.partition(":")
    if not sep or not version or version == "latest":
        raise DeployError(f"{bento_tag!r} is not a pinned Bento tag (name:version)")
    return f"{repository or name}:{version}"


def champion_bento(
    settings: Settings, tracking_uri: str, registered_model: str, alias: str = CHAMPION
) -> dict[str, Any]:
    """The newest Bento in this home's store built for the version ``alias`` points to."""
    ref = resolve(tracking_uri, registered_model, alias)
    found = find_bento(
        settings,
        {"refinery.registered_model": ref.name, "refinery.model_version": ref.version},
    )
    if found is None:
        raise DeployError(
            f"no Bento of {ref.name} version {ref.version} (alias {alias!r}) in "
            f"{settings.bentoml_home}: run `refinery bento` first"
        )
    return found


def serves_images(bento: dict[str, Any]) -> bool:
    """Whether a Bento (``find_bento``'s record) pins an image model."""
    return bento.get("labels", {}).get("refinery.image_model", "none") not in ("", "none")


def render(overlay: str, image: str, kubectl: str | None = None, images: bool = False) -> str:
    """The manifests of ``deploy/k8s/overlays/<overlay>`` with ``image`` for the Bento, as
    multi-document YAML (``kubectl kustomize``); ``images``: with the image model service
    (``deploy/k8s/components/images``), for a Bento that serves one."""
    if overlay not in OVERLAYS:
        raise DeployError(f"overlay must be one of {OVERLAYS}, got {overlay!r}")
    name, sep, tag = image.rpartition(":")
    if not sep or not name or "/" in tag or tag == "latest":
        raise DeployError(f"image {image!r} has no pinned tag (name:tag, never latest)")
    exe = kubectl or shutil.which("kubectl")
    if not exe:
        raise DeployError("kubectl is not installed: it renders the Kustomize overlays")
    with tempfile.TemporaryDirectory(prefix="refinery-render-") as tmp:
        # Kustomize refuses absolute paths to other kustomizations: point at the overlay
        # relative to this temporary folder.
        target = os.path.relpath(K8S_DIR / "overlays" / overlay, tmp)
        component = os.path.relpath(K8S_DIR / "components" / "images", tmp)
        (Path(tmp) / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n"
            "kind: Kustomization\n"
            f"resources:\n  - {target}\n"
            + (f"components:\n  - {component}\n" if images else "")
            + f"images:\n  - name: {IMAGE_NAME}\n    newName: {name}\n    newTag: {tag!r}\n"
        )
        proc = subprocess.run([exe, "kustomize", tmp], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeployError(f"kubectl kustomize failed for overlay {overlay!r}:\n{proc.stderr}")
    return proc.stdout


def write_manifests(text: str, out_dir: Path, overlay: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"refinery-{overlay}.yaml"
    path.write_text(text)
    return path
