"""MIMIC-CXR report text for training and evaluation, parsed by the original's exact rules (SPEC.md §5).

The rules are deliberately the original's, quirks included (the always-added space between FINDINGS and
IMPRESSION, IMPRESSION literals kept in the tail, an empty result accepted), so that targets match its data.
"""
from __future__ import annotations

FINDINGS = "FINDINGS:"
IMPRESSION = "IMPRESSION:"


class ReportParseError(ValueError):
    """The report has no usable section for the stage; the original skipped such samples silently."""


def normalize_report(text: str) -> str:
    """Strip every line, drop empty ones and join with one space (lines as Python's universal newlines split)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return " ".join(line.strip() for line in lines if line.strip())


def parse_report(text: str, stage: int) -> str:
    """The report target of a stage: 1 → FINDINGS + IMPRESSION, 2 (and eval) → IMPRESSION only.

    Raises ReportParseError when the stage's rule finds no section (markers are exact, case-sensitive).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    txt = normalize_report(text)
    n_findings, n_impressions = txt.count(FINDINGS), txt.count(IMPRESSION)
    if stage == 1 and n_findings == 1:
        tail = txt.split(FINDINGS)[1].strip()
        if tail.count(IMPRESSION) == 1:
            findings, impression = tail.split(IMPRESSION)
            return findings.strip() + " " + impression.strip()
        return tail
    if n_impressions != 1:
        wanted = f"exactly one {FINDINGS!r} or" if stage == 1 else "exactly"
        raise ReportParseError(f"stage {stage} needs {wanted} one {IMPRESSION!r}; found {n_findings} {FINDINGS!r} "
                               f"and {n_impressions} {IMPRESSION!r}")
    return txt.split(IMPRESSION)[1].strip()
