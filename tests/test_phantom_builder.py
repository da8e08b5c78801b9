"""TFDS builder `cxr_phantoms`: builds ArrayRecord files and reads them back with tfds.data_source, without TF."""
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llmcxr_jax.data.cxr_phantoms_builder import TEST_OFFSET, CxrPhantoms, CxrPhantomsConfig
from llmcxr_jax.data.phantom import LABELS, make_phantom


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    config = CxrPhantomsConfig(name="tiny", size=32, num_train=5, num_test=3, seed=9)
    CxrPhantoms(config=config, data_dir=path).download_and_prepare()
    return path


def test_builds_array_record_and_reads_back_without_tensorflow(data_dir):
    source = tfds.data_source("cxr_phantoms/tiny", data_dir=data_dir)
    assert {split: len(source[split]) for split in ("train", "test")} == {"train": 5, "test": 3}
    assert list((data_dir / "cxr_phantoms" / "tiny" / "1.0.0").glob("*.array_record-*"))
    assert "tensorflow" not in sys.modules


def test_records_match_the_generator(data_dir):
    source = tfds.data_source("cxr_phantoms/tiny", data_dir=data_dir)
    seen = set()
    for split, offset, count in (("train", 0, 5), ("test", TEST_OFFSET, 3)):
        for record in source[split]:
            index = int(record["dicom_id"].decode().rsplit("-", 1)[1])
            assert offset <= index < offset + count
            case = make_phantom(9, index, 32)
            assert record["dicom_id"].decode() == case.id
            assert record["view"] == b"PA"
            assert record["subject_id"].decode().isdigit() and len(record["study_id"]) == 8
            assert record["report"].decode() == case.report
            np.testing.assert_array_equal(record["image"][..., 0], case.image)
            assert {name: int(record["labels"][name]) for name in LABELS} == case.labels
            seen.add(case.id)
    assert len(seen) == 8  # train and test are disjoint


def test_test_split_does_not_depend_on_the_train_size(tmp_path):
    ids = []
    for num_train in (1, 4):
        config = CxrPhantomsConfig(name=f"n{num_train}", size=32, num_train=num_train, num_test=2, seed=1)
        CxrPhantoms(config=config, data_dir=tmp_path).download_and_prepare()
        test = tfds.data_source(f"cxr_phantoms/n{num_train}", data_dir=tmp_path)["test"]
        ids.append(sorted(r["dicom_id"] for r in test))
    assert ids[0] == ids[1]


@pytest.mark.parametrize("field, value", [("size", 8), ("num_train", -1), ("seed", -3), ("num_test", 10**9)])
def test_bad_config_is_refused_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=field):
        CxrPhantomsConfig(name="bad", **{field: value})
