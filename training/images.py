"""The image lineage's training side: a labelled image data set and a class-conditioned
diffusion model trained on it with diffusers.

The default data set is scikit-learn's handwritten digits (1,797 8×8 greyscale images, shipped
inside the scikit-learn wheel): small enough that a class-conditioned ``UNet2DModel`` learns it
in a few CPU minutes. The same assets take a real checkpoint folder instead (see
``refinery.vision.diffusion``); training then is skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refinery.core.artifacts import ARTIFACT
from refinery.vision.diffusion import MODEL_CARD, ImageModelError, ModelCard, is_image_model

DATASET_FILE = "images.safetensors"


class ImageDataError(ValueError):
    pass


@dataclass(frozen=True)
class ImageDatasetRef:
    """The hand-off of ``image_dataset``: a safetensors file of train/test images in [-1, 1]
    (N, C, H, W) and integer labels, with the class names."""

    path: str = field(metadata=ARTIFACT)
    source: str
    classes: tuple[str, ...]
    n_train: int
    n_test: int
    sample_size: int
    content_hash: str


@dataclass(frozen=True)
class ImageTrainingConfig:
    max_steps: int = 600
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 42
    channels: tuple[int, ...] = (32, 64)
    sample_steps: int = 25
    log_every: int = 25

    def key(self, dataset_hash: str) -> str:
        raw = json.dumps({**asdict(self), "dataset": dataset_hash}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageModelRef:
    """The hand-off of ``image_model``: the model folder and the registered version."""

    path: str = field(metadata=ARTIFACT)
    kind: str  # class-conditioned | pipeline
    training_key: str
    steps: int
    final_loss: float
    registered_model: str
    version: str
    mlflow_run_id: str
    mlflow_run_url: str

    @property
    def label(self) -> str:
        return f"{self.registered_model}/{self.version}"


def prepare_digits(out_dir: Path, test_fraction: float = 0.2, seed: int = 42) -> ImageDatasetRef:
    """scikit-learn's digits, scaled to [-1, 1], split with a fixed seed (stratified)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.05 <= test_fraction <= 0.5:
        raise ImageDataError(f"test_fraction must be between 0.05 and 0.5, got {test_fraction}")
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 → -1..1
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    tensors = {
        "train_x": torch.from_numpy(np.ascontiguousarray(x_tr)),
        "train_y": torch.from_numpy(y_tr),
        "test_x": torch.from_numpy(np.ascontiguousarray(x_te)),
        "test_y": torch.from_numpy(y_te),
    }
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    content_hash = digest.hexdigest()
    folder = out_dir / f"digits-{content_hash[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DATASET_FILE
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)  # a crash leaves no half-written data set behind
    return ImageDatasetRef(
        path=str(path),
        source="sklearn.datasets.load_digits",
        classes=tuple(str(c) for c in range(10)),
        n_train=len(y_tr),
        n_test=len(y_te),
        sample_size=8,
        content_hash=content_hash,
    )


def load_split(ref: ImageDatasetRef, split: str) -> tuple[Any, Any]:
    """(images, labels) of ``split`` ("train" or "test") as torch tensors."""
    from safetensors.torch import load_file

    if split not in ("train", "test"):
        raise ImageDataError(f"split must be 'train' or 'test', got {split!r}")
    tensors = load_file(ref.path)
    return tensors[f"{split}_x"], tensors[f"{split}_y"]


@dataclass(frozen=True)
class TrainedImageModel:
    folder: Path
    losses: list[float]  # one per ``log_every`` steps (mean over them)
    steps: int
    seconds: float


def train_class_conditioned(
    dataset: ImageDatasetRef,
    config: ImageTrainingConfig,
    out_dir: Path,
    *,
    on_log: Callable[[int, float], None] | None = None,
) -> TrainedImageModel:
    """Train a class-conditioned UNet2DModel with the DDPM objective (predict the added noise)
    and save it with a DDIM scheduler as a safetensors folder ``out_dir``. A finished folder is
    reused (its ``losses.json`` says it finished)."""
    import torch
    from diffusers import DDPMScheduler

    done = out_dir / "losses.json"
    if done.exists() and is_image_model(out_dir):
        record = json.loads(done.read_text())
        return TrainedImageModel(out_dir, record["losses"], record["steps"], record["seconds"])
    if config.max_steps < 1 or config.batch_size < 1:
        raise ImageDataError("max_steps and batch_size must be at least 1")
    torch.manual_seed(config.seed)
    x, y = load_split(dataset, "train")
    unet = _class_conditioned_unet(dataset, config, channels_in=int(x.shape[1]))
    scheduler: Any = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    t0 = time.perf_counter()
    losses = _denoising_steps(unet, scheduler, x, y, config, on_log)
    seconds = time.perf_counter() - t0
    _save_image_model(unet, scheduler, dataset, config, int(x.shape[1]), losses, seconds, out_dir)
    return TrainedImageModel(out_dir, losses, config.max_steps, seconds)


def _class_conditioned_unet(
    dataset: ImageDatasetRef, config: ImageTrainingConfig, channels_in: int
) -> Any:
    """A small UNet with one class embedding per label; attention only at the lowest
    resolution, where it is cheap."""
    from diffusers import UNet2DModel

    channels = tuple(config.channels)
    return UNet2DModel(
        sample_size=dataset.sample_size,
        in_channels=channels_in,
        out_channels=channels_in,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * (len(channels) - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1),
        num_class_embeds=len(dataset.classes),
        norm_num_groups=8,
    )


def _denoising_steps(
    unet: Any,
    scheduler: Any,
    x: Any,
    y: Any,
    config: ImageTrainingConfig,
    on_log: Callable[[int, float], None] | None,
) -> list[float]:
    """``config.max_steps`` optimizer steps on random batches; the mean loss of each
    ``log_every`` steps (and of the last, shorter stretch)."""
    import torch

    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_steps)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    window: list[float] = []
    unet.train()
    for step in range(1, config.max_steps + 1):
        idx = torch.randint(len(x), (config.batch_size,), generator=generator)
        clean, labels = x[idx], y[idx]  # (b, c, h, w), (b,)
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, 1000, (len(idx),), generator=generator)
        pred = unet(scheduler.add_noise(clean, noise, t), t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr.step()
        window.append(loss.item())
        if step % config.log_every == 0 or step == config.max_steps:
            losses.append(sum(window) / len(window))
            window = []
            if on_log:
                on_log(step, losses[-1])
    return losses


def _save_image_model(
    unet: Any,
    scheduler: Any,
    dataset: ImageDatasetRef,
    config: ImageTrainingConfig,
    channels: int,
    losses: list[float],
    seconds: float,
    out_dir: Path,
) -> None:
    """The UNet, a DDIM scheduler (fewer sampling steps than DDPM), the model card and
    ``losses.json``, written beside ``out_dir`` and moved into place at the end."""
    from diffusers import DDIMScheduler

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    DDIMScheduler.from_config(scheduler.config).save_pretrained(str(tmp / "scheduler"))
    ModelCard(
        classes=dataset.classes,
        sample_size=dataset.sample_size,
        channels=channels,
        default_steps=config.sample_steps,
        dataset=dataset.source,
    ).write(tmp)
    (tmp / "losses.json").write_text(
        json.dumps({"losses": losses, "steps": config.max_steps, "seconds": seconds})
    )
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.replace(out_dir)  # whole or absent: a rerun after a crash starts over


def check_checkpoint(folder: str) -> Path:
    """A real checkpoint folder given in place of training (e.g. SD-Turbo saved locally)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ImageModelError(f"image checkpoint {folder!r} is not a folder")
    if not is_image_model(path):
        raise ImageModelError(
            f"{path} holds neither a diffusers pipeline (model_index.json) nor a Refinery "
            "image model (refinery_image.json)"
        )
    return path


def loss_curve_png(losses: list[float], log_every: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([(i + 1) * log_every for i in range(len(losses))], losses)
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title("image model training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_grid_png(folder: Path, path: Path, seed: int = 0) -> Path:
    """A grid of the model's samples (one row per class) for the training run."""
    from PIL import Image

    from refinery.vision.diffusion import ImageGenerator, sample_requests

    generator = ImageGenerator(folder)
    card = generator.card
    assert card is not None
    per_class, cell = 8, 32
    requests = sample_requests(card.classes, per_class, card.default_steps, cell, seed=seed)
    images = generator.generate(requests)
    n = len(card.classes)
    grid = Image.new("L", (per_class * cell, n * cell), 0)
    for i, image in enumerate(images):
        row, col = i % n, i // n
        grid.paste(image.convert("L"), (col * cell, row * cell))
    grid.save(path)
    return path


def train_and_register(
    dataset: ImageDatasetRef,
    config: ImageTrainingConfig,
    *,
    checkpoint: str,
    models_dir: Path,
    run: Any,
    tracking_uri: str,
    registered_model: str,
    tags: dict[str, str],
    on_log: Callable[[int, float], None] | None = None,
) -> ImageModelRef:
    """Train (or take ``checkpoint`` as it is), log the loss curve and a sample grid to
    ``run`` (a ``TrackedRun``), and register the folder as ``registered_model`` with alias
    challenger. Registering the same lineage again reuses its version."""
    from training.registry import register

    if checkpoint:
        folder, key, kind, steps, final_loss = _given_checkpoint(checkpoint, run)
    else:
        folder, key, kind, steps, final_loss = _train_logged(
            dataset, config, models_dir, run, on_log
        )
    version = register(
        tracking_uri,
        run_id=run.run_id,
        name=registered_model,
        model_dir=folder,
        variant="none",
        lineage_key=key,
        tags={
            **tags,
            "refinery.image_kind": kind,
            "refinery.image_dataset": dataset.content_hash[:12],
        },
        description=f"Image model ({kind}) trained on {dataset.source}"
        if not checkpoint
        else f"Image pipeline from {folder}",
        kind="image",
    )
    return ImageModelRef(
        path=str(folder), kind=kind, training_key=key, steps=steps, final_loss=final_loss,
        registered_model=version.name, version=version.version,
        mlflow_run_id=version.run_id, mlflow_run_url=run.url,
    )  # fmt: skip


# (model folder, lineage key, kind, training steps, final loss) of the model to register.
_ImageSource = tuple[Path, str, str, int, float]


def _given_checkpoint(checkpoint: str, run: Any) -> _ImageSource:
    """A checkpoint folder used as it is, keyed by its resolved path."""
    folder = check_checkpoint(checkpoint)
    key = hashlib.sha256(f"checkpoint:{folder.resolve()}".encode()).hexdigest()[:16]
    kind, steps, final_loss = "pipeline", 0, float("nan")
    if (folder / MODEL_CARD).exists():
        kind = "class-conditioned"
    run.log_params({"checkpoint": str(folder)})
    return folder, key, kind, steps, final_loss


def _train_logged(
    dataset: ImageDatasetRef,
    config: ImageTrainingConfig,
    models_dir: Path,
    run: Any,
    on_log: Callable[[int, float], None] | None,
) -> _ImageSource:
    """Train (or reuse the finished training of the same key) and log its parameters, loss
    curve and a grid of samples to ``run``."""
    key = config.key(dataset.content_hash)
    run.log_params(
        {**asdict(config), "dataset": dataset.source, "dataset_hash": dataset.content_hash[:12]}
    )
    trained = train_class_conditioned(dataset, config, models_dir / f"image-{key}", on_log=on_log)
    folder = trained.folder
    final_loss = trained.losses[-1]
    for i, loss in enumerate(trained.losses):
        run.log_metrics({"train_loss": loss}, step=(i + 1) * config.log_every)
    run.log_metrics({"train_seconds": trained.seconds, "final_loss": final_loss})
    run.log_artifact(
        loss_curve_png(trained.losses, config.log_every, folder.parent / f"{key}-loss.png"),
        "plots",
    )
    run.log_artifact(sample_grid_png(folder, folder.parent / f"{key}-samples.png"), "plots")
    return folder, key, "class-conditioned", trained.steps, final_loss
