"""MIMIC-CXR builder on a fixture tree: records, counts, splits, stage-2 selection, task alternation, metadata.

Expectations come from the fixture's description (tests/mimic_fixture.py) and SPEC §5/§6 written out here, not
from the builder's code.
"""
from __future__ import annotations

import collections
import dataclasses
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llmcxr_jax.data.mimic_builder import MimicCxrConfig, MimicCxrLlmcxr
from llmcxr_jax.data.mimic_codes import VqganMismatchError, load_codes, require_vqgan
from llmcxr_jax.data.mimic_files import ImageRow, report_path
from llmcxr_jax.data.mimic_records import plan_split
from mimic_fixture import (FINGERPRINT, GRID, NUM_CODES, OUR_SPLITS, Study, reconstructed_selection,
                           write_mimic_tree)
from vqgan_flax.codes import CodesMeta, import_pickle


def build(fx, data_dir, config):
    builder = MimicCxrLlmcxr(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=fx.root))
    return builder


def expected_report(study, stage):
    """SPEC §5 on the fixture's report kinds; None = the sample is skipped (parse failure)."""
    if stage == 1:
        return {"findings_impression": f"{study.findings} {study.impression}", "impression_only": study.impression,
                "findings_only": study.findings}.get(study.report)
    return study.impression if study.report in ("findings_impression", "impression_only") else None


def expected(fx, stage, selection):
    """split -> (list of (dicom_id, direction, report, view, codes)), counts), by SPEC §6."""
    invalid_kinds = ("wrong_length", "out_of_range") if fx.codes_format in ("pickle", "imported") else ()
    out = {}
    for split, mimic_splits in OUR_SPLITS.items():
        images = [i for i in fx.images if i.split in mimic_splits]
        counts = collections.Counter(kept=0, invalid_codes=0, outside_selection=0, no_codes=0, no_report=0,
                                     undecodable_report=0, parse_failure=0)
        counts["invalid_codes"] = sum(i.codes in invalid_kinds for i in images)
        ordered = sorted((i for i in images if i.codes not in invalid_kinds), key=lambda i: i.dicom_id)
        records = []
        for n, image in enumerate(ordered):
            report = expected_report(image.study, stage)
            if stage == 2 and image.dicom_id not in selection:
                counts["outside_selection"] += 1
            elif image.codes != "valid":
                counts["no_codes"] += 1
            elif image.study.report == "missing":
                counts["no_report"] += 1
            elif report is None:
                counts["parse_failure"] += 1
            else:
                counts["kept"] += 1
                records.append((image.dicom_id, ("cxr2report", "report2cxr")[n % 2], report, image.view,
                                image.code_values()))
        out[split] = (records, dict(counts))
    return out


def built_records(builder, split):
    return [(r["dicom_id"].decode(), r["direction"].decode(), r["report"].decode(), r["view"].decode(),
             r["codes"].tolist()) for r in builder.as_data_source(split)]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Fixture trees: codes as an encoded directory and as one imported from the pickle, both without a selection
    file, and as the pickle with one."""
    base = tmp_path_factory.mktemp("mimic")
    return {"dir": write_mimic_tree(base / "dir"),
            "imported": write_mimic_tree(base / "imported", codes_format="imported"),
            "pickle": write_mimic_tree(base / "pickle", codes_format="pickle", selection=True)}


@pytest.fixture(scope="module")
def built(trees, tmp_path_factory):
    """(codes format, config) -> builder, each built once."""
    data = tmp_path_factory.mktemp("tfds")
    return {(fmt, config): build(trees[fmt], data / fmt, config) for fmt in trees for config in ("stage1", "stage2")}


@pytest.mark.parametrize("fmt", ["dir", "imported", "pickle"])
def test_stage1_records_counts_and_alternation(trees, built, fmt):
    fx, builder = trees[fmt], built[(fmt, "stage1")]
    want = expected(fx, 1, None)
    for split in OUR_SPLITS:
        assert built_records(builder, split) == want[split][0]
        assert builder.build_counts[split] == want[split][1]
        assert builder.info.metadata["counts"][split] == want[split][1]
        assert builder.info.splits[split].num_examples == len(want[split][0])
    # every image of the split is accounted for, kept or skipped for one reason
    n_train = sum(i.split == "train" for i in fx.images)
    assert sum(builder.build_counts["train"].values()) == n_train


def test_fixture_exercises_every_skip_and_the_alternation_gap(trees, built):
    """Sanity of the fixture itself: each skip reason occurs, and some consecutive kept records share a
    direction (only possible because i advances over skipped ids)."""
    counts = built[("pickle", "stage1")].build_counts
    for reason in ("invalid_codes", "no_codes", "no_report", "parse_failure"):
        assert counts["train"][reason] > 0 and counts["validation"][reason] + counts["train"][reason] > 1
    directions = [d for _, d, *_ in expected(trees["pickle"], 1, None)["train"][0]]
    assert any(a == b for a, b in zip(directions, directions[1:]))
    assert set(directions) == {"cxr2report", "report2cxr"}


def test_invalid_codes_give_the_same_directions_from_the_pickle_and_the_imported_directory(tmp_path):
    """Four images of one study, d0 with 255 codes: SPEC §6 drops d0 before alternating, so d1 d2 d3 get
    cxr2report, report2cxr, cxr2report, whether the codes are the pickle or a directory imported from it."""
    study = Study("10000001", "50000001", "21800101", "101010.125", "findings_impression")
    report = report_path(tmp_path / "reports", study.subject_id, study.study_id)
    report.parent.mkdir(parents=True)
    report.write_text(study.text())
    values = list(range(GRID[0] * GRID[1]))
    pickle_path = tmp_path / "codes.pickle"
    pickle_path.write_bytes(pickle.dumps({"d0": values[:-1], "d1": values, "d2": values, "d3": values}))
    import_pickle(pickle_path, tmp_path / "codes", CodesMeta(FINGERPRINT, GRID, NUM_CODES, {}))
    rows = [ImageRow(f"d{i}", study.subject_id, study.study_id, "train") for i in range(4)]
    want = [("d1", "cxr2report"), ("d2", "report2cxr"), ("d3", "cxr2report")]
    for source in (pickle_path, tmp_path / "codes"):
        planned, counts = plan_split(rows, {}, load_codes(source, GRID, NUM_CODES), tmp_path / "reports", 1,
                                     None, "train")
        assert [(r.dicom_id, r.direction) for r in planned] == want, source
        assert (counts["invalid_codes"], counts["no_codes"]) == (1, 0), source


def test_stage2_reconstructs_selection_without_file(trees, built):
    fx, builder = trees["dir"], built[("dir", "stage2")]
    selection = reconstructed_selection(fx)
    want = expected(fx, 2, selection)
    for split in OUR_SPLITS:
        assert built_records(builder, split) == want[split][0]
        assert builder.build_counts[split] == want[split][1]
    assert builder.info.metadata["selection"].startswith("reconstructed")
    kept_views = {view for split in OUR_SPLITS for *_, view, _ in want[split][0]}
    assert kept_views <= {"PA", "AP"} and want["train"][1]["outside_selection"] > 0


def test_stage2_uses_selection_file(trees, built):
    fx, builder = trees["pickle"], built[("pickle", "stage2")]
    assert fx.selection_file != reconstructed_selection(fx)  # the fixture makes them differ
    want = expected(fx, 2, fx.selection_file)
    for split in OUR_SPLITS:
        assert built_records(builder, split) == want[split][0]
        assert builder.build_counts[split] == want[split][1]
    assert builder.info.metadata["selection"].startswith("file ")


def test_vqgan_metadata_recorded_and_checked(built, tmp_path):
    meta = built[("dir", "stage1")].info.metadata["vqgan"]
    assert (meta["fingerprint"], meta["grid"], meta["num_codes"]) == (FINGERPRINT, list(GRID), NUM_CODES)
    require_vqgan(meta, "dataset", fingerprint=FINGERPRINT, grid=GRID)
    with pytest.raises(VqganMismatchError, match="fingerprint"):
        require_vqgan(meta, "dataset", fingerprint="another-vqgan")
    with pytest.raises(VqganMismatchError, match="grid"):
        require_vqgan(meta, "dataset", grid=(8, 8))
    assert built[("pickle", "stage1")].info.metadata["vqgan"]["fingerprint"] == ""  # pickles carry none


def test_readable_with_tfds_data_source_without_tensorflow(built):
    builder = built[("dir", "stage1")]
    source = tfds.data_source("mimic_cxr_llmcxr/stage1", data_dir=builder.data_dir_root, split="validation")
    first = source[0]
    assert set(first) == {"dicom_id", "subject_id", "study_id", "view", "report", "codes", "direction"}
    assert first["codes"].dtype == np.int16 and first["codes"].shape == (GRID[0] * GRID[1],)
    assert isinstance(first["report"], bytes)
    assert "tensorflow" not in sys.modules


def test_expected_fingerprint_mismatch_fails_the_build(trees, tmp_path):
    config = MimicCxrConfig(name="stage1_other_vqgan", stage=1, expected_vqgan_fingerprint="another-vqgan")
    with pytest.raises(VqganMismatchError, match=f"{FINGERPRINT}.*another-vqgan"):
        build(trees["dir"], tmp_path, config)
    ok = MimicCxrConfig(name="stage1_same_vqgan", stage=1, expected_vqgan_fingerprint=FINGERPRINT)
    assert build(trees["dir"], tmp_path, ok).info.splits["train"].num_examples > 0
    unknown = MimicCxrConfig(name="stage1_pickle_vqgan", stage=1, expected_vqgan_fingerprint=FINGERPRINT)
    with pytest.raises(VqganMismatchError, match="carries no fingerprint"):
        build(trees["pickle"], tmp_path, unknown)


def test_builds_from_a_manual_dir_given_relative_to_the_working_directory(trees, tmp_path, monkeypatch):
    """`--manual_dir MANUAL` as the README writes it: the codes next to the CSVs must be found once, not under
    MANUAL/MANUAL/."""
    monkeypatch.chdir(trees["dir"].root.parent)
    fx = dataclasses.replace(trees["dir"], root=Path(trees["dir"].root.name))
    builder = build(fx, tmp_path, "stage1")
    assert builder.info.splits["train"].num_examples > 0
