"""Refinery's domain library: plain packages, usable and testable without Dagster or BentoML.

Import direction, top to bottom (checked by import-linter, see pyproject.toml):

- ``rag`` (prompt, answer, confidence) | ``ingestion`` (files into Postgres: documents, chunks,
  vectors, with content hashes so reruns change only what changed)
- ``safety``: the prompt-injection guard and the text screens for documents and chunks
- ``retrieval``: embedding, the pgvector store, hybrid search, the ``refinery query`` lookup
- ``corpus``: scanning and parsing files, OCR of images and scans, chunking
- ``generation`` (chat engines, scoring, speculation) | ``vision`` (the image classifier and
  the image-generation model)
- ``core``: settings, database schema, embedded stores, the model registry client, lineage tags

``training/`` and ``evaluation/`` build on these; ``serving/`` is the HTTP side only.
"""

__version__ = "0.1.0"
