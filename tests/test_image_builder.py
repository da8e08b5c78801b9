"""TFDS builder `cxr_images` (folder or MIMIC-CXR-JPG layout, no TensorFlow) and the VQ-GAN training iterator."""
import gzip
import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from llmcxr_jax.data.cxr_phantoms_builder import CxrPhantoms, CxrPhantomsConfig
from llmcxr_jax.data.image_builder import (CxrImages, CxrImagesConfig, ToModelInput, make_eval_iterator,
                                           make_image_iterator, phantom_records)
from llmcxr_jax.data.mimic_files import ManualFilesMissingError
from llmcxr_jax.train_vqgan import image_sources
from train_helpers import load_config
from vqgan_flax.images import load_image, preprocess

SIZE = 32


def _gradient(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.linspace(0, 180, h), np.linspace(0, 60, w))
    return np.clip(base + rng.normal(0, 8, (h, w)), 0, 255).astype(np.uint8)


def write_fixtures(root):
    """Four usable images of different kinds, and three that must be skipped for three different reasons."""
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_gradient(40, 50, 0)).save(root / "a.png")
    Image.fromarray(_gradient(48, 36, 1)).save(root / "sub" / "b.jpg", quality=90)
    gray = _gradient(64, 64, 2)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(root / "c.png")  # RGB file, identical channels
    Image.fromarray((_gradient(40, 40, 3).astype(np.uint16) * 257)).save(root / "d.png")  # 16-bit
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(_gradient(20, 20, 4)).save(root / "small.png")
    colour = np.stack([_gradient(40, 40, 5), _gradient(40, 40, 6), _gradient(40, 40, 7)], axis=-1)
    Image.fromarray(colour).save(root / "colour.png")
    return {"a": root / "a.png", "sub/b": root / "sub" / "b.jpg", "c": root / "c.png", "d": root / "d.png"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    usable = write_fixtures(root)
    data_dir = tmp_path_factory.mktemp("tfds")
    config = CxrImagesConfig(name="t32", size=SIZE, validation_fraction=0.0, num_workers=2)
    builder = CxrImages(config=config, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return builder, config, data_dir, usable


def test_builds_from_a_folder_and_reads_back_without_tensorflow(built):
    builder, _, data_dir, usable = built
    train = builder.as_data_source("train")
    records = {r["image_id"].decode(): r["image"] for r in train}
    assert sorted(records) == sorted(usable)
    for key, path in usable.items():
        # Training sees exactly the LLM-CXR recipe's values (x/255·2 − 1 of the stored pixels).
        expected = preprocess(load_image(path), SIZE)
        np.testing.assert_array_equal(ToModelInput(SIZE)({"image": records[key]})["images"], expected, err_msg=key)
    assert list(data_dir.rglob("*.array_record-*"))
    assert "tensorflow" not in sys.modules


def test_unusable_files_are_counted_and_listed(built):
    builder, config, data_dir, _ = built
    skipped = CxrImages(config=config, data_dir=data_dir).info.metadata["skipped"]  # as stored on disk
    assert sorted(skipped) == ["broken.jpg", "colour.png", "small.png"]
    assert "not a readable image" in skipped["broken.jpg"]
    assert "too small" in skipped["small.png"] and "colour image" in skipped["colour.png"]
    assert builder.build_counts["kept"] == {"train": 4, "validation": 0}


def test_colour_images_are_kept_with_three_channels(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    colour = np.stack([_gradient(40, 40, 5), _gradient(40, 40, 6), _gradient(40, 40, 7)], axis=-1)
    Image.fromarray(colour).save(root / "colour.png")
    config = CxrImagesConfig(name="rgb32", size=SIZE, channels=3, validation_fraction=0.0, num_workers=1)
    builder = CxrImages(config=config, data_dir=tmp_path / "tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    (record,) = builder.as_data_source("train")
    np.testing.assert_array_equal(ToModelInput(SIZE)(record)["images"], preprocess(colour, SIZE))


def test_mimic_layout_follows_the_split_csv(tmp_path):
    root = tmp_path / "mimic"
    ids = {"d1": "train", "d2": "validate", "d3": "test", "d4": "train"}
    for i, dicom in enumerate([*ids, "d5"]):
        folder = root / "files" / "p10" / "p10000032" / f"s5000000{i}"
        folder.mkdir(parents=True)
        Image.fromarray(_gradient(40, 40, i)).save(folder / f"{dicom}.jpg")
    lines = ["dicom_id,study_id,subject_id,split"] + [f"{d},5000000{i},10000032,{s}" for i, (d, s) in
                                                       enumerate(ids.items())]
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(lines) + "\n")
    builder = CxrImages(config=CxrImagesConfig(name="m32", size=SIZE, num_workers=1), data_dir=tmp_path / "tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    stems = {split: sorted(r["image_id"].decode().rsplit("/", 1)[1] for r in builder.as_data_source(split))
             for split in ("train", "validation")}
    assert stems == {"train": ["d1", "d4"], "validation": ["d2", "d3"]}
    assert list(builder.build_counts["skipped"].values()) == ["dicom_id d5 not in mimic-cxr-2.0.0-split.csv"]
    assert builder.info.metadata["counts"]["split_from"] == ("mimic-cxr-2.0.0-split.csv (validation: MIMIC's "
                                                             "validate and test)")


def test_a_gzipped_split_csv_alone_is_refused_not_replaced_by_a_hashed_split(tmp_path):
    """MIMIC-CXR-JPG ships the split CSV gzipped; the hashed split would have put its test images in train."""
    root = tmp_path / "mimic" / "files" / "p10"
    root.mkdir(parents=True)
    Image.fromarray(_gradient(40, 40, 0)).save(root / "d1.jpg")
    with gzip.open(tmp_path / "mimic" / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("dicom_id,study_id,subject_id,split\nd1,50000000,10000032,test\n")
    builder = CxrImages(config=CxrImagesConfig(name="m32", size=SIZE, num_workers=1), data_dir=tmp_path / "tfds")
    with pytest.raises(ManualFilesMissingError, match=r"mimic: mimic-cxr-2.0.0-split.csv.gz is there but not "
                                                      r"mimic-cxr-2.0.0-split.csv: gunzip it"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "mimic")))


def _take(iterator, n):
    return [next(iterator)["images"] for _ in range(n)]


def test_iterator_is_seeded_resumes_exactly_and_splits_processes():
    source = phantom_records(3, 10, SIZE)
    straight = _take(make_image_iterator(source, global_batch_size=4, resolution=SIZE, seed=1), 7)  # > 2 epochs
    assert all(b.shape == (4, SIZE, SIZE, 3) and b.dtype == np.float32 for b in straight)
    assert not np.array_equal(straight[0], straight[2])  # the second epoch is shuffled differently
    first = make_image_iterator(source, global_batch_size=4, resolution=SIZE, seed=1)
    _take(first, 3)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make_image_iterator(source, global_batch_size=4, resolution=SIZE, seed=1)
    resumed.set_state(state)
    for a, b in zip(_take(resumed, 4), straight[3:]):
        np.testing.assert_array_equal(a, b)
    halves = [_take(make_image_iterator(source, global_batch_size=4, resolution=SIZE, seed=1, process_index=i,
                                        process_count=2), 2) for i in range(2)]
    assert all(b.shape[0] == 2 for h in halves for b in h)
    seen = [{x.tobytes() for b in h for x in b} for h in halves]
    assert not seen[0] & seen[1]  # each process reads its own records
    evals = list(make_eval_iterator(source, global_batch_size=4, resolution=SIZE))
    assert len(evals) == 2  # full batches only; the 2 left over are not shown
    np.testing.assert_array_equal(evals[0]["images"][0], ToModelInput(SIZE)(source[0])["images"])


def test_phantom_builder_works_as_a_source(tmp_path):
    config = CxrPhantomsConfig(name="v32", size=SIZE, num_train=4, num_test=1, seed=2)
    CxrPhantoms(config=config, data_dir=tmp_path).download_and_prepare()
    source = tfds.data_source("cxr_phantoms/v32", data_dir=tmp_path)["train"]
    images = np.concatenate(_take(make_image_iterator(source, global_batch_size=2, resolution=SIZE), 2))
    want = {(np.repeat(r["image"], 3, axis=-1) / np.float32(255) * 2 - 1).astype(np.float32).tobytes() for r in source}
    assert {x.tobytes() for x in images} == want


def test_wrong_resolution_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="image is 32x32 but the VQ-GAN's resolution is 64"):
        next(make_image_iterator(phantom_records(0, 2, SIZE), global_batch_size=2, resolution=64))


def test_the_build_cli_makes_the_dataset_the_vqgan_config_reads(tmp_path, capsys):
    from llmcxr_jax.data import build

    root = tmp_path / "images"
    (root / "p10").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_gradient(70, 80, i)).save(root / "p10" / f"img{i}.png")
    Image.fromarray(_gradient(20, 20, 9)).save(root / "tiny.png")
    build.main(["images", "--manual_dir", str(root), "--data_dir", str(tmp_path / "tfds"), "--config", "demo64"])
    printed = capsys.readouterr().out
    source = tfds.data_source("cxr_images/demo64", data_dir=tmp_path / "tfds", split="train")
    assert len(source) == 3 and source[0]["image"].shape == (64, 64, 1)
    assert '"train": 3' in printed and '"skipped": 1' in printed and '"validation": 0' in printed
    assert '"split_from": "validation: 0.01 of the images, by a hash of their paths"' in printed

    # So few images put none in validation, which then has no split: the trainer runs without evaluation.
    config = load_config("vqgan", "tiny")
    config.data.update(source="tfds", builder="cxr_images/demo64", data_dir=str(tmp_path / "tfds"))
    train_source, eval_source = image_sources(config)
    assert len(train_source) == 3 and eval_source == []
    assert "has no 'validation' images (its build put none there)" in capsys.readouterr().out
    config.data.eval_split = "valdation"
    with pytest.raises(ValueError, match="data.eval_split 'valdation': .*Unknown split"):
        image_sources(config)

    # A second build into the same data_dir would be TFDS reusing the first and reporting its counts.
    (root / "p10" / "img0.png").unlink()
    with pytest.raises(SystemExit, match=r"^error: .*cxr_images/demo64/\S+: cxr_images/demo64/\S+ is already built "
                                         r"there; delete that directory"):
        build.main(["images", "--manual_dir", str(root), "--data_dir", str(tmp_path / "tfds"), "--config", "demo64"])
    with pytest.raises(SystemExit, match=r"^error: images has no config demo65; its configs are llmcxr256, "):
        build.main(["images", "--manual_dir", str(root), "--data_dir", str(tmp_path / "new"), "--config", "demo65"])
    (tmp_path / "afile").write_text("")
    for data_dir in (str(tmp_path / "afile"), ""):
        with pytest.raises(SystemExit, match=r"^error: --data_dir .*: give a directory"):
            build.main(["images", "--manual_dir", str(root), "--data_dir", data_dir, "--config", "demo64"])


def test_images_differing_only_in_suffix_are_refused_before_any_decoding(tmp_path):
    from llmcxr_jax.data import build

    root = tmp_path / "images"
    (root / "p10").mkdir(parents=True)
    for name in ("p10/a.png", "p10/a.jpg", "b.png"):
        Image.fromarray(_gradient(70, 80, 0)).save(root / name)
    with pytest.raises(SystemExit, match=r"error: .*images: 1 images differ only in their suffix .*p10/a\.jpg, "
                                         r"p10/a\.png$"):
        build.main(["images", "--manual_dir", str(root), "--data_dir", str(tmp_path / "tfds"), "--config", "demo64"])


def test_build_cli_names_a_missing_manual_dir_and_why_no_image_was_usable(tmp_path):
    from llmcxr_jax.data import build

    with pytest.raises(SystemExit, match=r"^error: --manual_dir .*absent: no such directory"):
        build.main(["images", "--manual_dir", str(tmp_path / "absent"), "--data_dir", str(tmp_path / "tfds")])
    (tmp_path / "images").mkdir()
    for kind, needed in (("images", "JPG, PNG or DICOM"), ("dolly", "databricks-dolly-15k.jsonl"),
                         ("mimic", "mimic-cxr-2.0.0-split.csv")):  # what to put there, from the builder's text
        with pytest.raises(SystemExit, match=rf"^error: --manual_dir .*images is empty; {kind} is built from local "
                                             rf"files in it:\n(.|\n)*{needed}"):
            build.main([kind, "--manual_dir", str(tmp_path / "images"), "--data_dir", str(tmp_path / "tfds")])
    for i in range(2):
        Image.fromarray(_gradient(40, 40, i)).save(tmp_path / "images" / f"img{i}.png")
    with pytest.raises(SystemExit, match=r"^error: .*images: none of the 2 images of split 'train' is usable, e.g. "
                                         r"img0.png: too small: image is 40x40"):
        build.main(["images", "--manual_dir", str(tmp_path / "images"), "--data_dir", str(tmp_path / "tfds")])
