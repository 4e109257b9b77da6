"""A small script- and stopword-based language guesser, enough to filter CoT data by language.

Scripts decide most languages (CJK ideographs → zh unless kana → ja, Hangul → ko, Cyrillic → ru, Thai,
Bengali, Telugu, Arabic, Devanagari). Latin-script text is told apart by its most frequent function words
(en, de, fr, es, sw — the Latin-script languages of MGSM); with none it is ``"latin"``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_SCRIPT_RANGES: tuple[tuple[str, int, int], ...] = (
    ("kana", 0x3040, 0x30FF),
    ("han", 0x3400, 0x4DBF),
    ("han", 0x4E00, 0x9FFF),
    ("han", 0xF900, 0xFAFF),
    ("hangul", 0xAC00, 0xD7AF),
    ("hangul", 0x1100, 0x11FF),
    ("cyrillic", 0x0400, 0x04FF),
    ("thai", 0x0E00, 0x0E7F),
    ("bengali", 0x0980, 0x09FF),
    ("telugu", 0x0C00, 0x0C7F),
    ("arabic", 0x0600, 0x06FF),
    ("devanagari", 0x0900, 0x097F),
    ("greek", 0x0370, 0x03FF),
)
_SCRIPT_LANG = {
    "hangul": "ko",
    "cyrillic": "ru",
    "thai": "th",
    "bengali": "bn",
    "telugu": "te",
    "arabic": "ar",
    "devanagari": "hi",
    "greek": "el",
}
# Frequent words of one language only (words shared by two of them, like "la" or "que", would not help).
_STOPWORDS = {
    "en": "the and is of to in that it for with was are this be on as you have how many what".split(),
    "de": "der die das und ist nicht ein eine zu mit den von für auf sie es wie viele dem".split(),
    "fr": "le les et est des une du pour dans pas il elle sur combien au ce qui chaque avec sont ses aux".split(),
    "es": "el los las y es una por para con cuántos cuántas del su al lo cada tiene qué sus muy".split(),
    "sw": "na ya wa kwa ni za katika je kila ana alikuwa hii huo kuna gani ngapi".split(),
}
_WORD_RE = re.compile(r"[^\W\d_]+", re.UNICODE)


def script_counts(text: str) -> Counter[str]:
    """Letters of ``text`` per script (``latin`` for any other alphabetic character)."""
    counts: Counter[str] = Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        cp = ord(ch)
        for name, lo, hi in _SCRIPT_RANGES:
            if lo <= cp <= hi:
                counts[name] += 1
                break
        else:
            counts["latin" if unicodedata.name(ch, "").startswith("LATIN") else "other"] += 1
    return counts


def detect_lang(text: str) -> str:
    """Best guess of ``text``'s language: an ISO 639-1 code, ``"latin"``, or ``""`` for no letters.

    Ideographs count more than alphabetic letters (one character is about a word), so Chinese with some
    English terms and formulas still reads as Chinese.
    """
    counts = script_counts(text)
    if not counts:
        return ""
    weighted = Counter({k: v * (3 if k in ("han", "kana", "hangul") else 1) for k, v in counts.items()})
    script, _ = weighted.most_common(1)[0]
    if script in ("han", "kana"):
        # Japanese mixes kana into kanji; Chinese has none.
        return "ja" if counts["kana"] >= 0.1 * (counts["kana"] + counts["han"]) else "zh"
    if script == "latin":
        words = Counter(w.lower() for w in _WORD_RE.findall(text))
        scores = {lang: sum(words[w] for w in stop) for lang, stop in _STOPWORDS.items()}
        best = max(scores, key=scores.__getitem__)
        return best if scores[best] > 0 else "latin"
    return _SCRIPT_LANG.get(script, script)
