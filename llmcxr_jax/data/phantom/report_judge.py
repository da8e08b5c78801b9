"""Rule-based report labeler (a small CheXpert-like labeler) over the phantom label set.

A report is split into sentences and clauses; each finding mention is negated NegEx-style when a negation trigger
("no", "without", "negative for", "free of", "resolved", ...) precedes it in its clause, or a post-trigger ("is not
seen", "absent", "has resolved") follows it there. Sides come from the side words next to the mention; a positive
mention without any side word counts for both sides. Hedged mentions ("concerning for", "cannot be excluded") count
as positive, like CheXpert's U-ones policy.
"""
from __future__ import annotations

import re

import numpy as np

from llmcxr_jax.data.phantom.findings import LABELS, SIDED_KINDS, SIDES, label_vector

_ENLARGED = r"(?:enlarged|enlargement|increased in size)"
MENTIONS = {
    "cardiomegaly": (
        r"\bcardiomegaly\b|\bcardiac enlargement\b"
        rf"|\b(?:heart|cardiac)\b(?:\W+\w+){{0,4}}?\W+{_ENLARGED}"
        r"|\benlarge(?:d|ment)\b(?:\W+\w+){0,3}?\W+(?:heart|cardiac)\b"),
    "pleural_effusion": (
        r"(?<!pericardial )\beffusions?\b|\bpleural fluid\b|\bhydrothora(?:x|ces)\b|\blayering fluid\b"
        r"|\bfluid (?:layering )?(?:in|within) the (?:\w+ )?pleural space\b"
        r"|\bblunting of the (?:\w+ )?costophrenic angles?\b|\bcostophrenic angles? (?:is |are )?blunt(?:ed|ing)\b"),
    "pneumothorax": r"\bpneumothora(?:x|ces)\b|\bptx\b|\bpleural air\b|\bair in the pleural space\b",
    "consolidation": (
        r"\bconsolidat(?:ion|ions|ive|ed)\b|\bpneumonias?\b|\binfiltrates?\b"
        r"|\bair[- ]?space (?:disease|opacit(?:y|ies)|opacification|process)\b"
        r"|\b(?:focal|patchy|dense|parenchymal|alveolar|confluent|lobar)\s+(?:\w+\s+)?opacit(?:y|ies|ification)\b"
        r"|\b(?:lobe|lung|zone|base|basilar|lingular)\s+opacit(?:y|ies|ification)\b"
        r"|\bopacit(?:y|ies|ification) (?:in|within|at|of|involving|projecting over) the "
        r"(?:[\w-]+ ){0,3}?(?:lobe|lung|zone|base|apex|lingula)\b"),
    "endotracheal_tube": (r"\bendotracheal (?:and \w+ )?tubes?\b|\bet ?tube\b|\bett\b|\bintubated\b"
                          r"|\bbreathing tube\b"),
    "central_line": (
        r"\bcentral (?:venous )?(?:line|catheter|access)\b|\bcvc\b|\bpicc\b|\bport-?a-?cath\b"
        r"|\b(?:internal jugular|ij|subclavian|jugular)(?: central)?(?: venous)? (?:line|catheter)\b"
        r"|\b(?:dialysis|hemodialysis|swan-ganz|pulmonary artery) catheter\b"),
    "pacemaker": (
        r"\bpacemaker\b|\bpacer\b|\bpacing (?:device|leads?|wires?|generator)\b|\ba?icd\b|\bdefibrillator\b"
        r"|\b(?:dual|single|biventricular)[- ]chamber (?:device|pacemaker)\b"),
}
SIDE_WORDS = {"right": ("right",), "left": ("left",), "bilateral": SIDES, "bilaterally": SIDES, "both": SIDES,
              "bibasilar": SIDES, "bibasal": SIDES, "biapical": SIDES, "lingula": ("left",), "lingular": ("left",)}

PSEUDO_NEGATION = re.compile(
    r"\bno (?:significant |interval |appreciable )?(?:change|increase|decrease)\b|\bnot (?:significantly )?changed\b"
    r"|\bwithout (?:significant |interval )?change\b|\bcan ?not be (?:excluded|ruled out)\b|\bcannot exclude\b"
    r"|\bcan't exclude\b|\bnot be excluded\b|\bnot only\b")
PRE_NEGATION = re.compile(
    r"\bno\b|\bnot\b|\bwithout\b|\bnegative for\b|\bfree of\b|\babsence of\b|\bresolution of\b|\bresolved\b"
    r"|\bremoval of\b|\bruled? out\b|\bclear of\b|\bnor\b|\bneither\b")
POST_NEGATION = re.compile(
    r"\bnot\b|\babsent\b|\bresolved\b|\bcleared\b|\bremoved\b|\bno longer\b|\bruled out\b|\bexcluded\b"
    r"|\bgone\b")
SENTENCE_END = re.compile(r"[.!?](?:\s+|$)|\n")
CLAUSE_END = re.compile(
    r";|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\bwhereas\b|\bwhich\b|\baside from\b"
    r"|\bapart from\b|\bthere (?:is|are)\b|,? and (?:the|there|a|an)\b|, and\b")
SEGMENT_END = re.compile(r",|\band\b|\bor\b|\bwith\b|\bwithout\b|\bplus\b|\bas well as\b|\balong with\b")
SIDE_PATTERN = re.compile(r"\b(" + "|".join(SIDE_WORDS) + r")\b")
MENTION_PATTERNS = {kind: re.compile(pattern) for kind, pattern in MENTIONS.items()}


def _sides(text: str) -> set[str]:
    return {side for word in SIDE_PATTERN.findall(text) for side in SIDE_WORDS[word]}


def _split(pattern: re.Pattern, text: str) -> list[str]:
    return [part for part in pattern.split(text) if part and part.strip()]


def _mentions(clause: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every mention in a clause, in order."""
    return sorted((m.start(), m.end(), kind) for kind, p in MENTION_PATTERNS.items() for m in p.finditer(clause))


def _negated(clause: str, end: int) -> bool:
    """Whether a mention ending at `end` is negated by a cue before its end or after it."""
    return bool(PRE_NEGATION.search(clause[:end]) or POST_NEGATION.search(clause[end:]))


def _gap(word: re.Match, mention: tuple[int, int, str]) -> float:
    """Distance from a side word to a mention; words after the noun count 1.5x, since sides usually precede it."""
    start, end, _ = mention
    if word.start() >= end:
        return 1.5 * (word.start() - end)
    return max(0, start - word.end())


def _mention_sides(clause: str, mentions: list[tuple[int, int, str]]) -> list[set[str]]:
    """Side words of each mention.

    The clause is cut into segments at commas and conjunctions; a side word belongs to the nearest mention of its
    segment. A mention also takes the sides of the mention-free segments just before it: all of them while it has
    none ("pleural line at the left apex, consistent with a pneumothorax"), short ones when it has some
    ("moderate left and small right effusions").
    """
    bounds = [0] + [m.end() for m in SEGMENT_END.finditer(clause)] + [len(clause) + 1]
    segments = list(zip(bounds[:-1], bounds[1:]))
    owner = [next(i for i, (a, b) in enumerate(segments) if a <= start < b) for start, _, _ in mentions]
    sides: list[set[str]] = [set() for _ in mentions]
    for i, (a, b) in enumerate(segments):
        members = [k for k, o in enumerate(owner) if o == i]
        for word in SIDE_PATTERN.finditer(clause, a, b) if members else ():
            nearest = min(members, key=lambda k: _gap(word, mentions[k]))
            sides[nearest].update(SIDE_WORDS[word.group(1)])
    for k, i in enumerate(owner):
        for j in range(i - 1, -1, -1):
            text = clause[slice(*segments[j])]
            if j in owner or (sides[k] and len(text.split()) > 3):
                break
            sides[k] |= _sides(text)
    return sides


def _clause_labels(clause: str, positive: set[str]) -> None:
    mentions = _mentions(clause)
    sides = _mention_sides(clause, mentions)
    for (_, end, kind), found in zip(mentions, sides):
        if _negated(clause, end):
            continue
        if kind not in SIDED_KINDS:
            positive.add(kind)
            continue
        same_kind = set().union(*(s for (_, _, k), s in zip(mentions, sides) if k == kind))
        positive.update(f"{kind}_{side}" for side in (found or same_kind or SIDES))


def report_labels(text: str) -> dict[str, int]:
    """0/1 for every name in `LABELS` read from a free-text report (any section layout)."""
    if not isinstance(text, str):
        raise TypeError(f"report_labels expects the report as str, got {type(text).__name__}")
    positive: set[str] = set()
    for sentence in _split(SENTENCE_END, PSEUDO_NEGATION.sub(" ", text.lower())):
        for clause in _split(CLAUSE_END, sentence):
            _clause_labels(clause, positive)
    labels = {name: int(name in positive) for name in LABELS}
    labels["no_finding"] = int(not positive)
    return labels


def report_label_array(texts) -> np.ndarray:
    """(len(texts), len(LABELS)) int array of `report_labels`, for scoring many reports at once."""
    return np.stack([label_vector(report_labels(t)) for t in texts]) if len(texts) else np.zeros((0, len(LABELS)), int)
