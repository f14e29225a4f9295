"""Retrieval-augmented answers: the prompt and its injection checks (``prompt``), the answer
with its sources (``answer``), how sure it is (``confidence``), and the words both count
(``text``)."""
