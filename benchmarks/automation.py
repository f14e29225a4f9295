"""Reacting to one new document as the corpus grows (100, 1,000, 10,000 documents): the corpus
sensor's tick (stat calls and two queries) and the `ingest` run it requests (just the new file),
side by side with the baseline of the same job over the whole folder (every file read and
hashed; only the new one parsed, chunked and embedded), in the same run and database.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from benchmarks.common import WORK, Timer, fresh_home, write_table

SIZES = [100, 1_000, 10_000]
WORDS = [
    "bee",
    "hive",
    "queen",
    "drone",
    "worker",
    "brood",
    "comb",
    "honey",
    "nectar",
    "pollen",
    "wax",
    "propolis",
    "swarm",
    "colony",
    "frame",
    "super",
    "varroa",
    "mite",
    "forage",
    "flower",
    "season",
    "winter",
    "spring",
    "cluster",
    "apiary",
    "smoker",
]
CLIENTS = 32
HIT_REQUESTS = 1500
EMBED_REQUESTS = 320


def make_corpus(dst: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(n):
        folder = dst / f"part-{i // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        body = " ".join(rng.choice(WORDS) for _ in range(60))
        (folder / f"note-{i:05d}.md").write_text(f"# Note {i}\n\n{body}.\n")
    return dst


def _new_doc(corpus: Path, name: str) -> None:
    (corpus / f"{name}.md").write_text(f"# {name}\n\nA new note about swarming in late spring.\n")


def react(n: int) -> list[object]:
    import dagster as dg

    from assets.resources import PostgresResource
    from orchestration.automation import corpus_sensor
    from orchestration.definitions import defs
    from refinery.core.stores import make_engine
    from refinery.corpus.chunking import ChunkingConfig
    from refinery.ingestion.sync import make_chunker, sync_chunks, sync_documents, sync_embeddings
    from refinery.retrieval.embedding import Embedder
    from refinery.retrieval.vectorstore import VectorStore

    with fresh_home(f"automation-{n}") as settings:
        corpus = make_corpus(settings.home / "corpus", n)
        os.environ["REFINERY_CORPUS_DIR"] = str(corpus)
        store = VectorStore(make_engine(settings=settings))
        store.create_schema()
        embedder = Embedder()
        with Timer() as initial:  # the corpus as it was before the new file (not measured here)
            sync_documents(store, corpus)
            sync_chunks(store, make_chunker(ChunkingConfig(), embedder))
            sync_embeddings(store, embedder, batch_size=64)
        store.engine.dispose()
        instance = dg.DagsterInstance.ephemeral()
        job = defs.resolve_job_def("ingest")
        # Warm-up: imports and the first MLflow run are paid once, not by the first size.
        job.execute_in_process(
            run_config={"ops": {"source_documents": {"config": {"paths": ["none.md"]}}}},
            instance=instance,
        )

        _new_doc(corpus, "swarm-a")
        with (
            Timer() as tick,
            dg.build_sensor_context(
                instance=instance, resources={"postgres": PostgresResource()}
            ) as ctx,
        ):
            result = corpus_sensor(ctx)
        (request,) = result.run_requests
        assert request.run_config["ops"]["source_documents"]["config"]["paths"] == ["swarm-a.md"]
        with Timer() as triggered:
            assert job.execute_in_process(run_config=request.run_config, instance=instance).success

        _new_doc(corpus, "swarm-b")
        with Timer() as whole:
            assert job.execute_in_process(
                run_config={"ops": {"source_documents": {"config": {"corpus_dir": str(corpus)}}}},
                instance=instance,
            ).success
        os.environ.pop("REFINERY_CORPUS_DIR", None)
    print(n, tick.seconds, triggered.seconds, whole.seconds, flush=True)
    return [
        f"{n:,}",
        f"{initial.seconds:.0f}",
        f"{tick.seconds * 1000:.0f}",
        f"{triggered.seconds:.1f}",
        f"{whole.seconds:.1f}",
        f"{whole.seconds / triggered.seconds:.1f}×",
    ]


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    react_rows = [react(n) for n in SIZES]
    write_table(
        "automation",
        "Automation: reacting to one new document as the corpus grows",
        """
One new Markdown file dropped into a corpus of N short notes (one chunk each), all-MiniLM-L6-v2
on CPU. "Sensor tick": `corpus_sensor` evaluated once (finds the new file). "Triggered run": the
`ingest` job with the sensor's run config (just that file). "Whole-folder run": the same job
without `paths` after a second new file (reads and hashes every file; parses, chunks and
embeds only the new one). Both runs include Dagster's and MLflow's fixed cost per run (three
assets, three MLflow runs, the asset checks).
""",
        [
            "documents",
            "initial ingest s",
            "sensor tick ms",
            "triggered run s",
            "whole-folder run s",
            "whole / triggered",
        ],
        react_rows,
    )


if __name__ == "__main__":
    main()
