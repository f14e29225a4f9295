"""Results of batch runs as Prometheus gauges, pushed to a Pushgateway.

Prometheus scrapes services; a Dagster run ends before any scrape could see it, so the drift
check pushes its outcome (``refinery_drift_check_passed``, 1 or 0, and when it ran) to the
Pushgateway named by ``REFINERY_PUSHGATEWAY_URL``; the alert "drift check failed" reads it
(deploy/prometheus/rules/refinery.yml). Unset: nothing is pushed.
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from collections.abc import Mapping

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def exposition(gauges: Mapping[str, tuple[float, str]]) -> str:
    """Prometheus text format for ``{name: (value, help)}``."""
    lines = []
    for name, (value, doc) in gauges.items():
        if not _NAME.match(name) or not math.isfinite(value):
            raise ValueError(f"not a valid gauge: {name}={value}")
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name} {value!r}"]
    return "\n".join(lines) + "\n"


def push(url: str, job: str, gauges: Mapping[str, tuple[float, str]], timeout: float = 5) -> None:
    """Replace the job's group on the Pushgateway with these gauges (HTTP PUT)."""
    if not _NAME.match(job):
        raise ValueError(f"not a valid job name: {job!r}")
    request = urllib.request.Request(
        f"{url.rstrip('/')}/metrics/job/{job}",
        data=exposition(gauges).encode(),
        method="PUT",
        headers={"Content-Type": "text/plain; version=0.0.4"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def drift_gauges(passed: bool, at: float | None = None) -> dict[str, tuple[float, str]]:
    return {
        "refinery_drift_check_passed": (
            1.0 if passed else 0.0,
            "1 if the last drift check passed, 0 if prompts, answers or retrieval scores drifted",
        ),
        "refinery_drift_check_timestamp_seconds": (
            float(at if at is not None else time.time()),
            "When the last drift check ran (Unix time)",
        ),
    }


def push_drift(passed: bool, url: str | None) -> str | None:
    """Push a drift check's outcome to the Pushgateway at ``url`` (``RunSettings.
    pushgateway_url``); the URL pushed to, or None when there is none. A failed push raises
    OSError."""
    if url:
        push(url, "refinery_drift", drift_gauges(passed))
    return url or None
