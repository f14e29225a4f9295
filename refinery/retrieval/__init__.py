"""Retrieval: sentence embedding (torch or ONNX int8), the pgvector store, hybrid search with
reciprocal-rank fusion and per-document caps, and the `refinery query` lookup."""
