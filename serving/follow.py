"""Follow a registry alias: when ``champion`` moves, load the new version and hand it over.

A running chat service keeps answering with the model it has while a background thread
downloads and loads (and warms up) the version the alias now points to; only then is the new
model swapped in, one reference assignment that requests already running do not see (they hold
the old one until they finish). No request waits for a load and none is dropped.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refinery.core.registry import ModelRef, artifact_uri, resolve

log = logging.getLogger("refinery.follow")


class AliasFollower:
    def __init__(
        self,
        *,
        tracking_uri: str,
        name: str,
        alias: str,
        current_version: str,
        load: Callable[[ModelRef, Path], Any],
        on_swap: Callable[[ModelRef, Any], None],
        workdir: Path,
        interval_s: float = 30.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.name = name
        self.alias = alias
        self.version = current_version
        self._load = load
        self._on_swap = on_swap
        self.workdir = Path(workdir)
        self.interval_s = interval_s
        self.swaps = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> ModelRef | None:
        """Resolve the alias; if it moved, download, load and swap. The new ref, or None."""
        import mlflow.artifacts

        ref = resolve(self.tracking_uri, self.name, self.alias)
        if ref.version == self.version:
            return None
        log.info("%s@%s moved: %s → %s; loading", self.name, self.alias, self.version, ref.version)
        dst = self.workdir / f"v{ref.version}"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri(self.tracking_uri, ref),
                tracking_uri=self.tracking_uri,
                dst_path=str(dst),
            )
        )
        model = self._load(ref, local)
        old = self.version
        self._on_swap(ref, model)
        self.version = ref.version
        self.swaps += 1
        shutil.rmtree(self.workdir / f"v{old}", ignore_errors=True)  # never our packaged copy
        log.info("now serving %s/%s", self.name, ref.version)
        return ref

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - keep serving the current model, try again
                self.last_error = str(err)
                log.warning("following %s@%s failed: %s", self.name, self.alias, err)

    def start(self) -> AliasFollower:
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
