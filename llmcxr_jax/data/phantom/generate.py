"""Phantom records: one reproducible case per (seed, index), with image, findings, labels and report."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from llmcxr_jax.data.phantom.anatomy import sample_anatomy
from llmcxr_jax.data.phantom.findings import Finding, labels_of, sample_findings
from llmcxr_jax.data.phantom.render import render
from llmcxr_jax.data.phantom.reports import write_report

MIN_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One synthetic study. `labels` maps every name in `LABELS` to 0/1; `ctr` is the true cardiothoracic ratio."""

    id: str
    image: np.ndarray  # (size, size) uint8
    findings: tuple[Finding, ...]
    labels: dict[str, int]
    report: str
    ctr: float


def _check(seed: int, index: int, size: int) -> None:
    for name, value in (("seed", seed), ("index", index)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"phantom {name}={value!r}: expected an integer >= 0")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"phantom size={size!r}: expected an integer >= {MIN_SIZE} (pixels per side)")


def make_phantom(seed: int, index: int, size: int = 256, findings: tuple[Finding, ...] | None = None) -> Phantom:
    """Case `index` of the set drawn with `seed`, independent of every other case.

    Findings, anatomy and image noise, and report wording use separate streams spawned from (seed, index), so fixing
    `findings` (e.g. for a contact sheet) or rewording reports leaves the rest of the case unchanged.
    """
    _check(seed, index, size)
    find_rng, image_rng, report_rng = (np.random.default_rng(s)
                                       for s in np.random.SeedSequence([seed, index]).spawn(3))
    if findings is None:
        findings = sample_findings(find_rng)
    findings = tuple(findings)
    anatomy = sample_anatomy(image_rng, findings)
    return Phantom(
        id=f"phantom-{seed}-{index:08d}",
        image=render(anatomy, findings, size, image_rng),
        findings=findings,
        labels=labels_of(findings),
        report=write_report(findings, report_rng),
        ctr=anatomy.ctr,
    )


def make_phantoms(seed: int, start: int, count: int, size: int = 256) -> Iterator[Phantom]:
    """Cases start .. start + count - 1 of the set drawn with `seed`."""
    if count < 0:
        raise ValueError(f"phantom count={count!r}: expected >= 0")
    return (make_phantom(seed, start + i, size) for i in range(count))
