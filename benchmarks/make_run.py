"""`make run` on the embedded default, this checkout against a baseline commit, in one session:
each from a fresh clone and an empty home, one after the other on the same machine, with the
same virtualenv. The baseline is REFINERY_BENCH_BASE (default: the last commit before runs
became share-nothing, when hand-offs were files and `refinery run` executed in process).

What the newer one adds per run: hashing and publishing each model folder to MLflow (once per
content), the code server and run process that submitting through the run queue starts.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import WORK, write_table
from refinery.core.settings import REPO_ROOT, isolated_env

BASE = os.environ.get("REFINERY_BENCH_BASE", "fb3c9fb")


def _clone(ref: str, folder: str) -> tuple[str, str]:
    target = WORK / "make-run" / folder
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(target)], check=True)
    subprocess.run(["git", "-C", str(target), "checkout", "-q", ref], check=True)
    sha = subprocess.run(
        ["git", "-C", str(target), "rev-parse", "--short", "HEAD"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return str(target), sha


def _run(checkout: str, n: int = 1) -> tuple[float, int]:
    home = os.path.join(checkout, ".refinery")
    env = isolated_env(
        REFINERY_HOME=home,
        PYTHONPATH=checkout,  # this checkout's code, not the virtualenv's editable install
        REFINERY_OPENVINO_PYTHON=str(REPO_ROOT / ".venv-openvino" / "bin" / "python"),
    )
    # One log per run: the steps' times are read from it.
    log = open(os.path.join(checkout, f"make-run-{n}.log"), "w")  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "run"], cwd=checkout, env=env,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    took = time.perf_counter() - t0
    log.close()
    subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "db", "stop"], cwd=checkout, env=env,
        capture_output=True,
    )  # fmt: skip
    return took, proc.returncode


REPEATS = int(os.environ.get("REFINERY_BENCH_REPEATS", "2"))
_STEP = re.compile(r"^\d\d:\d\d:\d\d ✓ (\S+) \(([\d.]+) s\)$", re.M)


def step_seconds(log: str) -> dict[str, float]:
    """Seconds of each finished step, from the command's progress lines ("✓ step (12.3 s)")."""
    return {name: float(s) for name, s in _STEP.findall(log)}


def split_seconds(wall: float, log: str) -> tuple[float, float, float]:
    """(LoRA training, the other steps, outside any step) of one run: training dominates the
    wall time and moves most with load on the machine, the rest is what a change of
    orchestration adds or saves."""
    steps = step_seconds(log)
    lora = steps.get("lora_adapter", 0.0)
    others = sum(steps.values()) - lora
    return lora, others, wall - lora - others


def main() -> None:
    """Runs alternate baseline, this checkout, this checkout, baseline (ABBA, REPEATS pairs) so
    that a machine getting slower or faster during the session weighs on both alike."""
    checkouts = {
        label: _clone(ref, label.replace(" ", "-"))
        for label, ref in (("baseline", BASE), ("this checkout", "HEAD"))
    }
    order = []
    for i in range(REPEATS):
        pair = ["baseline", "this checkout"]
        order += pair if i % 2 == 0 else pair[::-1]
    rows, times = [], {"baseline": [], "this checkout": []}
    for n, label in enumerate(order, 1):
        checkout, sha = checkouts[label]
        shutil.rmtree(os.path.join(checkout, ".refinery"), ignore_errors=True)
        print(f"[{n}/{len(order)}] {label} ({sha}): refinery run …", flush=True)
        took, code = _run(checkout, n)
        print(f"[{n}/{len(order)}] {label}: {took:.0f} s, exit {code}", flush=True)
        log = Path(checkout, f"make-run-{n}.log").read_text(errors="replace")
        lora, others, outside = split_seconds(took, log)
        rows.append([str(n), label, sha, f"{took:.0f}", f"{lora:.0f}", f"{others:.0f}",
                     f"{outside:.0f}", "ok" if code == 0 else f"exit {code}"])  # fmt: skip
        if code == 0:
            times[label].append(took)
    summary = []
    for label, values in times.items():
        if values:
            summary.append(
                f"{label}: median {statistics.median(values):.0f} s, "
                f"range {min(values):.0f}-{max(values):.0f} s over {len(values)} runs"
            )
    if times["baseline"] and times["this checkout"]:
        ratio = statistics.median(times["this checkout"]) / statistics.median(times["baseline"])
        summary.append(f"This checkout / baseline (medians): {ratio:.2f}x the wall time.")
    write_table(
        "make_run",
        "`make run` on the embedded default: before and after share-nothing runs",
        __doc__ or "",
        [
            "run",
            "checkout",
            "commit",
            "wall s",
            "lora_adapter s",
            "other steps s",
            "outside steps s",
            "result",
        ],
        rows,
        notes="\n".join(f"- {line}" for line in summary),
    )
