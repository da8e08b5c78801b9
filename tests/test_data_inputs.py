"""Bad MIMIC inputs: clear errors naming the file and problem, or counted skips; never a silent drop."""
from __future__ import annotations

import collections
import csv
import datetime
import logging
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llmcxr_jax.data.mimic_builder import MimicCxrLlmcxr
from llmcxr_jax.data.mimic_files import (ManualFilesMissingError, MimicFileError, load_selection,
                                         reconstruct_selection, read_metadata_csv, read_split_csv, report_path)
from llmcxr_jax.data.plain_pickle import PlainPickleError, load_plain_pickle
from mimic_fixture import write_mimic_tree
from vqgan_flax.codes import CodesError


def build(root, data_dir, config="stage1"):
    builder = MimicCxrLlmcxr(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    return builder


def rewrite_csv(path, edit):
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


def test_missing_manual_files_are_named_with_their_source(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    (fx.root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    shutil.rmtree(fx.root / "reports")
    shutil.rmtree(fx.codes_path)
    with pytest.raises(ManualFilesMissingError) as err:
        build(fx.root, tmp_path / "data")
    message = str(err.value)
    for name in ("mimic-cxr-2.0.0-metadata.csv", "reports", "mimic-cxr-256-txvloss_codebook_indices.pickle"):
        assert str(fx.root / name) in message
    assert "mimic-cxr-2.0.0-split.csv" not in message  # present, so not asked for
    assert "physionet.org/content/mimic-cxr-jpg" in message and "mimic-cxr-reports.zip" in message


def test_csv_missing_column(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    path = fx.root / "mimic-cxr-2.0.0-split.csv"
    rewrite_csv(path, lambda rows: [row[:3] for row in rows])  # drops `split`
    with pytest.raises(MimicFileError, match=rf"{path}: missing column\(s\) \['split'\]"):
        build(fx.root, tmp_path / "data")


def test_csv_ragged_row_and_unknown_split_name_the_line(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    split_csv = fx.root / "mimic-cxr-2.0.0-split.csv"
    rewrite_csv(split_csv, lambda rows: rows[:4] + [rows[4][:2]] + rows[5:])
    with pytest.raises(MimicFileError, match=rf"{split_csv}:5: 2 fields, header has 4"):
        read_split_csv(split_csv)
    rewrite_csv(split_csv, lambda rows: rows[:2] + [rows[2][:3] + ["holdout"]] + rows[3:])
    with pytest.raises(MimicFileError, match=rf"{split_csv}:3: split 'holdout'"):
        read_split_csv(split_csv)


def test_a_dicom_id_twice_in_the_metadata_csv_names_both_lines(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    meta_csv = fx.root / "mimic-cxr-2.0.0-metadata.csv"
    rewrite_csv(meta_csv, lambda rows: rows + [rows[1][:4] + ["LATERAL"] + rows[1][5:]])
    with pytest.raises(MimicFileError, match=rf"{meta_csv}:{len(fx.images) + 2}: dicom_id \S+ repeats line 2"):
        read_metadata_csv(meta_csv)


def test_images_missing_from_the_metadata_csv_are_named(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    meta_csv = fx.root / "mimic-cxr-2.0.0-metadata.csv"
    rewrite_csv(meta_csv, lambda rows: rows[:5])
    with pytest.raises(MimicFileError, match=rf"{meta_csv}: no line for {len(fx.images) - 4} of the "
                                         rf"{len(fx.images)} images of mimic-cxr-2.0.0-split.csv, e.g. \["):
        build(fx.root, tmp_path / "data")


@pytest.mark.parametrize("edit", [
    lambda rows: [r for r in rows if r[3] not in ("validate", "test")],  # no validation images at all
    lambda rows: rows[:1],  # a header and nothing else
])
def test_a_split_left_without_records_is_named_with_its_counts(tmp_path, edit):
    """TFDS would stop on the empty split with an assertion and a traceback."""
    fx = write_mimic_tree(tmp_path / "m")
    rewrite_csv(fx.root / "mimic-cxr-2.0.0-split.csv", edit)
    with pytest.raises(MimicFileError, match=r"m: no record of split '(train|validation)' \(.*\) is usable: \{"):
        build(fx.root, tmp_path / "data")


def test_csv_with_a_byte_order_mark_and_blank_lines_reads_as_pandas_reads_it(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    split_csv = fx.root / "mimic-cxr-2.0.0-split.csv"
    plain = read_split_csv(split_csv)
    split_csv.write_bytes(b"\xef\xbb\xbf" + split_csv.read_bytes().replace(b"\n", b"\n\r\n", 1) + b"\r\n\r\n")
    assert read_split_csv(split_csv) == plain


def test_unreadable_study_date_names_the_line(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    meta_csv = fx.root / "mimic-cxr-2.0.0-metadata.csv"
    frontal = next(n for n, i in enumerate(fx.images) if i.view in ("PA", "AP"))  # read for the selection
    line = frontal + 2  # after the header, 1-based
    rewrite_csv(meta_csv, lambda rows: [r if n != line - 1 else r[:7] + ["May 5th"] + r[8:]
                                        for n, r in enumerate(rows)])
    images = read_split_csv(fx.root / "mimic-cxr-2.0.0-split.csv")
    with pytest.raises(MimicFileError, match=rf"{meta_csv}:{line}: StudyDate 'May 5th'"):
        reconstruct_selection(images, read_metadata_csv(meta_csv), meta_csv)


@pytest.mark.parametrize("damage, reason", [("delete", "no_report"), ("latin-1", "undecodable_report"),
                                           ("empty", "parse_failure")])
def test_missing_undecodable_or_empty_report_is_a_counted_skip(tmp_path, caplog, damage, reason):
    fx = write_mimic_tree(tmp_path / "m")
    before = build(fx.root, tmp_path / "before").build_counts["train"]
    kept = [i for i in fx.images if i.split == "train" and i.codes == "valid"
            and i.study.report in ("findings_impression", "impression_only", "findings_only")]
    study = kept[0].study
    path = report_path(fx.root / "reports", study.subject_id, study.study_id)
    if damage == "delete":
        path.unlink()
    elif damage == "empty":
        path.write_text(" \n")
    else:
        path.write_bytes(path.read_bytes().replace(b"EXAMINATION:", b"EXAMINATION: caf\xe9", 1))
    lost = sum(i.study == study for i in kept)
    with caplog.at_level(logging.WARNING, logger="llmcxr_jax.data.mimic_records"):
        after = build(fx.root, tmp_path / "after").build_counts["train"]
    assert after["kept"] == before["kept"] - lost and after[reason] == before[reason] + lost
    if reason != "parse_failure":
        assert after["parse_failure"] == before["parse_failure"]
    assert (f"{path}:2: not UTF-8 text: byte 0xe9" in caplog.text) == (damage == "latin-1")
    assert (f"report skipped: {path} is empty" in caplog.text) == (damage == "empty")


def test_non_utf8_csv_names_the_file_line_and_byte(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    split_csv = fx.root / "mimic-cxr-2.0.0-split.csv"
    data = split_csv.read_bytes()
    third_line = data.index(b"\n", data.index(b"\n") + 1) + 1
    split_csv.write_bytes(data[:third_line] + b"\xff" + data[third_line:])
    with pytest.raises(MimicFileError, match=rf"{split_csv}:3: not UTF-8 text: byte 0xff at offset {third_line} "):
        build(fx.root, tmp_path / "data")


def test_invalid_codes_in_the_pickle_are_counted_and_removed_before_alternating(tmp_path):
    fx = write_mimic_tree(tmp_path / "m", codes_format="pickle")
    counts = build(fx.root, tmp_path / "data").build_counts
    bad = collections.Counter(("train" if i.split == "train" else "validation")
                              for i in fx.images if i.codes in ("wrong_length", "out_of_range"))
    assert {split: counts[split]["invalid_codes"] for split in counts} == dict(bad)
    assert all(counts[split]["invalid_codes"] > 0 for split in counts)


def test_codes_dir_shard_out_of_range_is_an_error_naming_the_shard(tmp_path):
    fx = write_mimic_tree(tmp_path / "m")
    shard = sorted(fx.codes_path.glob("shard-*.npz"))[0]
    with np.load(shard) as data:
        ids, codes = data["ids"], data["codes"].copy()
    codes[0, 0, 0] = 1024
    np.savez(shard, ids=ids, codes=codes)
    with pytest.raises(CodesError, match=f"{shard}.*outside 0..1023"):
        build(fx.root, tmp_path / "data")


def test_codes_pickle_with_non_list_values_is_an_error(tmp_path):
    fx = write_mimic_tree(tmp_path / "m", codes_format="pickle")
    fx.codes_path.write_bytes(pickle.dumps({"a": [1, 2], "b": "not codes"}))
    with pytest.raises(ValueError, match=f"{fx.codes_path}: entry 'b' is not str -> list of int"):
        build(fx.root, tmp_path / "data")


class Sneaky:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-never-run",))


@pytest.mark.parametrize("payload, found", [
    ({"id": 1.5}, "float"), (["a", ("b", "c")], "tuple"), ({"a": None}, "NoneType"), ({"a": True}, "bool"),
    ({"a", "b"}, "set"), ("just a string", "str"),
])
def test_plain_pickle_refuses_other_plain_types(tmp_path, payload, found):
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(PlainPickleError, match=f"{path}: holds a {found}"):
        load_plain_pickle(path, "ids")


def _holding_itself() -> list:
    cycle = ["a", {"b": []}]
    cycle[1]["b"].append(cycle)
    return cycle


def test_plain_pickle_refuses_a_list_that_holds_itself_and_reads_shared_parts(tmp_path):
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps(_holding_itself()))
    with pytest.raises(PlainPickleError, match=f"{path}: holds a list that contains itself"):
        load_plain_pickle(path, "ids")
    shared = ["s", "t"]
    path.write_bytes(pickle.dumps({"x": [shared, shared], "y": shared}))
    assert load_plain_pickle(path, "ids") == {"x": [["s", "t"], ["s", "t"]], "y": ["s", "t"]}


@pytest.mark.parametrize("payload, name", [
    ({"a": Sneaky()}, "shutil.rmtree"), ({"a": datetime.date(2180, 1, 1)}, "datetime.date"),
    (collections.OrderedDict(a=1), "collections.OrderedDict"),
])
def test_plain_pickle_refuses_classes_without_constructing_them(tmp_path, payload, name):
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(PlainPickleError, match=f"refusing to unpickle {name}.*Convert it"):
        load_plain_pickle(path, "ids")


def test_selection_pickle_forms(tmp_path):
    path = tmp_path / "sel.pickle"
    path.write_bytes(pickle.dumps({"d1": {"view": "PA", "n": 3}, "d2": []}))
    assert load_selection(path) == {"d1", "d2"}
    path.write_bytes(pickle.dumps(["d3", "d4"]))
    assert load_selection(path) == {"d3", "d4"}
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(MimicFileError, match="dicom_ids must be strings"):
        load_selection(path)
    path.write_bytes(pickle.dumps({"d1": 1.5}))  # values the original never read: the recipe keeps the keys only
    with pytest.raises(MimicFileError, match=r"(?s)sel.pickle: holds a float; .*keeping only the dicom_id keys"):
        load_selection(path)


def test_build_cli_names_a_directory_where_a_csv_should_be(tmp_path):
    from llmcxr_jax.data import build as build_cli

    fx = write_mimic_tree(tmp_path / "m")
    split_csv = fx.root / "mimic-cxr-2.0.0-split.csv"
    split_csv.unlink()
    split_csv.mkdir()
    with pytest.raises(SystemExit, match=r"^error: .*Is a directory: .*mimic-cxr-2.0.0-split.csv"):
        build_cli.main(["mimic", "--manual_dir", str(fx.root), "--data_dir", str(tmp_path / "data")])
