"""A small script-based guess of a dataset's language, for the model card's ``language`` field."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable

_SCRIPT_LANGUAGE = {"CJK": "zh", "HIRAGANA": "ja", "KATAKANA": "ja", "HANGUL": "ko", "CYRILLIC": "ru",
                    "ARABIC": "ar", "DEVANAGARI": "hi", "GREEK": "el", "HEBREW": "he", "THAI": "th",
                    "LATIN": "en"}


def guess_language(texts: Iterable[str], *, max_chars: int = 50_000) -> str | None:
    """The ISO 639-1 code of the dominant script in ``texts``, or ``None`` when there are no letters.

    Latin script is reported as English: the guess names a script's most likely language, not more.
    Japanese wins over Chinese when kana make up a tenth of the CJK text.
    """
    counts: Counter[str] = Counter()
    seen = 0
    for text in texts:
        for character in text:
            if not character.isalpha():
                continue
            name = unicodedata.name(character, "")
            script = next((key for key in _SCRIPT_LANGUAGE if name.startswith(key)), None)
            if script:
                counts[_SCRIPT_LANGUAGE[script]] += 1
            seen += 1
            if seen >= max_chars:
                break
        if seen >= max_chars:
            break
    if not counts:
        return None
    if counts["ja"] and counts["ja"] * 10 >= counts["zh"] + counts["ja"]:
        return "ja"
    return counts.most_common(1)[0][0]
