"""The model runtime: loading registered chat models, generating text, scoring answers, and
following a registry alias."""
