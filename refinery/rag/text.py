"""Words of a text, the one way RAG and its evaluation read them.

``content_words`` is what the answer's confidence signals count (the share of the answer's
words found in its chunks, of the question's words in them) and what the evaluation's
correctness label counts (the share of the reference's words in the answer). One tokenizer,
so that "supported" and "correct" mean the same words; the fitted confidence model
(``data/rag/confidence.json``) was fitted on signals made by it.
"""

from __future__ import annotations

import re
import string

WORD = re.compile(r"[a-z0-9]+")
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "it",
        "its",
        "this",
        "that",
    ]
)
# Punctuation goes before the text is split: "2,000" is "2000" and "don't" is "dont".
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits, in order (punctuation splits them)."""
    return WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    """The words of ``text`` that carry content: lower-cased, punctuation removed, without
    stop words and one-character words."""
    return {
        w
        for w in WORD.findall(text.lower().translate(_NO_PUNCTUATION))
        if w not in STOP_WORDS and len(w) > 1
    }
