"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all)."""

from __future__ import annotations

import importlib
import sys

from refinery.core.settings import OFFLINE_ENV

ALL = [
    "ingestion",
    "hnsw",
    "retrieval",
    "confidence",
    "answers",
    "training",
    "serving",
    "automation",
    "traffic",
    "traces",
    "guard",
    "soak",
    "images",
    "image_vectors",
    "image_generation",
    "make_run",
]


def main(argv: list[str]) -> int:
    import os

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    names = argv or ALL
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {ALL}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== benchmark: {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
