"""The passage that best supports an answer: what ``/rag`` quotes when it withholds the model's
answer, instead of a bare "I don't know".

``best_quote`` splits the retrieved chunks into sentences and scores each by the question's
terms it contains, deterministically and without a model:
- a question's terms are its words (``refinery.rag.text.words``) less stop words and the
  words that only shape a question ("how", "many", "does", "usually" …), each reduced to a
  crude stem (plural, -ing, -ed and a final e dropped: "mating" and "mate" are one term); a
  sentence holds its own terms and those of its chunk's title and section path;
- a term weighs more the fewer retrieved sentences contain it (``log(1 + n / df)``): "queen"
  in every sentence of a chunk about queens says little, "spermatheca" says a lot;
- a question that asks for an amount or a time ("how many", "how long", "what age", "when" …)
  prefers, by a factor of ``NUMBER_BONUS``, a sentence with a number in it;
- the next (or previous) sentence of the same chunk joins the quote when it holds a question
  term the best one lacks, or the previous one when the best starts with a pronoun, so a fact
  split over two sentences is quoted whole.

The minimum support: a sentence supports an answer only when it holds at least two distinct
question terms (the one term of a one-term question), at least one of them in its own words,
and those carry at least ``MIN_COVERAGE`` of the question's weight. Below that ``best_quote``
returns None and the caller says the documents do not answer. Headings, fragments cut by a
chunk's edge and runs over ``MAX_SENTENCE_CHARS`` are never quoted; a quote keeps the chunk's
words, less list marks and bold marks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from refinery.rag.text import STOP_WORDS, words

if TYPE_CHECKING:
    from refinery.retrieval.search import Hit

MIN_TERMS = 2  # distinct question terms a supporting sentence holds (fewer if the question has)
MIN_COVERAGE = 0.25  # share of the question's weight they carry
NUMBER_BONUS = 1.25  # amount and time questions: a sentence with a number scores this much more
MAX_SENTENCE_CHARS = 400  # longer runs (tables, unsplit lists) are not quotable sentences
MAX_QUOTE_CHARS = 450  # a two-sentence quote stays under this
CONTEXT_SHARE = 0.5  # the rank weight of a term only the chunk's headings hold
MIN_WORDS = 4  # fewer words: a heading or a label, not a sentence

# Words that make a sentence a question rather than say what it asks about.
_QUESTION_TEXT = (
    "what which who whom whose when where why how many much long often old far big "
    "does do did done can could should would will shall may might must has have had "
    "there their they them she her he his you your we our us my me i "
    "roughly about approximately around usually typically generally normally "
    "kind sort type one some any than also if not no so but just only very more most less "
    "into onto over under before after during between within like go goes get gets need "
    "needs difference"
)
QUESTION_WORDS = frozenset(_QUESTION_TEXT.split())
_AMOUNT = re.compile(
    r"\b(?:how (?:many|much|long|old|often|far|big|high|large|soon|warm|cold|hot)|"
    r"what (?:age|temperature|size|percentage|proportion|number|time|month|season|year)|"
    r"at what|when (?:do|does|did|is|are|was|were|should|will|can|must))\b",
    re.IGNORECASE,
)
_NUMBER = re.compile(
    r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|"
    r"thirty|forty|fifty|hundred|thousand|million|dozen|half|quarter)\b",
    re.IGNORECASE,
)
# A sentence ends at . ! or ? (maybe closing a quote or bracket), then space and a capital, a
# digit or an opening quote or bracket; not after an abbreviation.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[A-Z0-9])")
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|approx|ca|c|vs|cf|fig|no|dr|mr|mrs|ms|st)\.$", re.I)
_LIST_MARK = re.compile(r"^\s*(?:#{1,6}\s+|[-*+•]\s+|\d{1,2}[.)]\s+|>\s*)")
_END_MARKS = ".!?:;\"')]"
_PRONOUN = re.compile(
    r"(?:it|its|they|their|them|this|these|that|those|she|her|he|his|such)\b", re.I
)
_RULE = re.compile(r"^[\s=\-_*#|:]*$")  # "=====", "---", table borders


@dataclass(frozen=True)
class Quote:
    """A passage of one retrieved chunk, quoted verbatim."""

    text: str
    source: str
    chunk_id: str
    title: str


@dataclass(frozen=True)
class _Sentence:
    hit: int  # index of its chunk among the hits
    position: int  # index of the sentence in its chunk
    text: str
    terms: frozenset[str]  # its own
    held: frozenset[str]  # its own and its chunk's title and section path's
    quotable: bool  # a whole sentence, not a heading or a piece the chunk boundary cut


def stem(word: str) -> str:
    """A crude stem, enough to match a question's word to a sentence's ("flights",
    "flight"; "mating", "mate"; "laying", "lays")."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in ("ing", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


_QUESTION_STEMS = frozenset(map(stem, QUESTION_WORDS))


def terms(text: str) -> frozenset[str]:
    """The stems of the words of ``text`` that carry content (``refinery.rag.text.words``
    less stop words and the words that only shape a question; a lone digit counts: "a year
    ending in 3"). Hyphens split words, so "brood-rearing" meets "brood rearing"."""
    return frozenset(
        t
        for w in words(text)
        if w not in STOP_WORDS
        and (len(w) > 1 or w.isdigit())
        and (t := stem(w)) not in _QUESTION_STEMS
    )


def _title_like(line: str) -> bool:
    """A heading: short, capitalized, without punctuation inside or a sentence mark at its end
    ("Signs", "From emergence to first flight"; not "Red: years ending 3 or 8")."""
    return (
        len(line) < 60
        and line[0].isupper()
        and line[-1] not in _END_MARKS
        and not any(c in line for c in ":;,")
    )


def _lines(text: str) -> list[str]:
    """The logical lines of a chunk: a line wrapped inside a paragraph (PDF text) joins the
    one before it; a list item, a heading or a short line without a full stop (a title)
    stands alone. List marks and heading hashes are dropped, rules skipped."""
    out: list[str] = []
    joinable = False  # whether the next line may continue the last one
    for raw in text.splitlines():
        line = _LIST_MARK.sub("", raw).replace("**", "").replace("__", "").strip()
        if not line or _RULE.match(line):
            joinable = False
            continue
        alone = line != raw.strip() or _title_like(line)
        if joinable and not alone and (line[0].islower() or len(out[-1]) > 60):
            out[-1] = f"{out[-1]} {line}"
        else:
            out.append(line)
        joinable = not _title_like(line) and (line == raw.strip() or line[-1] not in _END_MARKS)
    return out


def sentences(text: str) -> list[str]:
    """The sentences of a chunk: its logical lines (``_lines``) split where a sentence ends,
    not after an abbreviation."""
    out: list[str] = []
    for line in _lines(text):
        pieces: list[str] = []
        for piece in _SENTENCE_END.split(line):
            if pieces and _ABBREVIATION.search(pieces[-1]):  # "e.g. Langstroth" goes on
                pieces[-1] = f"{pieces[-1]} {piece}"
            else:
                pieces.append(piece)
        out.extend(pieces)
    return out


def asks_amount(question: str) -> bool:
    """Whether the question asks for a number, an age, a duration or a time."""
    return bool(_AMOUNT.search(question))


def quotable(text: str, first: bool, last: bool) -> bool:
    """Whether a sentence can be quoted: long enough to say something (a heading does not),
    not cut by its chunk's edge (chunks overlap, so the whole sentence is in the next one)."""
    if len(text) > MAX_SENTENCE_CHARS or len(words(text)) < MIN_WORDS or _title_like(text):
        return False
    return not (first and text[0].islower()) and not (last and text[-1] not in _END_MARKS)


def _split(hits: Sequence[Hit]) -> list[_Sentence]:
    out = []
    for i, h in enumerate(hits):
        around = terms(h.context or h.title)
        found = sentences(h.text)
        for j, text in enumerate(found):
            own = terms(text)
            ok = quotable(text, j == 0, j == len(found) - 1)
            out.append(_Sentence(i, j, text, own, own | around, ok))
    return out


def _weights(asked: frozenset[str], found: Sequence[_Sentence]) -> dict[str, float]:
    """Each question term's weight: the fewer retrieved sentences say it themselves, the
    heavier. A term no sentence holds weighs most (it still counts in the share a sentence
    must cover)."""
    n = max(1, len(found))
    return {t: math.log(1 + n / max(0.5, sum(t in s.terms for s in found))) for t in sorted(asked)}


def _score(s: _Sentence, asked: frozenset[str], weight: dict[str, float], amount: bool) -> float:
    """How well ``s`` supports an answer; 0 below the minimum support (see the module).
    Terms only its chunk's headings hold count for the support, half as much for the rank: every
    sentence under "The Queen's Mating Flight" shares them."""
    own, held = asked & s.terms, asked & s.held
    total = sum(weight.values())
    supported = sum(weight[t] for t in held) >= MIN_COVERAGE * total
    if not own or len(held) < min(MIN_TERMS, len(asked)) or not supported:
        return 0.0
    score = sum(weight[t] for t in own) + CONTEXT_SHARE * sum(weight[t] for t in held - own)
    return score * NUMBER_BONUS if amount and _NUMBER.search(s.text) else score


def _extend(best: _Sentence, found: Sequence[_Sentence], asked: frozenset[str]) -> str:
    """The best sentence, with a neighbour in its chunk when the two stay short and the
    neighbour is needed: the one before when the best starts with a pronoun ("It needs warm
    weather …" names nothing), else one that holds a question term the best one lacks (the
    following one first)."""

    def near(step: int) -> _Sentence | None:
        for s in found:
            if s.hit == best.hit and s.position == best.position + step and s.quotable:
                return s
        return None

    before, after, missing = near(-1), near(1), asked - best.terms
    if before and _PRONOUN.match(best.text):
        pair = f"{before.text} {best.text}"
    elif after and after.terms & missing:
        pair = f"{best.text} {after.text}"
    elif before and before.terms & missing:
        pair = f"{before.text} {best.text}"
    else:
        return best.text
    return pair if len(pair) <= MAX_QUOTE_CHARS else best.text


def best_quote(question: str, hits: Sequence[Hit]) -> Quote | None:
    """The retrieved sentence (or two adjacent ones) that best supports an answer to
    ``question``, or None when no sentence holds enough of the question (see the module)."""
    asked, found = terms(question), _split(hits)
    if not asked or not found:
        return None
    weight, amount = _weights(asked, found), asks_amount(question)
    scored = [(_score(s, asked, weight, amount), s) for s in found if s.quotable]
    # Highest score; ties go to the better-ranked chunk, the earlier, the shorter sentence.
    ranked = sorted(
        (x for x in scored if x[0] > 0),
        key=lambda x: (-round(x[0], 9), x[1].hit, x[1].position, len(x[1].text)),
    )
    if not ranked:
        return None
    best = ranked[0][1]
    hit = hits[best.hit]
    return Quote(_extend(best, found, asked), hit.source, hit.chunk_id, hit.title or hit.source)
