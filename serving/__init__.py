"""The online path and the code ingestion shares with it. Plain library code: never imports
dagster.

- ``serving.corpus``: parsing files, chunking, embedding, the pgvector store, retrieval
- ``serving.runtime``: loading registered chat models, generation, scoring, alias following
- ``serving.rag``, ``serving.guard``: RAG prompts and answers; the prompt-injection guard
- ``serving.api``: the BentoML services and what they need (cache, limits, accounting,
  traffic log), and the Bento build
"""
