"""Automatic evaluation of an image model, and its promotion through the same gate as text.

A judge (a logistic-regression classifier fitted on the image data set's train split: fitted
here in a second, never unpickled) names the class of each generated image; the model's score is
the share of images the judge reads as the class the prompt asked for. The judge's own accuracy
on the held-out test split says how far to trust that score. A sample sheet (one row per class)
goes to MLflow for people to look at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from evaluation.gate import GateDecision, GatePolicy, HumanSummary, MetricRule, compare_to_champion
from refinery.vision.diffusion import ImageGenerator, ImageRequest, prompt_class, sample_requests

ACCURACY = "classifier_accuracy"
IMAGE_RULES = (MetricRule(ACCURACY, tolerance=0.02),)


class DigitJudge:
    """A classifier of the data set's images ((N, 1, S, S) tensors in [-1, 1], flattened):
    fitted on the train split, scored on the test split."""

    def __init__(self, train: tuple[Any, Any], test: tuple[Any, Any]) -> None:
        from sklearn.linear_model import LogisticRegression

        x, y = train
        self.size = int(x.shape[-1])
        self.model = LogisticRegression(max_iter=3000).fit(x.flatten(1).numpy(), y.numpy())
        tx, ty = test
        self.test_accuracy = float(self.model.score(tx.flatten(1).numpy(), ty.numpy()))

    def predict(self, images: list[Any]) -> list[int]:
        import numpy as np
        from PIL import Image

        rows = []
        for image in images:
            small = image.convert("L").resize((self.size, self.size), Image.Resampling.BOX)
            rows.append(np.asarray(small, dtype=np.float32).ravel() / 127.5 - 1.0)
        return [int(c) for c in self.model.predict(np.stack(rows))]


@dataclass(frozen=True)
class ImageEvaluation:
    accuracy: float
    per_class: dict[str, float]
    judge_test_accuracy: float
    images: int
    steps: int
    sheet: str  # PNG path

    def metrics(self) -> dict[str, float]:
        return {
            ACCURACY: self.accuracy,
            "judge_test_accuracy": self.judge_test_accuracy,
            "examples": float(self.images),
            **{f"accuracy_class_{k}": v for k, v in self.per_class.items()},
        }


def evaluate_image_model(
    generator: ImageGenerator,
    judge: DigitJudge,
    out_dir: Path,
    *,
    per_class: int = 10,
    steps: int | None = None,
    seed: int = 1000,
) -> ImageEvaluation:
    """Generate ``per_class`` images of every class and let the judge read them."""
    if generator.card is None:
        raise ValueError(
            "a pipeline checkpoint has no classes to judge: review its sample sheet instead"
        )
    classes = generator.card.classes
    steps = steps or generator.default_steps
    size = generator.card.sample_size
    requests = sample_requests(classes, per_class, steps, size, seed=seed)
    images: list[Any] = []
    for i in range(0, len(requests), 50):
        images += generator.generate(requests[i : i + 50])
    predicted = judge.predict(images)
    wanted = [prompt_class(r.prompt, classes) for r in requests]
    hits: dict[str, list[bool]] = {c: [] for c in classes}
    for want, got in zip(wanted, predicted, strict=True):
        hits[classes[want]].append(want == got)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet = sample_sheet(requests, images, predicted, classes, out_dir / "sample_sheet.png")
    return ImageEvaluation(
        accuracy=sum(w == g for w, g in zip(wanted, predicted, strict=True)) / len(wanted),
        per_class={c: sum(h) / len(h) for c, h in hits.items()},
        judge_test_accuracy=judge.test_accuracy,
        images=len(images),
        steps=steps,
        sheet=str(sheet),
    )


def sample_sheet(
    requests: list[ImageRequest],
    images: list[Any],
    predicted: list[int],
    classes: tuple[str, ...],
    path: Path,
    per_row: int = 10,
) -> Path:
    """One row per class asked for; a red frame marks an image the judge read as another class."""
    from PIL import Image, ImageDraw

    cell, pad = 48, 4
    rows: dict[int, list[tuple[Any, bool]]] = {}
    for r, image, got in zip(requests, images, predicted, strict=True):
        want = prompt_class(r.prompt, classes)
        rows.setdefault(want, []).append((image, want == got))
    sheet = Image.new("RGB", (per_row * (cell + pad) + 40, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (want, cells) in enumerate(sorted(rows.items())):
        top = pad + y * (cell + pad)
        draw.text((8, top + cell // 2 - 6), classes[want], fill="black")
        for x, (image, ok) in enumerate(cells[:per_row]):
            left = 40 + x * (cell + pad)
            tile = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (left, top))
            if not ok:
                draw.rectangle([left, top, left + cell - 1, top + cell - 1], outline="red", width=2)
    sheet.save(path)
    return path


@dataclass(frozen=True)
class ImagePromotion:
    promoted: bool
    reasons: list[str]
    challenger: dict[str, float]
    champion: dict[str, float] | None
    champion_version: str | None
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_image_model(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    policy: GatePolicy,
    *,
    min_accuracy: float,
    human: HumanSummary | None = None,
    champion_version: str | None = None,
) -> ImagePromotion:
    """The text model's gate (``compare_to_champion``) with the image rules, plus a floor:
    a first model must reach ``min_accuracy`` on its own. The text floors (``rag_*``) do not
    apply: an image evaluation has no RAG answers."""
    decision: GateDecision = compare_to_champion(
        challenger, champion, human, replace(policy, rules=IMAGE_RULES, floors=())
    )
    reasons = list(decision.reasons)
    passed = decision.passed
    value = challenger.get(ACCURACY, 0.0)
    if value < min_accuracy:
        passed = False
        reasons.insert(0, f"{ACCURACY}: {value:.3f} is below the floor {min_accuracy:.3f}")
    if not passed and "all rules passed" in reasons:
        reasons.remove("all rules passed")
    return ImagePromotion(passed, reasons, challenger, champion, champion_version, decision.checks)


TAG_PREFIX = "refinery.eval."


def champion_metrics(tracking_uri: str, name: str) -> tuple[str | None, dict[str, float] | None]:
    """The current champion's version and the metrics its evaluation tagged it with."""
    from refinery.core.registry import CHAMPION, ModelNotFoundError, resolve

    try:
        ref = resolve(tracking_uri, name, CHAMPION)
    except ModelNotFoundError:
        return None, None
    metrics = {
        k.removeprefix(TAG_PREFIX): float(v)
        for k, v in ref.tags.items()
        if k.startswith(TAG_PREFIX)
    }
    return ref.version, metrics or None


def record_and_promote(
    tracking_uri: str,
    name: str,
    version: str,
    evaluation: ImageEvaluation,
    policy: GatePolicy,
    *,
    min_accuracy: float,
    run: Any,
) -> ImagePromotion:
    """Log the evaluation to ``run``, tag the version with its metrics, gate it against the
    champion, and move the champion alias to it when it passes. The same version already
    champion stays champion (a rerun changes nothing)."""
    from refinery.core.registry import CHAMPION, resolve
    from refinery.core.tracking import client_for

    metrics = evaluation.metrics()
    # Linked to the version's LoggedModel too, so the Models tab shows it with its scores.
    run.log_metrics(metrics, model_id=resolve(tracking_uri, name, version).model_id)
    run.log_artifact(Path(evaluation.sheet), "review")
    client = client_for(tracking_uri)
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, f"{TAG_PREFIX}{key}", f"{value:.6g}")
    champ_version, champ = champion_metrics(tracking_uri, name)
    if champ_version == version:
        champ_version, champ = None, None  # compared with itself: thresholds only
    outcome = gate_image_model(
        metrics, champ, policy, min_accuracy=min_accuracy, champion_version=champ_version
    )
    run.log_dict(outcome.to_dict(), "gate.json")
    client.set_model_version_tag(
        name, version, "refinery.gate", "passed" if outcome.promoted else "refused"
    )
    if outcome.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return outcome
