"""Image generation: images/s and latency at 8 clients, batched against one image at a time,
and the classifier-judged accuracy of the models the image lineage trains.

Models: the class-conditioned UNet2DModel trained by ``training.images`` on scikit-learn's
digits for the demo's 250 steps (``make run``) and the asset's default 600 steps; cached under
benchmarks/.work/images.

Load: 8 client threads, closed loop, each asking for one 64×64 image (25 DDIM steps, a prompt
naming a random digit, its own seed) again as soon as it has its answer, for a fixed time.
Through the service: `POST /v1/images/generations` on a served Bento (the 600-step model as the
image champion beside the packaged chat model), once with adaptive batching
(`REFINERY_IMAGE_MAX_BATCH=16`) and once with batches of one (`=1`), the load generator on the
same 2 cores. In-process, the model alone: "one at a time" runs each request alone (the model
behind a lock); "batched" has a collector take every request waiting (up to 8) as one batch.

Accuracy: 20 images per class (200), judged by a logistic-regression classifier fitted on the
digits' train split; the judge's own accuracy on the held-out test split is shown beside it.
"""

from __future__ import annotations

import queue
import random
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import WORK, write_table
from evaluation.images import DigitJudge, evaluate_image_model
from refinery.vision.diffusion import ImageGenerator, ImageRequest
from training.images import ImageTrainingConfig, load_split, prepare_digits, train_class_conditioned

CLIENTS = 8
DURATION_S = 40.0
SIZE = 64


def _closed_loop(
    step: Callable[[random.Random], bool], seconds: float, seed: int
) -> dict[str, Any]:
    """``CLIENTS`` threads, each calling ``step`` (one request; True when it succeeded) again as
    soon as it returns, until ``seconds`` are up. Each client hands back its own latencies and
    error count; a client that raised fails the benchmark (its exception is re-raised here)
    rather than leaving a thread that quietly stopped counting."""
    stop = time.monotonic() + seconds

    def client(i: int) -> tuple[list[float], int]:
        rng = random.Random(seed + i)
        latencies: list[float] = []
        errors = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            if step(rng):
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        return latencies, errors

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS, thread_name_prefix="client") as pool:
        futures = [pool.submit(client, i) for i in range(CLIENTS)]
        outcomes = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    assert len(outcomes) == CLIENTS and all(lat or err for lat, err in outcomes), outcomes
    latencies = sorted(x for lat, _ in outcomes for x in lat)
    errors = sum(err for _, err in outcomes)
    if not latencies:
        raise RuntimeError(f"no request succeeded ({errors} errors)")
    return {
        "images": len(latencies),
        "errors": errors,
        "per_s": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def _request(rng: random.Random) -> ImageRequest:
    return ImageRequest(f"a handwritten {rng.randrange(10)}", rng.randrange(2**31), 25, SIZE, SIZE)


def _load(generator: ImageGenerator, mode: str) -> dict[str, Any]:
    """The model in-process: each request alone (behind a lock), or batched by a collector."""
    lock = threading.Lock()
    pending: queue.Queue[tuple[ImageRequest, Future[None]]] = queue.Queue()
    done = threading.Event()

    def collector() -> None:
        """Takes every request waiting (up to ``CLIENTS``) as one batch; a failed batch hands
        its error to each of its requests, so no client waits for an answer that never comes."""
        while not done.is_set():
            try:
                batch = [pending.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(batch) < CLIENTS and not pending.empty():
                batch.append(pending.get_nowait())
            try:
                generator.generate([r for r, _ in batch])
            except Exception as err:  # noqa: BLE001 - re-raised in each client of the batch
                for _, answer in batch:
                    answer.set_exception(err)
            else:
                for _, answer in batch:
                    answer.set_result(None)

    def alone(rng: random.Random) -> bool:
        with lock:
            generator.generate([_request(rng)])
        return True

    def batched(rng: random.Random) -> bool:
        answer: Future[None] = Future()
        pending.put((_request(rng), answer))
        answer.result(timeout=600)  # a collector that stopped answering fails the run
        return True

    if mode != "batched":
        return _closed_loop(alone, DURATION_S, seed=0)
    with ThreadPoolExecutor(1, thread_name_prefix="collector") as pool:
        collecting = pool.submit(collector)
        try:
            return _closed_loop(batched, DURATION_S, seed=0)
        finally:
            done.set()
            collecting.result()  # the collector's own failure, if any, is raised here


def _service_load(url: str, seconds: float = DURATION_S) -> dict[str, Any]:
    """``POST /v1/images/generations`` on a served Bento; a non-200 answer counts as an error."""
    import httpx

    with httpx.Client(timeout=120) as http:

        def post(rng: random.Random) -> bool:
            r = _request(rng)
            body = {"prompt": r.prompt, "size": f"{SIZE}x{SIZE}", "seed": r.seed,
                    "steps": r.steps, "response_format": "b64_json"}  # fmt: skip
            try:
                return http.post(url + "/v1/images/generations", json=body).status_code == 200
            except httpx.HTTPError:  # a transport error or timeout is an error, like a 5xx
                return False

        return _closed_loop(post, seconds, seed=100)


def through_service(model_dir: Path) -> list[list[Any]]:
    from benchmarks.common import fresh_home
    from benchmarks.serving import champion_bento, serve
    from refinery.core.stores import prepare_mlflow
    from training.registry import register_folder

    rows: list[list[Any]] = []
    with fresh_home("image-service") as settings:
        register_folder(
            prepare_mlflow(settings), "refinery-image", model_dir, alias="champion",
            artifact_root=settings.mlflow_artifacts_dir, kind="image",
        )  # fmt: skip
        tag, _, _, env = champion_bento(settings)
        for label, batch in (("one at a time (batches of 1)", "1"), ("adaptive batching", "16")):
            with serve(tag, {**env, "REFINERY_IMAGE_MAX_BATCH": batch}) as url:
                _service_load(url, 5)  # a short warm-up round, not counted
                r = _service_load(url)
            rows.append([f"service, {CLIENTS} clients, {label}", f"{r['per_s']:.1f} images/s",
                         f"{r['p50'] * 1000:.0f} ms", f"{r['p99'] * 1000:.0f} ms"
                         + (f" ({r['errors']} errors)" if r["errors"] else "")])  # fmt: skip
    return rows


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
    rows += through_service(models[600])
    generator = ImageGenerator(models[600])
    generator.generate([ImageRequest("a 1", 0, 25, SIZE, SIZE)])  # warm-up
    for mode in ("one at a time", "batched"):
        r = _load(generator, mode)
        rows.append([f"in-process, {CLIENTS} clients, {mode}", f"{r['per_s']:.1f} images/s",
                     f"{r['p50'] * 1000:.0f} ms", f"{r['p99'] * 1000:.0f} ms"])  # fmt: skip
    write_table(
        "image_generation",
        "Image generation: batching and judged accuracy",
        __doc__ or "",
        ["measure", "value", "p50", "p99"],
        rows,
    )
