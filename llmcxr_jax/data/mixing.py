"""Mixing sources with weights until every one is exhausted: HF `interleave_datasets(stopping_strategy=
"all_exhausted")` as the original used it (SPEC §7), as a random-access Grain selection map.

Grain's own `MapDataset.mix` stops at the first exhausted source. Here an epoch of the mix is the shortest
prefix of a fixed weighted interleave in which every source has contributed at least its size, so the largest
source (relative to its weight) is read exactly once and the others are recycled: with 0.8 MIMIC / 0.2 Dolly the
epoch holds ~|MIMIC| / 0.8 examples. The interleave is deterministic (a smooth weighted round robin over integer
proportions), so proportions are exact per period instead of drawn; the pipeline shuffles the mixed epoch.

Keys keep counting across epochs of the mix (epoch e of source j continues at e × its per-epoch count), so a
recycled source walks through fresh epochs of itself: Grain's `shuffle` reshuffles each epoch of its parent.
"""
from __future__ import annotations

import fractions
import math
from collections.abc import Sequence

import grain
import numpy as np


MAX_PERIOD = 1_000_000  # one period of the interleave is built in Python and held in memory


def integer_proportions(weights: Sequence[float], max_denominator: int = 1000) -> tuple[int, ...]:
    """Smallest integers in the ratio of `weights` (each weight rounded to a fraction with denominator <= 1000)."""
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"mixing weights must be positive, got {list(weights)}")
    total = sum(weights)
    fracs = [fractions.Fraction(w / total).limit_denominator(max_denominator) for w in weights]
    if any(f == 0 for f in fracs):
        raise ValueError(f"mixing weights {list(weights)}: one is below 1/{max_denominator} of the total")
    scale = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * scale) for f in fracs]
    common = math.gcd(*ints)
    proportions = tuple(i // common for i in ints)
    if sum(proportions) > MAX_PERIOD:  # three or more groups of unrelated denominators; two stay <= 1,000
        raise ValueError(f"mixing weights {list(weights)}: in integers {proportions}, a mixing period of "
                         f"{sum(proportions):,} examples (at most {MAX_PERIOD:,}); round the weights, e.g. to "
                         f"{[round(w / total, 2) for w in weights]}")
    return proportions


def _round_robin(proportions: Sequence[int]) -> np.ndarray:
    """One period (sum of proportions long) of source indices, each source spread evenly (nginx's smooth WRR)."""
    total, current, out = sum(proportions), [0] * len(proportions), []
    for _ in range(total):
        current = [c + p for c, p in zip(current, proportions)]
        pick = max(range(len(current)), key=lambda j: current[j])
        current[pick] -= total
        out.append(pick)
    return np.asarray(out, np.int64)


class AllExhaustedMix(grain.transforms.DatasetSelectionMap):
    """Position k of the mix -> (source index, key in that source); `len` is one epoch of the mix."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float]):
        if len(sizes) != len(weights) or any(n <= 0 for n in sizes):
            raise ValueError(f"need one positive size per weight, got sizes {list(sizes)}, weights {list(weights)}")
        self._proportions = np.asarray(integer_proportions(weights), np.int64)
        self._pattern = _round_robin(self._proportions.tolist())
        # rank of each pattern slot among the slots of its source: the key offset within a period
        self._rank = np.zeros(len(self._pattern), np.int64)
        slots = [np.flatnonzero(self._pattern == j) for j in range(len(sizes))]
        for j_slots in slots:
            self._rank[j_slots] = np.arange(len(j_slots))
        period = len(self._pattern)

        def end_of(j: int, n: int) -> int:  # one past the position of source j's n-th element
            q, t = divmod(n - 1, int(self._proportions[j]))
            return q * period + int(slots[j][t]) + 1

        self._length = max(end_of(j, n) for j, n in enumerate(sizes))
        full, rest = divmod(self._length, period)
        self._per_epoch = full * self._proportions + np.bincount(self._pattern[:rest], minlength=len(sizes))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        epoch, position = divmod(int(index), self._length)
        q, r = divmod(position, len(self._pattern))
        j = int(self._pattern[r])
        return j, int(epoch * self._per_epoch[j] + q * self._proportions[j] + self._rank[r])


def mix_all_exhausted(datasets: Sequence[grain.MapDataset], weights: Sequence[float],
                      sizes: Sequence[int] | None = None) -> grain.MapDataset:
    """Mix `datasets` until each is exhausted; `sizes` (default their lengths) sets the epoch, e.g. to keep it
    equal on every process when their slices differ by one element."""
    sizes = [len(d) for d in datasets] if sizes is None else list(sizes)
    return grain.MapDataset.select_from_datasets(list(datasets), AllExhaustedMix(sizes, weights))
