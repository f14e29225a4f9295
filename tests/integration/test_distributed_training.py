"""LoRA training started by `accelerate launch` (training/distributed.py), the way a GPU node
with several GPUs runs it: on CPU here (one process), on every GPU where CUDA exists."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_CORPUS
from tests.tiny_model import make_tiny_llama
from training.lora import LoraTrainingConfig, TrainingConfigError

pytestmark = pytest.mark.integration

FAST = LoraTrainingConfig(
    r=4, alpha=8, max_steps=4, batch_size=4, eval_every=2, save_every=2, warmup_steps=1,
    learning_rate=1e-2,
)  # fmt: skip


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list, list]:
    from transformers import AutoTokenizer

    from training.sft_data import SFTConfig, build_dataset

    base = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", SAMPLE_CORPUS)
    data = build_dataset(SFTConfig(max_tokens=512), AutoTokenizer.from_pretrained(base))
    return base, data.train[:32], data.eval[:8]


def check_trained(result, work: Path, steps: int) -> None:
    assert result.steps == steps
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").exists()
    assert Path(result.adapter_dir).parent == work
    assert {int(h["step"]) for h in result.history if "loss" in h} == set(range(1, steps + 1))
    assert result.eval_loss_after < result.eval_loss_before  # lr 1e-2 on a random model: it learns


@pytest.mark.slow  # accelerate launches a training process: more than a minute on 2 cores
def test_accelerate_launch_trains_the_adapter(tiny, tmp_path):
    from training.distributed import RESULT_FILE, launch_command, run

    base, train_rows, eval_rows = tiny
    result = run(str(base), train_rows, eval_rows, FAST, tmp_path, cpu=True)
    check_trained(result, tmp_path, FAST.max_steps)
    assert (tmp_path / RESULT_FILE).exists()
    cmd = launch_command(tmp_path / "job.json", 4)
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert cmd[-3:] == ["-m", "training.distributed", str(tmp_path / "job.json")]


def test_several_processes_need_gpus():
    with pytest.raises(TrainingConfigError, match="one process per GPU"):
        replace(FAST, processes=2).validate(cuda_available=False)
    # One process keeps the training folder's key of runs made before `processes` existed.
    assert replace(FAST, processes=1).fingerprint() == FAST.fingerprint()
    assert replace(FAST, processes=2).fingerprint() != FAST.fingerprint()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(
    not cuda_available(),
    reason="needs CUDA: `accelerate launch` over every GPU of the node (no GPU on this machine)",
)
def test_accelerate_launch_trains_on_every_gpu(tiny, tmp_path):
    import torch

    from training.pipeline import train

    base, train_rows, eval_rows = tiny
    gpus = torch.cuda.device_count()
    config = replace(FAST, processes=gpus)
    if gpus == 1:  # pipeline.train runs one process in place: launch it through accelerate
        from training.distributed import run

        result = run(str(base), train_rows, eval_rows, config, tmp_path)
    else:
        result = train(str(base), train_rows, eval_rows, config, tmp_path)
    check_trained(result, tmp_path, FAST.max_steps)
