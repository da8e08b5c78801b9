"""How a global batch is split over JAX processes: shared by the LM and the image iterators, so both check it
the same way."""

from __future__ import annotations

import grain
import jax

# Examples are formatted in the calling thread: the iterators' state then round-trips exactly through JSON.
IN_CALLING_THREAD = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def process_share(global_batch_size: int, process_index: int | None = None, process_count: int | None = None,
                  ) -> tuple[int, int, int]:
    """(index, count, rows per process) of this process (JAX's unless given, as tests simulate several)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} outside 0..{count - 1}")
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                         f"{count} processes")
    return index, count, global_batch_size // count
