"""The small shared core: settings, the database schema, the embedded stores, the MLflow model
registry client and lineage tags. It imports nothing else of Refinery and never imports dagster."""
