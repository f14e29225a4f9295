"""LoRA training as a module that ``accelerate launch`` starts, one process per GPU:

    accelerate launch --multi_gpu --num_processes 4 -m training.distributed JOB.json

JOB.json (:func:`write_job`) holds the base model folder, the train and eval rows, the LoRA
config and the work folder. Every process runs :func:`training.lora.train_lora`: the Hugging
Face Trainer runs under accelerate, which shards the batches across the processes (DDP); only
the main process writes files, and it writes the result to ``distributed_result.json`` in the
work folder, where :func:`run` reads it. More GPUs on a node is configuration
(``processes`` in the LoRA config, or accelerate's own config file), not code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from refinery.core.processes import child_environment
from training.lora import LoraTrainingConfig, TrainingResult, train_lora

RESULT_FILE = "distributed_result.json"
JOB_FILE = "distributed_job.json"


def write_job(
    base_dir: str,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    config: LoraTrainingConfig,
    work_dir: Path,
) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / JOB_FILE
    job = {
        "base_dir": base_dir,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "config": asdict(config),
        "work_dir": str(work_dir),
    }
    path.write_text(json.dumps(job))
    return path


def launch_command(job: Path, processes: int, cpu: bool = False) -> list[str]:
    """``accelerate launch`` of this module (``cpu``: without GPUs, for tests)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if cpu:
        cmd.append("--cpu")
    elif processes > 1:
        cmd.append("--multi_gpu")
    return [*cmd, "-m", "training.distributed", str(job)]


def run(
    base_dir: str,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    config: LoraTrainingConfig,
    work_dir: Path,
    *,
    cpu: bool = False,
    progress: Any = None,
) -> TrainingResult:
    """Train with ``config.processes`` processes through ``accelerate launch``; the result of
    the main process. A failed launch raises with the end of its output."""
    job = write_job(base_dir, train_rows, eval_rows, config, work_dir)
    (work_dir / RESULT_FILE).unlink(missing_ok=True)
    cmd = launch_command(job, config.processes, cpu=cpu)
    if progress:
        progress(f"accelerate launch: {config.processes} process(es)")
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env=child_environment({"PYTHONUNBUFFERED": "1"}),
    )
    result_file = work_dir / RESULT_FILE
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(
            f"accelerate launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return TrainingResult(**json.loads(result_file.read_text()))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: accelerate launch [...] -m training.distributed JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    values = dict(job["config"])
    values["target_modules"] = tuple(values["target_modules"])
    config = LoraTrainingConfig(**values)
    work_dir = Path(job["work_dir"])
    result = train_lora(job["base_dir"], job["train_rows"], job["eval_rows"], config, work_dir)
    from accelerate import PartialState

    if PartialState().is_main_process:
        (work_dir / RESULT_FILE).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
