"""The corpus side, shared by ingestion and the online path: parsing files, chunking,
embedding, the pgvector store and retrieval."""
