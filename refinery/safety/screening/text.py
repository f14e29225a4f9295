"""Undoing the cheap disguises of injected text before anything scores it.

``normalize`` folds what changes the look but not the words: compatibility forms (fullwidth
letters), zero-width and soft-hyphen characters, look-alike letters from other scripts inside
Latin words ("уоu" with Cyrillic у and о), leetspeak inside words ("1gn0r3"), and letters
spaced out ("i g n o r e", "r-e-v-e-a-l"). ``decodings`` finds text hidden in encodings that a
model can read back (base64, hex, rot13 or reversed text when the message asks for it).
``view`` is what the screens score: the normalized text followed by whatever was decoded.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass, field

_ZERO_WIDTH = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Letters of other scripts that render like Latin ones (the common confusables).
_CONFUSABLES = {
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
    "Т": "T", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S",
    "α": "a", "ο": "o", "ρ": "p", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "τ": "t", "υ": "u",
    "Α": "A", "Β": "B", "Ε": "E", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P",
    "Τ": "T", "Χ": "X", "Υ": "Y", "Ζ": "Z",
}  # fmt: skip
_CONFUSABLE_SET = frozenset(_CONFUSABLES)
_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
)
_LEET_WORD = re.compile(r"[A-Za-z0-9@$]*[A-Za-z][A-Za-z0-9@$]*")
# Digits that are part of ordinary words: "mp3", "covid19", "10am", "2nd", "5kg", "h264".
_NOT_LEET = re.compile(
    r"[a-z]+\d+|\d+(am|pm|st|nd|rd|th|kg|g|mg|ml|l|km|m|cm|mm|h|s|min|x|k|gb|mb|kb|v|w|hz|d)|"
    r"[a-z]\d+[a-z]?\d*"
)
_HEX_TOKEN = re.compile(r"[0-9a-f]{8,}")
_SEP = "-._*"
_DOTTED = re.compile(r"[-._*]?(?:[^\W_][-._*]){4,}[^\W_]?[-._*]?")
_DOTTED_SHORT = re.compile(r"[-._*]?(?:[^\W_][-._*]){1,}[^\W_]?[-._*]?")
_B64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){8,}(?![0-9A-Fa-f])")
_ROT13_CUE = re.compile(r"\brot-?13\b", re.IGNORECASE)
_REVERSE_CUE = re.compile(r"\b(backwards?|reversed?|reverse it)\b", re.IGNORECASE)


@dataclass
class View:
    """What was found while normalizing one text (the flags are classifier features too)."""

    text: str  # normalized, with decoded parts appended
    decoded: list[str] = field(default_factory=list)
    zero_width: bool = False
    confusables: bool = False
    leet: bool = False
    spaced: bool = False
    compat: bool = False  # NFKC changed something (fullwidth letters, ligatures)

    def flags(self) -> list[float]:
        kinds = {d.split(":", 1)[0] for d in self.decoded}
        return [
            float(self.zero_width),
            float(self.confusables),
            float(self.leet),
            float(self.spaced),
            float(self.compat),
            float("base64" in kinds),
            float("hex" in kinds),
            float("rot13" in kinds or "reversed" in kinds),
        ]


FLAG_NAMES = [
    "zero_width",
    "confusables",
    "leet",
    "spaced",
    "compat",
    "base64",
    "hex",
    "rot13_or_reversed",
]


def _fold_word(word: str) -> tuple[str, bool]:
    """Map confusables in a word that is otherwise Latin (a Russian word stays Russian)."""
    if not any(ch in _CONFUSABLE_SET for ch in word):
        return word, False
    if any(ch.isascii() and ch.isalpha() for ch in word) and all(
        ch in _CONFUSABLE_SET or ch.isascii() for ch in word
    ):
        return "".join(_CONFUSABLES.get(ch, ch) for ch in word), True
    return word, False


def _leet_kind(word: str) -> int:
    """0: not leetspeak; 1: could be ("rul35", "4nd", or "mp3"); 2: surely ("1gn0r3", "y0ur")."""
    core = word.strip(".,!?:;'\"()[]").lower()
    if not 2 <= len(core) <= 15 or not _LEET_WORD.fullmatch(core) or core.isalpha():
        return 0
    if core.startswith("0x") or _HEX_TOKEN.fullmatch(core):
        return 0
    return 1 if _NOT_LEET.fullmatch(core) else 2


def _unspace_line(line: str) -> tuple[str, bool]:
    """Collapse spaced-out letters: "i g n o r e  a l l" (two spaces between words) or
    "r-e-v-e-a-l" / "r.e.v.e.a.l"."""
    tokens = line.split(" ")
    filled = [t for t in tokens if t]
    singles = sum(len(t) == 1 for t in filled)
    if singles >= 6 and singles >= 0.6 * len(filled):
        words, current = [], []
        for t in tokens:
            if t:
                current.append(t)
            elif current:  # an empty token: two spaces, a word break
                words.append("".join(current))
                current = []
        if current:
            words.append("".join(current))
        return " ".join(words), True
    if not any(_DOTTED.fullmatch(t) for t in tokens):
        return line, False
    # Once one long run is there, short ones ("-t-h-e-") are part of the same disguise.
    out = [
        "".join(ch for ch in t if ch not in _SEP) if _DOTTED_SHORT.fullmatch(t) else t
        for t in tokens
    ]
    return " ".join(out), True


def normalize(text: str) -> View:
    view = View(text="")
    folded = unicodedata.normalize("NFKC", text)
    view.compat = folded != unicodedata.normalize("NFC", text)
    stripped = _ZERO_WIDTH.sub("", folded)
    view.zero_width = stripped != folded
    lines: list[list[str]] = []
    for line in stripped.split("\n"):
        line, spaced = _unspace_line(line)
        view.spaced |= spaced
        words = []
        for word in line.split():
            word, changed = _fold_word(word)
            view.confusables |= changed
            words.append(word)
        lines.append(words)
    kinds = [_leet_kind(w) for words in lines for w in words]
    # One sure leet word, or two that could be, make the text leetspeak: then every word with
    # digits inside is read as letters ("rul35" too, which alone would read as a product code).
    if kinds.count(2) >= 1 and kinds.count(2) + kinds.count(1) >= 2:
        view.leet = True
        lines = [[w.translate(_LEET) if _leet_kind(w) else w for w in words] for words in lines]
    view.text = "\n".join(" ".join(words) for words in lines if words).lower()
    return view


def _printable_share(text: str) -> float:
    if not text:
        return 0.0
    return sum(ch.isprintable() or ch in "\n\t" for ch in text) / len(text)


def decodings(text: str) -> list[str]:
    """Readable text hidden in base64 or hex runs, or rot13/reversed text the message asks the
    reader to decode. Each as ``kind:text``."""
    found = []
    for m in _B64.finditer(text):
        token = m.group(0)
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            continue
        if _printable_share(decoded) > 0.95 and re.search(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", decoded):
            found.append("base64:" + decoded)
    for m in _HEX.finditer(text):
        try:
            decoded = bytes.fromhex(m.group(0)).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            continue
        if _printable_share(decoded) > 0.95 and re.search(r"[A-Za-z]{2,}", decoded):
            found.append("hex:" + decoded)
    if _ROT13_CUE.search(text):
        found.append("rot13:" + codecs.decode(text, "rot13"))
    if _REVERSE_CUE.search(text):
        found.append("reversed:" + text[::-1])
    return found


def view(text: str) -> View:
    """The normalized text and, appended, the normalized decodings."""
    v = normalize(text)
    v.decoded = decodings(text)
    for d in v.decoded:
        v.text += "\n" + normalize(d.split(":", 1)[1]).text
    return v
