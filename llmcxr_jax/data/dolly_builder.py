"""TFDS builder `dolly15k`: databricks-dolly-15k from a local jsonl, with the original's 200-record held-out set.

    builder = Dolly15k(data_dir=DATA)   # ArrayRecord by default (tfds_local.py)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR_WITH_JSONL))

As the original (SPEC §7, §8), records whose training text is 2048 or more tokens long (LLM-CXR's tokenizer,
the Dolly templates) are dropped first; of the n kept, `validation` = the 200 at
`numpy.random.default_rng(42).permutation(n)[:200]` (kept records in file order), `train` = the rest; both in
file order. This is the permutation HF datasets' `train_test_split(test_size=200, seed=42)` draws, over the
records the original split: drawn before the filter, it would share only a handful of the original's 200.
`info.metadata["counts"]` has the records per split and the number too long. `index` is the record's 0-based
position among the file's records. Blank lines are not records; any other line that is not a JSON object with
string fields instruction, context, response, category (non-empty instruction and response, as dolly's trainer
demands) stops the build with the file and line number.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from llmcxr_jax.data.text_files import open_utf8
from llmcxr_jax.data.tfds_local import LocalFilesBuilder
from llmcxr_jax.prompts import instruction_example
from llmcxr_jax.tokenizer import LlmCxrTokenizer

JSONL = "databricks-dolly-15k.jsonl"
FIELDS = ("instruction", "context", "response", "category")
HELDOUT_SIZE = 200
HELDOUT_SEED = 42
MAX_LENGTH = 2048  # SPEC §8: a training text must be shorter, in tokens
MANUAL_INSTRUCTIONS = f"""\
Put {JSONL} into the manual directory: dataset databricks/databricks-dolly-15k on the Hugging Face Hub (branch
orig_dataset, 15,011 records, as the original used), or data/{JSONL} of repository databrickslabs/dolly."""


class DollyFileError(ValueError):
    """The jsonl is not UTF-8 or a line of it is not a Dolly record (the message names file and line)."""


def read_dolly_jsonl(path: Path) -> list[dict[str, str]]:
    """The records of the file, each checked: a JSON object with the four string fields."""
    records = []
    with open_utf8(path, DollyFileError) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DollyFileError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in FIELDS):
                raise DollyFileError(f"{path}:{line_no}: expected a JSON object with string fields {list(FIELDS)}")
            if not rec["instruction"] or not rec["response"]:
                raise DollyFileError(f"{path}:{line_no}: empty instruction or response")
            records.append({k: rec[k] for k in FIELDS})
    return records


def short_enough(records: list[dict[str, str]], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Whether each record's training text (the Dolly template, LLM-CXR's tokenizer) has < `max_length` tokens."""
    tokenizer = LlmCxrTokenizer.from_pretrained()
    return np.array([len(instruction_example(tokenizer, r["instruction"], r["context"], r["response"]).input_ids)
                     < max_length for r in records], bool)


def heldout_indices(n: int, size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> np.ndarray:
    """Sorted indices of the held-out records: the first `size` of a seeded permutation of range(n)."""
    if n <= size:
        raise ValueError(f"need more than {size} Dolly records to hold {size} out, got {n}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


class Dolly15k(LocalFilesBuilder):
    """databricks-dolly-15k instruction records."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Records of >= 2048 tokens dropped before the held-out draw, as the original."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        features = {k: tfds.features.Text() for k in FIELDS}
        return tfds.core.DatasetInfo(
            builder=self, description="databricks-dolly-15k with LLM-CXR's 200-record held-out split.",
            features=tfds.features.FeaturesDict({**features, "index": np.int64}),
            homepage="https://github.com/databrickslabs/dolly", license="CC BY-SA 3.0", disable_shuffling=True,
            metadata=tfds.core.MetadataDict(heldout_size=HELDOUT_SIZE, heldout_seed=HELDOUT_SEED))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = Path(dl_manager.manual_dir) / JSONL
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing. {MANUAL_INSTRUCTIONS}")
        records = read_dolly_jsonl(path)
        kept = np.flatnonzero(short_enough(records))
        if len(kept) <= HELDOUT_SIZE:
            raise ValueError(f"{path}: {len(kept)} records short enough to train on; LLM-CXR holds {HELDOUT_SIZE} out "
                             "and trains on the rest, so it needs more (databricks-dolly-15k has ~15,000)")
        heldout, train = np.zeros(len(records), bool), np.zeros(len(records), bool)
        heldout[kept[heldout_indices(len(kept))]] = True
        train[kept] = ~heldout[kept]
        self.info.metadata["counts"] = {"train": int(train.sum()), "validation": int(heldout.sum()),
                                        "too_long": len(records) - len(kept)}
        return {"train": self._generate_examples(records, train),
                "validation": self._generate_examples(records, heldout)}

    def _generate_examples(self, records: list[dict[str, str]], keep: np.ndarray) -> Iterator[tuple[int, dict]]:
        for i in np.flatnonzero(keep).tolist():
            yield i, {**records[i], "index": i}
