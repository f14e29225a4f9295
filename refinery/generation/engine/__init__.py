"""The generation engine: one interface (``base.Engine``) over continuous-batching backends."""
