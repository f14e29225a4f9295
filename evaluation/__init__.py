"""Automatic and human evaluation and the promotion gate, as plain functions. Never imports
dagster."""
