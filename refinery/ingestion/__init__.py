"""Ingestion: documents, chunks and vectors synced into Postgres with stable, content-derived
ids, so a rerun changes only what changed and a bad file is recorded, not fatal."""
