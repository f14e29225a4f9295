"""Images out: ``POST /v1/images/generations`` (OpenAI's shape) and the image model service.

- ``ImageModel`` (``refinery-image``): the pinned image champion (``refinery.vision.diffusion``)
  behind a BentoML API with adaptive batching: requests that arrive together are sampled in one
  batch. Each image carries its own seed, so batching never changes an image.
- ``ImageGenerationRequest``: the body the entry accepts (prompt, n, size, response_format
  ``b64_json``; Refinery's extensions ``seed`` and ``steps`` travel in the openai client's
  ``extra_body``), with its limits; ``image_items`` turns it into one batch item per image.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Literal

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from refinery.core.settings import ImageSettings, ServingSettings
from serving.bento import Pins, service_settings
from serving.openai_schema import ApiError, Text

log = logging.getLogger("refinery.images")

PINS = Pins.load()
DEFAULTS = ImageSettings()
_SIZE = re.compile(r"^(\d{1,4})x(\d{1,4})$")


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text = Field(min_length=1, max_length=1000)
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str = "256x256"
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = None  # accepted for compatibility; one quality here
    style: str | None = None
    user: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    steps: int | None = Field(default=None, ge=1)


def parse_size(size: str, max_side: int = DEFAULTS.max_side) -> tuple[int, int]:
    match = _SIZE.match(size.strip().lower())
    if match is None:
        raise ApiError(400, f"size {size!r}: use WIDTHxHEIGHT, e.g. 256x256", param="size",
                       code="invalid_size")  # fmt: skip
    w, h = int(match.group(1)), int(match.group(2))
    if not (8 <= w <= max_side and 8 <= h <= max_side) or w % 8 or h % 8:
        raise ApiError(
            400, f"size {size!r}: each side must be a multiple of 8 from 8 to {max_side}",
            param="size", code="invalid_size",
        )  # fmt: skip
    return w, h


def image_items(
    body: ImageGenerationRequest, limits: ImageSettings = DEFAULTS
) -> list[dict[str, Any]]:
    """One batch item per image (seed, seed+1, …), or a 400 that says what is wrong."""
    max_n, max_steps = limits.max_n, limits.max_steps
    if body.response_format != "b64_json":
        raise ApiError(
            400, "response_format 'url' is not offered: this service stores no images; use b64_json",
            param="response_format", code="unsupported_response_format",
        )  # fmt: skip
    if body.n > max_n:
        raise ApiError(400, f"n is {body.n}; this service makes at most {max_n} images a request",
                       param="n", code="too_many_images")  # fmt: skip
    if body.steps is not None and body.steps > max_steps:
        raise ApiError(400, f"steps is {body.steps}; the limit is {max_steps}", param="steps",
                       code="too_many_steps")  # fmt: skip
    width, height = parse_size(body.size, limits.max_side)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - max_n)
    return [
        {
            "prompt": body.prompt,
            "seed": seed + i,
            "steps": body.steps or 0,
            "width": width,
            "height": height,
        }
        for i in range(body.n)
    ]


def images_response(results: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """OpenAI's images response; a refused item becomes the 400 it carries."""
    for r in results:
        if "error" in r:
            raise ApiError(int(r.get("status", 400)), str(r["error"]), param="prompt",
                           code=str(r.get("code", "invalid_prompt")))  # fmt: skip
    return {
        "created": int(time.time()),
        "model": model,
        "data": [
            {"b64_json": r["b64_json"], "revised_prompt": None, "seed": r["seed"]} for r in results
        ],
    }


# Images sampled together across requests; 1 turns adaptive batching off (BentoML refuses a
# batchable API whose batches hold one item): each request is then sampled on its own. BentoML
# fixes the batching when the class is defined: see serving.bento.service_settings.
_BATCH = service_settings().images


@bentoml.service(name="refinery-image", workers=1, traffic={"timeout": 300})
class ImageModel:
    if PINS is not None and PINS.image_model_tag:
        model = bentoml.models.BentoModel(PINS.image_model_tag)

    def __init__(self, settings: ServingSettings | None = None) -> None:
        self.settings = settings or service_settings()
        self.generator: Any = None
        self.load_error: str | None = None
        threading.Thread(target=self._start, name="load-image-model", daemon=True).start()

    def _start(self) -> None:
        from refinery.core.registry import read_model_folder
        from refinery.vision.diffusion import ImageGenerator

        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            local = read_model_folder(Path(self.model.path))
            self.generator = ImageGenerator(
                local.weights, device=device, threads=self.settings.torch_threads
            )
        except Exception as err:
            log.exception("loading the image model failed")
            self.load_error = f"{type(err).__name__}: {err}"

    def __is_ready__(self) -> bool:
        return self.generator is not None

    def __is_alive__(self) -> bool:
        return self.load_error is None

    @bentoml.api(
        batchable=_BATCH.max_batch > 1,
        max_batch_size=max(2, _BATCH.max_batch),
        max_latency_ms=_BATCH.max_latency_ms,
    )
    def draw(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each item: prompt, seed, steps (0: the model's default), width, height. Returns
        ``b64_json`` and ``seed`` per item, or ``error``/``status`` for an item the model
        cannot draw (the others in the batch are still drawn)."""
        from refinery.vision.diffusion import ImageRequest, PromptError, to_png

        if self.generator is None:
            return [{"error": "the image model is loading", "status": 503, "code": "starting"}
                    for _ in items]  # fmt: skip
        gen = self.generator
        out: list[dict[str, Any]] = [{} for _ in items]
        todo: list[tuple[int, ImageRequest]] = []
        for i, item in enumerate(items):
            try:
                gen.check(str(item["prompt"]))
            except PromptError as err:
                out[i] = {"error": str(err), "status": 400, "code": "invalid_prompt"}
                continue
            steps = int(item.get("steps") or gen.default_steps)
            todo.append((i, ImageRequest(str(item["prompt"]), int(item["seed"]), steps,
                                         int(item["width"]), int(item["height"]))))  # fmt: skip
        if todo:
            t0 = time.perf_counter()
            images = gen.generate([r for _, r in todo])
            share = (time.perf_counter() - t0) / len(todo)
            for (i, r), image in zip(todo, images, strict=True):
                out[i] = {"b64_json": base64.b64encode(to_png(image)).decode(), "seed": r.seed,
                          "compute_s": share}  # fmt: skip
        return out
