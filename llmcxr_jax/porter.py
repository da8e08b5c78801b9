"""The Porter stemmer exactly as `nltk.stem.porter.PorterStemmer()` stems (its default NLTK_EXTENSIONS mode).

ROUGE is only comparable across papers when computed like Google's `rouge-score`, whose `use_stemmer=True` calls
that stemmer; this copy of the rules keeps ROUGE-L exact without making nltk a dependency. The mode is Porter
(1980) with Martin Porter's published changes (`bli`→`ble`, `logi`→`log`) and NLTK's own: a few irregular forms,
`ies`/`ied` on four-letter words, `y`→`i` only after a consonant, `fulli`, `alli` applied recursively, and
`*o` true for a two-letter vowel-consonant stem. A rule list is applied like Porter's: the first rule whose
suffix matches decides, and if its condition fails the word is left unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

_VOWELS = frozenset("aeiou")
_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
              "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
              "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
              "exceed": "exceed", "succeed": "succeed"}

Rule = tuple[str, str, Callable[[str], bool]]


def _consonants(word: str) -> list[bool]:
    """Per letter: consonant? `y` is one at the start or after a vowel, a vowel after a consonant."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        flags.append(ch not in _VOWELS and (ch != "y" or i == 0 or not flags[-1]))
    return flags


def _measure(stem: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel-to-consonant transitions."""
    flags = _consonants(stem)
    return sum(1 for a, b in zip(flags, flags[1:]) if not a and b)


def _has_vowel(stem: str) -> bool:
    return not all(_consonants(stem))


def _ends_cvc(stem: str) -> bool:
    """Porter's *o (consonant-vowel-consonant, last not w/x/y), plus NLTK's two-letter vowel-consonant case."""
    flags = _consonants(stem)
    if len(stem) == 2:
        return not flags[0] and flags[1]
    return len(stem) >= 3 and flags[-3] and not flags[-2] and flags[-1] and stem[-1] not in "wxy"


def _m_above(n: int) -> Callable[[str], bool]:
    return lambda stem: _measure(stem) > n


def _apply(word: str, rules: Sequence[Rule]) -> str:
    for suffix, replacement, condition in rules:
        if word.endswith(suffix):
            stem = word[:len(word) - len(suffix)]
            return stem + replacement if condition(stem) else word
    return word


_STEP1A: tuple[Rule, ...] = tuple((s, r, lambda stem: True) for s, r in
                                  (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")))
_STEP2: tuple[Rule, ...] = tuple((s, r, _m_above(0)) for s, r in (
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"), ("bli", "ble"),
    ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
    ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"),
    ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"))) + (("logi", "log", lambda stem: _measure(stem + "l") > 0),)
_STEP3: tuple[Rule, ...] = tuple((s, r, _m_above(0)) for s, r in (
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")))
_STEP4: tuple[Rule, ...] = tuple(
    (s, "", (lambda stem: _measure(stem) > 1 and stem[-1] in "st") if s == "ion" else _m_above(1))
    for s in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism",
              "ate", "iti", "ous", "ive", "ize"))


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-3] + "ie"
    return _apply(word, _STEP1A)


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[:-len(suffix)]):
            stem = word[:-len(suffix)]
            break
    else:
        return word
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if len(stem) >= 2 and stem[-1] == stem[-2] and _consonants(stem)[-1]:
        return stem if stem[-1] in "lsz" else stem[:-1]
    return stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem


def _step1c(word: str) -> str:
    if word.endswith("y") and len(word) > 2 and _consonants(word)[-2]:
        return word[:-1] + "i"
    return word


def _step2(word: str) -> str:
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-2])
    return _apply(word, _STEP2)


def _step5(word: str) -> str:
    """5a: drop a final e (m>1, or m=1 and not *o); 5b: ll -> l when m>1."""
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        return word[:-1]
    return word


def stem(word: str) -> str:
    """The stem of one word, lowercased; words of one or two letters are only lowercased."""
    lower = word.lower()
    if lower in _IRREGULAR:
        return _IRREGULAR[lower]
    if len(word) <= 2:
        return lower
    return _step5(_apply(_apply(_step2(_step1c(_step1b(_step1a(lower)))), _STEP3), _STEP4))
