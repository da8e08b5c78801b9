"""The Grain input pipeline: records of several sources -> mixed, formatted, tokenized, fixed-shape batches.

Training (`make_lm_iterator`), on each process:

    each source: records[process_index::process_count] -> format + tokenize (formatting.py)
    each mixing group (e.g. "mimic+vqa": MIMIC then VQA, concatenated as the original did) -> shuffle(seed)
    mix with weights until every group is exhausted (mixing.py) -> shuffle(seed), reshuffled every epoch
    -> repeat forever -> drop examples of >= max_length tokens (counted) -> batches of B_local -> bucket padding

An epoch is one pass of the mix: `batches_per_epoch = epoch length // B_local`, the same on every process (the
epoch length comes from the global sizes), so `num_epochs` stops all processes after the same number of
batches; dropped examples shift batch boundaries by a few examples instead of shortening an epoch.

Evaluation (`make_eval_iterator`): the same mix without shuffling, one pass, sliced per process after mixing;
every process yields the same number of batches, the last ones padded with zero-weight rows; `num_real` counts
the real rows of a batch.

Sources are any random-access record collections (`tfds.data_source(...)`, `builder.as_data_source(split)` or a
plain list of dicts) keyed by kind: "mimic" (also phantom records), "vqa", "dolly" (fields in formatting.py).
Weights are keyed by mixing group: source names joined by "+"; the default is {"mimic+vqa": 0.8, "dolly": 0.2}
restricted to the sources given (SPEC §7).

Batches: {"input_ids": int32 (B_local, L), "loss_weights": float32 (B_local, L)} with L one of `lengths`;
`loss_weights[t]` is 1 where token t is a supervised target (the response and `### End`), else 0. With several
JAX processes, L is the widest bucket any process needs for that batch (one small all-gather per batch), so every
process compiles and runs the same step.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from llmcxr_jax.data.batching import DEFAULT_LENGTHS, bucket_for, check_lengths, pad_batch
from llmcxr_jax.data.formatting import KINDS, make_formatter
from llmcxr_jax.data.mixing import mix_all_exhausted
from llmcxr_jax.data.process_share import IN_CALLING_THREAD, process_share
from llmcxr_jax.prompts import DEFAULT_SEED
from llmcxr_jax.tokenizer import LlmCxrTokenizer

RecordSource = Sequence[Mapping[str, Any]]
DEFAULT_WEIGHTS = {"mimic+vqa": 0.8, "dolly": 0.2}
DEFAULT_MAX_LENGTH = 2048


class LmIterator(grain.DatasetIterator):
    """Batches from a Grain iterator of examples; `get_state`/`set_state` round-trip through JSON.

    State: the example iterator's Grain state, the number of batches given out and of examples dropped for
    length. `pad_rows` (eval) fills the last batches with padding rows up to `num_batches` and adds `num_real`.
    `epoch_examples` (training's endless stream): dropping twice that many in a row (so one whole reshuffled
    epoch) means every example is too long, which would otherwise loop forever without a step, and so without
    reaching a SIGTERM's checkpoint.
    """

    def __init__(self, examples: grain.DatasetIterator, *, batch_size: int, lengths: tuple[int, ...],
                 max_length: int, pad_id: int, num_batches: int | None, batches_per_epoch: int, pad_rows: bool,
                 agree_width: Callable[[int], int] | None, epoch_examples: int | None = None):
        super().__init__(examples)
        self.batch_size, self.lengths, self.max_length, self.pad_id = batch_size, lengths, max_length, pad_id
        self.agree_width = agree_width
        self.num_batches, self.batches_per_epoch, self.pad_rows = num_batches, batches_per_epoch, pad_rows
        self.batches, self.dropped = 0, 0
        self.epoch_examples, self._dropped_in_a_row = epoch_examples, 0

    def __next__(self) -> dict:
        if self.num_batches is not None and self.batches >= self.num_batches:
            raise StopIteration
        rows = []
        while len(rows) < self.batch_size:
            try:
                example = next(self._parent)
            except StopIteration:
                if not self.pad_rows:
                    raise
                break
            if len(example.input_ids) >= self.max_length:
                self.dropped += 1
                self._dropped_in_a_row += 1
                if self.epoch_examples is not None and self._dropped_in_a_row == 2 * self.epoch_examples:
                    raise ValueError(f"{self._dropped_in_a_row} examples in a row (two epochs of this process's "
                                     f"share) had >= data.max_length={self.max_length} tokens, so no batch can be "
                                     "made; raise data.max_length or check the data and tokenizer")
                continue
            self._dropped_in_a_row = 0
            rows.append(example)
        width = bucket_for(max((len(e.input_ids) for e in rows), default=1), self.lengths)
        if self.agree_width is not None:
            width = self.agree_width(width)
        batch = pad_batch(rows, self.batch_size, width, self.pad_id)
        if self.pad_rows:
            batch["num_real"] = len(rows)
        self.batches += 1
        return batch

    def log_values(self) -> dict[str, float]:
        """This process's share of examples dropped for length so far (the original drops them silently)."""
        kept = self.batches * self.batch_size  # training batches are full; eval's padded rows do not matter here
        return {"dropped_fraction": self.dropped / max(kept + self.dropped, 1)}

    def get_state(self) -> dict:
        return {"examples": self._parent.get_state(), "batches": self.batches, "dropped": self.dropped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["examples"])
        self.batches, self.dropped = int(state["batches"]), int(state["dropped"])


def resolve_groups(names: Sequence[str], weights: Mapping[str, float] | None) -> list[tuple[tuple[str, ...], float]]:
    """Mixing groups as (member source names, weight); every source in exactly one group."""
    unknown = sorted(set(names) - set(KINDS))
    if unknown or not names:
        raise ValueError(f"sources must be a non-empty mapping with keys among {KINDS}, got {list(names)}")
    if weights is None:
        groups = [(tuple(m for m in key.split("+") if m in names), w) for key, w in DEFAULT_WEIGHTS.items()]
        return [(members, w) for members, w in groups if members]
    groups = [(tuple(key.split("+")), float(w)) for key, w in weights.items()]
    members = [m for group, _ in groups for m in group]
    if sorted(members) != sorted(names) or any(not w > 0 for _, w in groups):
        raise ValueError(f"weights {dict(weights)} must give each source of {sorted(names)} exactly once (groups "
                         "join names with '+', e.g. 'mimic+vqa') a positive weight")
    return groups


def _seed(seed: int, *tags: int) -> int:
    """A 32-bit seed for one stage of the pipeline, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


def _width_agreement(count: int) -> Callable[[int], int] | None:
    """With several JAX processes, the widest of their buckets for each batch: a process padding to its own
    would compile a different step, and the collectives would not match. None for one process (or when
    `process_count` only simulates several, as tests do)."""
    if count == 1 or count != jax.process_count():
        return None
    from jax.experimental import multihost_utils

    return lambda width: int(np.max(multihost_utils.process_allgather(np.int32(width))))


def _group(sources: Mapping[str, RecordSource], members: Sequence[str], tokenizer: LlmCxrTokenizer, seed: int,
           part: slice, report_dropout: float = 0.0) -> grain.MapDataset:
    """The formatted members of a group, sliced to `part`, concatenated in order."""
    parts = []
    for name in members:
        ds = grain.MapDataset.source(sources[name])[part]
        if len(ds) == 0:
            raise ValueError(f"source {name!r} has {len(sources[name])} records, too few to give one to "
                             f"each process (slice {part})")
        parts.append(ds.map(make_formatter(name, tokenizer, seed, report_dropout)))
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def make_lm_iterator(sources: Mapping[str, RecordSource], tokenizer: LlmCxrTokenizer, *, global_batch_size: int,
                     process_index: int | None = None, process_count: int | None = None,
                     seed: int = DEFAULT_SEED, weights: Mapping[str, float] | None = None,
                     lengths: Sequence[int] = DEFAULT_LENGTHS, max_length: int = DEFAULT_MAX_LENGTH,
                     num_epochs: int | None = None, report_dropout: float = 0.0) -> LmIterator:
    """The training iterator of this process (`num_epochs=None`: endless). Processes default to JAX's.
    `report_dropout`: the fraction of report→CXR records trained with an empty report (formatting.py)."""
    index, count, batch_size = process_share(global_batch_size, process_index, process_count)
    lengths = check_lengths(lengths, max_length)
    groups = resolve_groups(list(sources), weights)
    datasets = [_group(sources, members, tokenizer, seed, slice(index, None, count), report_dropout)
                .shuffle(_seed(seed, 1, g))
                for g, (members, _) in enumerate(groups)]
    sizes = [sum(math.ceil(len(sources[m]) / count) for m in members) for members, _ in groups]
    mixed = mix_all_exhausted(datasets, [w for _, w in groups], sizes)
    per_epoch = len(mixed) // batch_size
    if per_epoch == 0:
        raise ValueError(f"an epoch of {len(mixed)} examples per process is shorter than one batch of {batch_size}")
    stream = mixed.shuffle(_seed(seed, 2)).repeat().to_iter_dataset(IN_CALLING_THREAD)
    return LmIterator(iter(stream), batch_size=batch_size, lengths=lengths, max_length=max_length,
                      pad_id=tokenizer.pad_id, num_batches=None if num_epochs is None else num_epochs * per_epoch,
                      batches_per_epoch=per_epoch, pad_rows=False, agree_width=_width_agreement(count),
                      epoch_examples=len(mixed))


def make_eval_iterator(sources: Mapping[str, RecordSource], tokenizer: LlmCxrTokenizer, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       seed: int = DEFAULT_SEED, weights: Mapping[str, float] | None = None,
                       lengths: Sequence[int] = DEFAULT_LENGTHS, max_length: int = DEFAULT_MAX_LENGTH,
                       ) -> LmIterator:
    """One unshuffled pass over the mix of `sources` (e.g. validation splits), split over processes."""
    index, count, batch_size = process_share(global_batch_size, process_index, process_count)
    lengths = check_lengths(lengths, max_length)
    groups = resolve_groups(list(sources), weights)
    mixed = mix_all_exhausted([_group(sources, members, tokenizer, seed, slice(None)) for members, _ in groups],
                              [w for _, w in groups])
    num_batches = math.ceil(math.ceil(len(mixed) / count) / batch_size)
    stream = mixed[index::count].to_iter_dataset(IN_CALLING_THREAD)
    return LmIterator(iter(stream), batch_size=batch_size, lengths=lengths, max_length=max_length,
                      pad_id=tokenizer.pad_id, num_batches=num_batches, batches_per_epoch=num_batches, pad_rows=True,
                      agree_width=_width_agreement(count))
