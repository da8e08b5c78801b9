"""Dolly-15k builder on a generated jsonl: the 200-record held-out split, determinism, bad lines."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llmcxr_jax.data.dolly_builder import Dolly15k, DollyFileError

N = 263
TOO_LONG = (7, 150)  # records whose training text reaches 2048 tokens: dropped before the split, as SPEC §7


def write_jsonl(path, n=N):
    lines = []
    for i in range(n):
        response = "word " * 2100 if i in TOO_LONG else f"Answer {i}."
        rec = {"instruction": f"Question {i}?", "context": "" if i % 3 else f"Context {i}.",
               "response": response, "category": ("open_qa", "closed_qa", "summarization")[i % 3]}
        lines.append(json.dumps(rec))
        if i == 100:
            lines.append("")  # a blank line is not a record
    path.write_text("\n".join(lines) + "\n")


def build(manual, data_dir):
    builder = Dolly15k(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return builder


def indices(builder, split):
    return [int(r["index"]) for r in builder.as_data_source(split)]


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    path = tmp_path_factory.mktemp("dolly")
    write_jsonl(path / "databricks-dolly-15k.jsonl")
    return path


def test_heldout_is_200_of_the_seed_42_permutation_of_the_short_records(manual, tmp_path):
    builder = build(manual, tmp_path)
    held, train = indices(builder, "validation"), indices(builder, "train")
    kept = [i for i in range(N) if i not in TOO_LONG]
    assert len(held) == 200 and len(train) == len(kept) - 200
    assert held == sorted(kept[j] for j in np.random.default_rng(42).permutation(len(kept))[:200])  # the rule
    assert sorted(held + train) == kept
    assert builder.info.metadata["counts"] == {"train": len(kept) - 200, "validation": 200, "too_long": 2}
    rec = builder.as_data_source("validation")[0]
    i = held[0]
    assert rec["instruction"] == f"Question {i}?".encode() and rec["response"] == f"Answer {i}.".encode()
    assert rec["context"] == (b"" if i % 3 else f"Context {i}.".encode())
    assert "tensorflow" not in sys.modules


def test_split_is_deterministic(manual, tmp_path):
    a, b = build(manual, tmp_path / "a"), build(manual, tmp_path / "b")
    assert indices(a, "validation") == indices(b, "validation")
    assert tfds.data_source("dolly15k", data_dir=tmp_path / "a", split="train")[5]["instruction"] == \
        b.as_data_source("train")[5]["instruction"]


@pytest.mark.parametrize("bad, message", [
    ('{"instruction": "q", "context": "", "response": "a", "category": "x"', "not valid JSON"),
    ('{"instruction": "q", "context": "", "response": 3, "category": "x"}',
     "expected a JSON object with string fields"),
    ('["instruction", "context"]', "expected a JSON object with string fields"),
    ('{"instruction": "q", "context": "", "response": "", "category": "x"}', "empty instruction or response"),
])
def test_malformed_line_is_named(tmp_path, bad, message):
    path = tmp_path / "databricks-dolly-15k.jsonl"
    write_jsonl(path, 30)
    lines = path.read_text().splitlines()
    lines[16] = bad  # line 17
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DollyFileError, match=f"{path}:17: {message}"):
        build(tmp_path, tmp_path / "data")


def test_non_utf8_file_names_the_line_and_byte(tmp_path):
    path = tmp_path / "databricks-dolly-15k.jsonl"
    write_jsonl(path, 30)
    lines = path.read_bytes().split(b"\n")
    lines[16] = lines[16].replace(b'"instruction": "', b'"instruction": "caf\xe9 ', 1)  # latin-1, line 17
    path.write_bytes(b"\n".join(lines))
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(DollyFileError, match=f"{path}:17: not UTF-8 text: byte 0xe9 at offset {offset} "):
        build(tmp_path, tmp_path / "data")


def test_too_few_records_to_hold_200_out_names_the_file(tmp_path):
    write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", n=150)  # one of them too long
    with pytest.raises(ValueError, match=r"databricks-dolly-15k.jsonl: 149 records short enough to train on; LLM-CXR "
                                         r"holds 200 out"):
        build(tmp_path, tmp_path / "data")
