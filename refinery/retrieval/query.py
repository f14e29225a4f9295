"""One query from the command line, from a cold start: what `refinery query` runs.

A query needs Postgres, the question's vector and one SQL statement, so this path imports no
torch, sentence-transformers, dagster or mlflow: the question is embedded by the ONNX export of
the embedding model (refinery.retrieval.onnx_embedding), made on first use and kept under the home.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from refinery.core.settings import Settings


class QueryError(ValueError):
    pass


def query_embedder(
    settings: Settings, model: str | None, note: Callable[[str], None], onnx: bool = True
) -> Any:
    """The ONNX embedder for ``model`` (exported now if there is no export yet), or the
    sentence-transformers one for a model that cannot be exported (or when ``onnx=False``)."""
    from refinery.retrieval.embedding import Embedder, resolve_embedding_model
    from refinery.retrieval.onnx_embedding import (
        ExportError,
        OnnxEmbedder,
        ensure_export,
        find_export,
    )

    if not onnx:
        return Embedder(model)

    ref = resolve_embedding_model(model)
    found = find_export(settings.models_dir, ref)
    if found is not None:
        return OnnxEmbedder(found)
    embedder = Embedder(model)
    try:
        t0 = time.perf_counter()
        folder = ensure_export(settings.models_dir, embedder)
    except ExportError as err:
        note(f"(the query embedder stays on sentence-transformers: {err})")
        return embedder
    note(f"(exported {ref.name} to ONNX for fast queries in {time.perf_counter() - t0:.0f} s)")
    return OnnxEmbedder(folder)


def run_query(
    settings: Settings,
    question: str,
    *,
    k: int = 5,
    sources: tuple[str, ...] = (),
    formats: tuple[str, ...] = (),
    model: str | None = None,
    mode: str = "hybrid",
    max_per_doc: int | None = None,
    reranker: Any = None,
    onnx: bool = True,
    note: Callable[[str], None] = lambda _m: None,
) -> list[Any]:
    from refinery.core.stores import make_engine
    from refinery.retrieval.embedding import resolve_embedding_model
    from refinery.retrieval.search import Filters, RetrievalError, Retriever, check_question
    from refinery.retrieval.vectorstore import VectorStore

    try:
        question = check_question(question)
        name = resolve_embedding_model(model).name
    except (RetrievalError, ValueError) as err:
        raise QueryError(str(err)) from err
    # (create_schema: a store made by an older version gains the text-search column)
    engine = make_engine(settings=settings, create_schema=True)
    try:
        store = VectorStore(engine)
        space = store.find_space(name)
        if space is None:  # before loading any model
            raise RetrievalError(
                f"no embeddings for model {name!r} yet: run `refinery ingest` first"
            )
        retriever = Retriever(
            store, query_embedder(settings, model, note, onnx), space, mode=mode, reranker=reranker
        )
        return retriever.search(
            question,
            k=k,
            filters=Filters(sources=sources, formats=formats),
            max_per_doc=max_per_doc,
        )
    except RetrievalError as err:
        raise QueryError(str(err)) from err
    finally:
        engine.dispose()
