"""The online path and the code ingestion shares with it: parsing, chunking, embedding,
the pgvector store and retrieval. Plain library code: never imports dagster."""
