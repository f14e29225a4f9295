"""Image generation with diffusers: load a registered image model folder, turn prompts into images.

Two kinds of folder, told apart by what they hold:

- ``refinery_image.json`` + ``unet/`` + ``scheduler/``: a class-conditioned ``UNet2DModel`` that
  Refinery trains itself (``training.images``). A prompt names one of its classes ("a
  handwritten 7", "the digit seven"); sampling runs DDIM over the UNet.
- ``model_index.json``: any diffusers pipeline folder (for example SD-Turbo or SDXL saved
  locally), loaded with ``AutoPipelineForText2Image`` in fp16 on CUDA. Prompts go through as text.

Each image has its own seed: its starting noise is drawn from a generator seeded with it, and
DDIM with eta 0 adds no noise after that, so the same prompt, seed and steps give the same image
whatever else shares the batch. Weights load from safetensors only.
"""

from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_CARD = "refinery_image.json"
PIPELINE_INDEX = "model_index.json"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class PromptError(ValueError):
    """A prompt this model cannot draw (the message says what it can)."""


class ImageModelError(ValueError):
    """A folder that is not an image model this module can load."""


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    seed: int
    steps: int
    width: int
    height: int


@dataclass(frozen=True)
class ModelCard:
    """What ``refinery_image.json`` says about a class-conditioned model."""

    classes: tuple[str, ...]
    sample_size: int
    channels: int
    default_steps: int
    dataset: str

    @classmethod
    def read(cls, folder: Path) -> ModelCard:
        data = json.loads((folder / MODEL_CARD).read_text())
        return cls(
            classes=tuple(str(c) for c in data["classes"]),
            sample_size=int(data["sample_size"]),
            channels=int(data.get("channels", 1)),
            default_steps=int(data.get("default_steps", 25)),
            dataset=str(data.get("dataset", "")),
        )

    def write(self, folder: Path) -> None:
        (folder / MODEL_CARD).write_text(
            json.dumps(
                {
                    "kind": "class-conditioned",
                    "classes": list(self.classes),
                    "sample_size": self.sample_size,
                    "channels": self.channels,
                    "default_steps": self.default_steps,
                    "dataset": self.dataset,
                },
                indent=2,
            )
        )


def prompt_class(prompt: str, classes: tuple[str, ...]) -> int:
    """The class a prompt asks for: a class name as a word ("7") or, for digit classes, its
    English name ("seven"). Exactly one distinct class must be named."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    found = set()
    for word in words:
        if word in classes:
            found.add(classes.index(word))
        elif word in NUMBER_WORDS and str(NUMBER_WORDS.index(word)) in classes:
            found.add(classes.index(str(NUMBER_WORDS.index(word))))
    if len(found) != 1:
        what = "no class" if not found else f"{len(found)} different classes"
        raise PromptError(
            f"the prompt names {what}; this model draws one of {', '.join(classes)} "
            f"(for example 'a handwritten {classes[-1]}')"
        )
    return found.pop()


def to_png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def is_image_model(folder: Path) -> bool:
    return (folder / MODEL_CARD).exists() or (folder / PIPELINE_INDEX).exists()


class ImageGenerator:
    """A loaded image model. ``generate`` is thread-safe (one batch at a time)."""

    def __init__(self, folder: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.folder = Path(folder)
        self.device = device
        self._lock = threading.Lock()
        if (self.folder / MODEL_CARD).exists():
            self.kind = "class-conditioned"
            self.card: ModelCard | None = ModelCard.read(self.folder)
            self._load_unet()
        elif (self.folder / PIPELINE_INDEX).exists():
            self.kind = "pipeline"
            self.card = None
            self._load_pipeline()
        else:
            raise ImageModelError(
                f"{self.folder} is not an image model: no {MODEL_CARD} (a Refinery-trained "
                f"model) and no {PIPELINE_INDEX} (a diffusers pipeline folder)"
            )

    # -- loading --
    def _load_unet(self) -> None:
        from diffusers import DDIMScheduler, UNet2DModel

        self.unet = UNet2DModel.from_pretrained(str(self.folder / "unet"), use_safetensors=True).to(
            self.device
        )
        self.unet.eval()
        self.scheduler_config = DDIMScheduler.load_config(str(self.folder / "scheduler"))

    def _load_pipeline(self) -> None:
        import torch
        from diffusers import AutoPipelineForText2Image

        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.pipe = AutoPipelineForText2Image.from_pretrained(
            str(self.folder), torch_dtype=dtype, use_safetensors=True
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    # -- generation --
    def check(self, prompt: str) -> None:
        """Raise ``PromptError`` for a prompt this model cannot draw."""
        if self.card is not None:
            prompt_class(prompt, self.card.classes)
        elif not prompt.strip():
            raise PromptError("the prompt is empty")

    @property
    def default_steps(self) -> int:
        return self.card.default_steps if self.card else 4

    def generate(self, requests: list[ImageRequest]) -> list[Any]:
        """One PIL image per request, in order. Requests with the same steps (and size, for a
        pipeline) share one batched sampling loop."""
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.steps, r.width, r.height) if self.kind == "pipeline" else (r.steps, 0, 0)
            groups.setdefault(key, []).append(i)
        out: list[Any] = [None] * len(requests)
        with self._lock:
            for (steps, _, _), idx in groups.items():
                batch = [requests[i] for i in idx]
                images = (
                    self._sample_unet(batch, steps)
                    if self.kind == "class-conditioned"
                    else self._sample_pipeline(batch, steps)
                )
                for i, image in zip(idx, images, strict=True):
                    out[i] = _resize(image, requests[i].width, requests[i].height)
        return out

    def _sample_unet(self, batch: list[ImageRequest], steps: int) -> list[Any]:
        import numpy as np
        import torch
        from diffusers import DDIMScheduler
        from PIL import Image

        assert self.card is not None
        card = self.card
        labels = torch.tensor([prompt_class(r.prompt, card.classes) for r in batch])
        shape = (card.channels, card.sample_size, card.sample_size)
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(r.seed)) for r in batch]
        ).to(self.device)
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        sample = noise
        with torch.inference_mode():
            for t in scheduler.timesteps:
                eps = self.unet(sample, t, class_labels=labels.to(self.device)).sample
                sample = scheduler.step(eps, t, sample, eta=0.0).prev_sample
        pixels = ((sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        mode = "L" if card.channels == 1 else "RGB"
        return [
            Image.fromarray(
                np.ascontiguousarray(p[0] if card.channels == 1 else p.transpose(1, 2, 0)), mode
            )
            for p in pixels
        ]

    def _sample_pipeline(self, batch: list[ImageRequest], steps: int) -> list[Any]:
        import torch

        gens = [torch.Generator(self.device).manual_seed(r.seed) for r in batch]
        result = self.pipe(
            prompt=[r.prompt for r in batch],
            num_inference_steps=steps,
            generator=gens,
            width=batch[0].width,
            height=batch[0].height,
        )
        return list(result.images)


def _resize(image: Any, width: int, height: int) -> Any:
    """A class-conditioned model draws at its own small size; nearest-neighbour scaling keeps
    its pixels sharp at the size asked for."""
    from PIL import Image

    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.NEAREST)


def sample_requests(
    classes: tuple[str, ...], per_class: int, steps: int, size: int, seed: int = 0
) -> list[ImageRequest]:
    """``per_class`` prompts for each class, each image with its own seed."""
    return [
        ImageRequest(f"a handwritten {c}", seed + i * len(classes) + k, steps, size, size)
        for i in range(per_class)
        for k, c in enumerate(classes)
    ]
