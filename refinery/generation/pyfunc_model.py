"""MLflow "model from code": how a registered Refinery chat model loads and predicts.

MLflow copies this file and ``generator.py`` (via ``code_paths``) into the model; loading
runs this file, which needs no pickled object. Artifacts: ``model`` (a model folder: safetensors
or an ONNX file, and the tokenizer). Model config: ``variant`` (see ``generator.VARIANTS``).

``predict`` takes a list of prompts (or a DataFrame with a ``prompt`` column) and returns the
generated text for each; params: max_new_tokens, temperature, batch_size.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# This file is the model's definition, run by MLflow when it saves or loads the model. MLflow
# asks for type hints on predict to validate inputs; the registered signature does that here.
warnings.filterwarnings(
    "ignore", message=r".*type hints to the `predict` method", category=UserWarning
)


class RefineryChatModel(PythonModel):
    def load_context(self, context: Any) -> None:
        try:
            from generator import load_generator  # shipped beside this file by code_paths
        except ImportError:  # run from a checkout: the same module, from the package
            from refinery.generation.generator import load_generator

        config = context.model_config or {}
        self.generator = load_generator(
            context.artifacts["model"], variant=str(config.get("variant", "none"))
        )

    # model_input has no annotation on purpose: MLflow reads predict's type hints as an input
    # schema and warns on every load about one it cannot use (the signature says it instead).
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        params = params or {}
        if hasattr(model_input, "columns"):  # a DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(x) for x in model_input[column].tolist()]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(x) for x in model_input]
        max_new_tokens = int(params.get("max_new_tokens", 64))
        temperature = float(params.get("temperature", 0.0))
        batch = max(1, int(params.get("batch_size", 8)))
        out: list[str] = []
        for i in range(0, len(prompts), batch):
            out += [
                c.text
                for c in self.generator.generate(
                    prompts[i : i + batch], max_new_tokens, temperature
                )
            ]
        return out


mlflow.models.set_model(RefineryChatModel())
