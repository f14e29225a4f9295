"""Retrieval-augmented answers: the prompt, the answer with its sources, and its confidence."""
