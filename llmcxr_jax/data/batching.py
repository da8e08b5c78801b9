"""Examples -> fixed-shape batches: right-padded (id 0, weight 0) to the smallest of a few bucket lengths.

The original padded to the batch maximum rounded up to 8; under `jit` every new length recompiles, so lengths
snap to a short list of buckets instead (at most one compile per bucket). Padding never changes the loss:
padded positions weigh 0, and the causal mask keeps them from influencing earlier tokens.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from llmcxr_jax.prompts import Example

DEFAULT_LENGTHS = (256, 512, 1024, 2048)


def check_lengths(lengths: Sequence[int], max_length: int) -> tuple[int, ...]:
    """Buckets as a sorted tuple; the largest must hold the longest kept example (max_length - 1 tokens)."""
    out = tuple(sorted(int(n) for n in lengths))
    if not out or out[0] <= 0 or len(set(out)) != len(out):
        raise ValueError(f"bucket lengths must be distinct positive ints, got {list(lengths)}")
    if out[-1] < max_length - 1:
        raise ValueError(f"largest bucket {out[-1]} cannot hold examples of up to {max_length - 1} tokens "
                         f"(max_length={max_length}); add a bucket >= {max_length - 1}")
    return out


def bucket_for(length: int, lengths: Sequence[int]) -> int:
    """The smallest bucket >= length (`lengths` sorted)."""
    i = bisect.bisect_left(lengths, length)
    if i == len(lengths):
        raise ValueError(f"an example of {length} tokens exceeds the largest bucket {lengths[-1]}")
    return lengths[i]


def pad_batch(examples: Sequence[Example], batch_size: int, width: int, pad_id: int = 0) -> dict:
    """`input_ids` int32 and `loss_weights` float32, both (batch_size, width); rows past the examples are
    padding rows (all pad, weight 0), which only the eval iterator produces (a batch of none is all padding)."""
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
    ids = np.full((batch_size, width), pad_id, np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        if n > width:
            raise ValueError(f"an example of {n} tokens does not fit a batch {width} wide")
        ids[row, :n] = example.input_ids
        weights[row, :n] = example.loss_weights
    return {"input_ids": ids, "loss_weights": weights}
