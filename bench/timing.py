"""Timing shared by the benchmark scripts: warm up, then the median of repeats (never a single shot)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(call: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds of `repeats` calls after `warmup` calls, seconds of the first call, compile included).

    `call` must block until its result is ready (e.g. end in `block_until_ready()` or `torch.cuda.synchronize()`).
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first
