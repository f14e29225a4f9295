"""What identifies a piece of work: code version and content hashes, for MLflow tags."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Iterable

from refinery import __version__
from refinery.core.settings import REPO_ROOT

# Tag names shared by every MLflow run and model version the graph makes.
TAG_DAGSTER_RUN_ID = "dagster.run_id"
TAG_DAGSTER_RUN_URL = "dagster.run_url"
TAG_DAGSTER_ASSET_KEY = "dagster.asset_key"
TAG_CODE_VERSION = "refinery.code_version"
TAG_CORPUS_HASH = "refinery.corpus_hash"
# Tags of traces people rate (served and evaluation): the model by a keyed hash (blind, see
# ``model_key``) or, for a service that is not blind, by its version; a served answer's id.
TAG_MODEL_KEY = "refinery.model_key"
TAG_MODEL_VERSION = "refinery.model_version"
TAG_ANSWER_ID = "refinery.answer_id"


@functools.cache
def code_version() -> str:
    """The git commit of the checkout (with ``+dirty`` for uncommitted changes), else the version."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{commit}+dirty" if dirty else commit


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def combined_hash(items: Iterable[tuple[str, str]]) -> str:
    """Order-independent hash of (key, value) pairs, e.g. (source, content hash) of a corpus."""
    h = hashlib.sha256()
    for key, value in sorted(items):
        h.update(key.encode("utf-8"))
        h.update(b"\x00")
        h.update(value.encode("utf-8"))
        h.update(b"\x01")
    return h.hexdigest()


def model_key(label: str, salt: str = "") -> str:
    """A blind name for a model version ("name/version"): the first 16 hex digits of its
    HMAC-SHA256 keyed with ``salt`` (REFINERY_TRAFFIC_SALT). Traces that people rate carry this
    instead of the version; without a salt anyone can recompute it from a version's name."""
    import hmac

    return hmac.new(salt.encode(), label.encode(), hashlib.sha256).hexdigest()[:16]
