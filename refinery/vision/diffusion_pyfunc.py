"""MLflow "model from code": how a registered Refinery image model loads and predicts.

MLflow copies this file and ``diffusion.py`` (via ``code_paths``) into the model; loading runs
this file, which needs no pickled object. Artifact ``model``: a Refinery-trained image model
folder or a diffusers pipeline folder (safetensors).

``predict`` takes a list of prompts (or a DataFrame with a ``prompt`` column) and returns one
base64 PNG per prompt; params: seed (the first image's; the next get seed+1, …), steps (0: the
model's default), size (0: the model's own).
"""

from __future__ import annotations

import base64
import warnings
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

warnings.filterwarnings(
    "ignore", message=r".*type hints to the `predict` method", category=UserWarning
)


class RefineryImageModel(PythonModel):
    def load_context(self, context: Any) -> None:
        try:
            from diffusion import ImageGenerator  # shipped beside this file by code_paths
        except ImportError:  # run from a checkout: the same module, from the package
            from refinery.vision.diffusion import ImageGenerator

        self.generator = ImageGenerator(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        try:
            from diffusion import ImageRequest, to_png
        except ImportError:
            from refinery.vision.diffusion import ImageRequest, to_png

        params = params or {}
        if hasattr(model_input, "columns"):  # a DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(x) for x in model_input[column].tolist()]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(x) for x in model_input]
        card = self.generator.card
        size = int(params.get("size") or (card.sample_size if card else 512))
        steps = int(params.get("steps") or self.generator.default_steps)
        seed = int(params.get("seed", 0))
        requests = [ImageRequest(p, seed + i, steps, size, size) for i, p in enumerate(prompts)]
        return [base64.b64encode(to_png(im)).decode() for im in self.generator.generate(requests)]


mlflow.models.set_model(RefineryImageModel())
