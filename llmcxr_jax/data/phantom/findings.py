"""Phantom findings: the structured ground truth, the shared label set, and how findings are drawn at random.

Sides are the patient's: a right-sided finding appears on the image's left (radiological convention).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")
SIZES = ("small", "moderate", "large")  # effusion, pneumothorax
GRADES = ("mild", "moderate", "severe")  # cardiomegaly

# What each kind of finding carries: (has a side, has a zone, allowed severities or None).
ATTRIBUTES = {
    "cardiomegaly": (False, False, GRADES),
    "pleural_effusion": (True, False, SIZES),
    "pneumothorax": (True, False, SIZES),
    "consolidation": (True, True, None),
    "endotracheal_tube": (False, False, None),
    "central_line": (True, False, None),  # right internal jugular or left subclavian
    "pacemaker": (True, False, None),  # side of the generator
}
KINDS = tuple(ATTRIBUTES)
SIDED_KINDS = ("pleural_effusion", "pneumothorax", "consolidation")  # labelled per side
DEVICE_KINDS = ("endotracheal_tube", "central_line", "pacemaker")

# One label per (kind, side) for sided kinds; the judges for reports and images share this list and order.
LABELS = (
    "cardiomegaly",
    "pleural_effusion_right",
    "pleural_effusion_left",
    "pneumothorax_right",
    "pneumothorax_left",
    "consolidation_right",
    "consolidation_left",
    "endotracheal_tube",
    "central_line",
    "pacemaker",
    "no_finding",
)

# Cardiothoracic ratio ranges; the gap between normal and mild keeps the ground truth unambiguous.
CTR_NORMAL = (0.38, 0.48)
CTR_GRADES = {"mild": (0.55, 0.60), "moderate": (0.60, 0.65), "severe": (0.65, 0.71)}

# Probability that each kind is present in a random phantom (independent draws, about a quarter come out normal).
PREVALENCE = {
    "cardiomegaly": 0.25,
    "pleural_effusion": 0.25,
    "pneumothorax": 0.16,
    "consolidation": 0.25,
    "endotracheal_tube": 0.12,
    "central_line": 0.14,
    "pacemaker": 0.10,
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One abnormality; `side`, `zone` and `severity` are None where they do not apply."""

    kind: str
    side: str | None = None
    zone: str | None = None
    severity: str | None = None

    def __post_init__(self):
        if self.kind not in ATTRIBUTES:
            raise ValueError(f"Finding.kind={self.kind!r}: expected one of {KINDS}")
        sided, zoned, severities = ATTRIBUTES[self.kind]
        for field, allowed in (("side", SIDES if sided else None), ("zone", ZONES if zoned else None),
                               ("severity", severities)):
            value = getattr(self, field)
            if not (value in allowed if allowed else value is None):
                raise ValueError(f"Finding({self.kind!r}).{field}={value!r}: expected "
                                 + (f"one of {allowed}" if allowed else "None"))

    @property
    def label(self) -> str:
        return f"{self.kind}_{self.side}" if self.kind in SIDED_KINDS else self.kind


def labels_of(findings: Iterable[Finding]) -> dict[str, int]:
    """The 0/1 label dict of a set of findings; `no_finding` is 1 exactly when nothing else is."""
    positive = {f.label for f in findings}
    labels = {name: int(name in positive) for name in LABELS}
    labels["no_finding"] = int(not positive)
    return labels


def label_vector(labels: Mapping[str, int]) -> np.ndarray:
    """Labels as an int array in `LABELS` order."""
    return np.array([labels[name] for name in LABELS], dtype=np.int64)


def sample_findings(rng: np.random.Generator) -> tuple[Finding, ...]:
    """Independent findings at `PREVALENCE`, avoiding combinations that would hide one another in the image.

    A consolidation never shares a side with a pneumothorax (the collapsed lung would move it), and it sits in the
    upper zone on a side with an effusion (fluid would cover a lower one) and on the left of an enlarged heart (the
    heart would).
    """
    present = {kind: rng.random() < p for kind, p in PREVALENCE.items()}
    found: list[Finding] = []
    if present["cardiomegaly"]:
        found.append(Finding("cardiomegaly", severity=GRADES[rng.integers(3)]))
    effusion_sides: tuple[str, ...] = ()
    if present["pleural_effusion"]:
        effusion_sides = (SIDES, ("right",), ("left",))[rng.choice(3, p=[0.2, 0.4, 0.4])]
        found += [Finding("pleural_effusion", side=s, severity=SIZES[rng.integers(3)]) for s in effusion_sides]
    pneumothorax_side = SIDES[rng.integers(2)] if present["pneumothorax"] else None
    if pneumothorax_side:
        found.append(Finding("pneumothorax", side=pneumothorax_side, severity=SIZES[rng.integers(3)]))
    if present["consolidation"]:
        sides = [s for s in SIDES if s != pneumothorax_side]
        side = sides[rng.integers(len(sides))]
        hidden = side in effusion_sides or (side == "left" and present["cardiomegaly"])
        zone = "upper" if hidden else ZONES[rng.integers(3)]
        found.append(Finding("consolidation", side=side, zone=zone))
    if present["endotracheal_tube"]:
        found.append(Finding("endotracheal_tube"))
    if present["central_line"]:
        found.append(Finding("central_line", side=SIDES[rng.integers(2)]))
    if present["pacemaker"]:
        found.append(Finding("pacemaker", side="left" if rng.random() < 0.85 else "right"))
    return tuple(found)
