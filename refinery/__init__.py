"""Refinery's small shared core: settings, embedded stores, database schema, lineage tags.

Everything else imports from here; this package imports none of them and never imports dagster.
"""

__version__ = "0.1.0"
