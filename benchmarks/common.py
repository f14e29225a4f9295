"""Helpers shared by the benchmarks: a throw-away home, the machine description, tables."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from refinery.core.settings import REPO_ROOT, Settings

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / ".work"


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, no GPU used; "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {platform.system()} {platform.release()}"
    )


@contextlib.contextmanager
def fresh_home(name: str) -> Iterator[Settings]:
    """A new REFINERY_HOME under benchmarks/.work/, with its embedded Postgres stopped after."""
    from refinery.core.stores import stop_embedded_postgres

    home = WORK / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    settings = replace(Settings.from_env(), home=home)
    old = os.environ.get("REFINERY_HOME")
    os.environ["REFINERY_HOME"] = str(home)
    try:
        yield settings
    finally:
        stop_embedded_postgres(settings)
        if old is None:
            os.environ.pop("REFINERY_HOME", None)
        else:
            os.environ["REFINERY_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


def percentile(values: Sequence[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def write_table(
    name: str,
    title: str,
    intro: str,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    notes: str = "",
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title}",
        "",
        f"Run {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC on: {machine()}.",
        f"Command: `make bench` (or `python -m benchmarks {name}`), from {REPO_ROOT.name}/.",
        "",
        intro.strip(),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes.strip()]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
