"""Image generation: images/s and latency at 8 clients, batched against one image at a time,
and the classifier-judged accuracy of the models the image lineage trains.

Models: the class-conditioned UNet2DModel trained by ``training.images`` on scikit-learn's
digits for the demo's 250 steps (``make run``) and the asset's default 600 steps; cached under
benchmarks/.work/images.

Load: 8 client threads in one process, closed loop, each asking for one 64×64 image (25 DDIM
steps, a prompt naming a random digit, its own seed) again as soon as it has its answer, for a
fixed time. "one at a time": each request runs alone (the model behind a lock). "batched": a
collector takes every request waiting (up to 8) and runs them as one batch, as BentoML's
adaptive batching does in the image service (``serving.api.generations.ImageModel``). This is
the model in-process, without HTTP: it shows what batching gains on this CPU, not the service's
end-to-end latency.

Accuracy: 20 images per class (200), judged by a logistic-regression classifier fitted on the
digits' train split; the judge's own accuracy on the held-out test split is shown beside it.
"""

from __future__ import annotations

import queue
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import WORK, write_table
from evaluation.images import DigitJudge, evaluate_image_model
from serving.runtime.imagegen import ImageGenerator, ImageRequest
from training.images import ImageTrainingConfig, load_split, prepare_digits, train_class_conditioned

CLIENTS = 8
DURATION_S = 40.0
SIZE = 64


def _load(generator: ImageGenerator, mode: str) -> dict[str, Any]:
    lock = threading.Lock()
    latencies: list[float] = []
    stop = time.monotonic() + DURATION_S
    pending: queue.Queue[tuple[ImageRequest, threading.Event, list[Any]]] = queue.Queue()

    def collector() -> None:
        while time.monotonic() < stop + 30:
            try:
                first = pending.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < CLIENTS:
                try:
                    batch.append(pending.get_nowait())
                except queue.Empty:
                    break
            images = generator.generate([r for r, _, _ in batch])
            for (_, done, box), image in zip(batch, images, strict=True):
                box.append(image)
                done.set()

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < stop:
            req = ImageRequest(f"a handwritten {rng.randrange(10)}", rng.randrange(2**31), 25,
                               SIZE, SIZE)  # fmt: skip
            t0 = time.perf_counter()
            if mode == "one at a time":
                with lock:
                    generator.generate([req])
            else:
                done, box = threading.Event(), []
                pending.put((req, done, box))
                done.wait()
            latencies.append(time.perf_counter() - t0)

    if mode == "batched":
        threading.Thread(target=collector, daemon=True).start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "images": len(latencies),
        "per_s": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> None:
    work = WORK / "images"
    dataset = prepare_digits(work / "datasets")
    judge = DigitJudge(load_split(dataset, "train"), load_split(dataset, "test"))
    rows: list[list[Any]] = []
    models: dict[int, Path] = {}
    for steps in (250, 600):
        config = ImageTrainingConfig(max_steps=steps)
        trained = train_class_conditioned(
            dataset, config, work / f"model-{config.key(dataset.content_hash)}"
        )
        models[steps] = trained.folder
        ev = evaluate_image_model(ImageGenerator(trained.folder), judge, work / f"eval-{steps}",
                                  per_class=20, seed=5000)  # fmt: skip
        rows.append([f"accuracy, {steps} training steps ({trained.seconds:.0f} s)",
                     f"{ev.accuracy:.3f} (judge on real test digits: {ev.judge_test_accuracy:.3f})",
                     "", ""])  # fmt: skip
    generator = ImageGenerator(models[600])
    generator.generate([ImageRequest("a 1", 0, 25, SIZE, SIZE)])  # warm-up
    for mode in ("one at a time", "batched"):
        r = _load(generator, mode)
        rows.append([f"{CLIENTS} clients, {mode}", f"{r['per_s']:.1f} images/s",
                     f"{r['p50'] * 1000:.0f} ms", f"{r['p99'] * 1000:.0f} ms"])  # fmt: skip
    write_table(
        "image_generation",
        "Image generation: batching and judged accuracy",
        __doc__ or "",
        ["measure", "value", "p50", "p99"],
        rows,
    )
