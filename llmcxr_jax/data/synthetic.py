"""Synthetic LM batches (`data.source = "synthetic"`): for benchmarks, dry runs and runtime tests.

Each batch is a pure function of (seed, batch index, process), so the iterator state is one integer and a
resumed run sees exactly the batches it would have seen. Rows look like training rows: a prompt with zero
weight, a response with weight one, then right padding with id 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SyntheticBatches:
    """Infinite iterator of `{"input_ids", "loss_weights"}` process-local batches."""

    def __init__(self, *, global_batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, fixed: bool = False):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
        self.local_batch = global_batch_size // process_count
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed
        self.process_index, self.fixed = process_index, fixed
        self.index = 0

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for r in range(self.local_batch):
            global_row = self.process_index * self.local_batch + r
            key = (self.seed, 0 if self.fixed else self.index, global_row)
            rows.append(self._row(np.random.default_rng(key)))
        self.index += 1
        ids, weights = zip(*rows)
        return {"input_ids": np.stack(ids), "loss_weights": np.stack(weights)}

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        length = int(rng.integers(self.seq_len // 2, self.seq_len + 1))
        prompt = int(rng.integers(1, max(length // 2, 2)))
        ids = np.zeros(self.seq_len, np.int32)
        ids[:length] = rng.integers(1, self.vocab_size, length)
        weights = np.zeros(self.seq_len, np.float32)
        weights[prompt:length] = 1.0
        return ids, weights

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
