"""Codes directories, the original's pickle, data parallelism and the encode/decode CLIs."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import vqgan_flax
from vqgan_flax import codes as codes_lib
from vqgan_flax import decode as decode_cli
from vqgan_flax import encode as encode_cli
from vqgan_flax.atomic import TMP_SUFFIX
from vqgan_flax.codes import CodesDir, CodesError, CodesMeta, CodesWriter
from vqgan_flax.config import PRESETS
from vqgan_flax.images import load_image, postprocess, preprocess
from vqgan_flax.model import VQGAN
from vqgan_flax.parallel import DataParallel
from vqgan_flax.safe_pickle import restricted_load

TINY = PRESETS["tiny"]
META = CodesMeta("f" * 64, TINY.grid, TINY.num_codes, {"name": "test", "version": 1})


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vqgan")
    vqgan_flax.save(random_model(0), directory)
    return directory


def random_model(seed: int) -> VQGAN:
    return vqgan_flax.checkpoint.build(TINY, vqgan_flax.checkpoint.random_params(TINY, seed))


def random_codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY.num_codes, (n, *TINY.grid)).astype(np.int16)


def test_encode_on_8_devices_equals_one_device():
    devices = jax.local_devices()
    assert len(devices) == 8
    model = random_model(1)
    images = np.random.default_rng(0).uniform(-1, 1, (10, 32, 32, 3)).astype(np.float32)
    eight = DataParallel(VQGAN.encode, model, 10)
    assert eight.batch_size == 16  # 10 images padded to 16, two per device
    on_eight = eight(images)
    on_one = DataParallel(VQGAN.encode, model, 10, devices=devices[:1])(images)  # unpadded, one device
    assert on_eight.shape == (10, 16, 16) and len(np.unique(on_one)) > 1
    np.testing.assert_array_equal(on_eight, on_one)


def test_writer_and_reader_roundtrip(tmp_path):
    writer = CodesWriter(tmp_path, META)
    first, second = random_codes(3, 0), random_codes(2, 1)
    writer.write(["a", "b", "c"], first)
    writer.write(["d", "e"], second.astype(np.int32))  # model output dtype; stored as int16
    reader = CodesDir.open(tmp_path)
    assert reader.meta == META and len(reader) == 5 and "d" in reader and "z" not in reader
    np.testing.assert_array_equal(reader["e"], second[1])
    assert reader["e"].dtype == np.int16
    assert list(reader) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(np.stack([c for _, c in reader.items()]), np.concatenate([first, second]))
    assert CodesWriter(tmp_path, META).done_ids() == {"a", "b", "c", "d", "e"}
    with pytest.raises(CodesError, match="ids already written: \\['a'\\]"):
        CodesWriter(tmp_path, META).write(["a"], random_codes(1))
    with pytest.raises(KeyError, match="no codes for id 'z'"):
        reader["z"]


@pytest.mark.parametrize("hard_links", [True, False])
def test_two_writers_on_one_directory_never_overwrite_or_duplicate(tmp_path, monkeypatch, hard_links):
    """Both counted no shards: the second to write shard 0 stops instead of replacing the first's."""
    if not hard_links:  # e.g. gcsfuse
        monkeypatch.setattr(codes_lib.os, "link", lambda *a: (_ for _ in ()).throw(PermissionError("no links")))
    first, second = CodesWriter(tmp_path, META), CodesWriter(tmp_path, META)
    first.write(["a1", "a2"], random_codes(2))
    with pytest.raises(CodesError, match=r"shard-00000.npz was written meanwhile: another writer is appending"):
        second.write(["b1"], random_codes(1))
    assert sorted(CodesDir.open(tmp_path).done_ids()) == ["a1", "a2"]
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))
    third = CodesWriter(tmp_path, META)  # one writer alone resumes
    third.write(["b1"], random_codes(1))
    assert sorted(CodesDir.open(tmp_path).done_ids()) == ["a1", "a2", "b1"]


def test_resuming_with_other_settings_is_refused(tmp_path):
    CodesWriter(tmp_path, META)
    other = CodesMeta("0" * 64, META.grid, META.num_codes, META.recipe)
    with pytest.raises(CodesError, match="meta.json: cannot resume with different settings \\(fingerprint"):
        CodesWriter(tmp_path, other)


@pytest.mark.parametrize("ids, codes, message", [
    (np.array(["x"]), np.zeros((1, 8, 8), np.int16), r"codes grid \(8, 8\) != \(16, 16\)"),
    (np.array(["x"]), np.full((1, 16, 16), 64, np.int16), r"codes span 64..64, outside 0..63"),
    (np.array(["x"]), np.zeros((1, 16, 16), np.int32), "codes must be int16"),
    (np.array(["x", "y"]), np.zeros((1, 16, 16), np.int16), "2 ids but 1 code maps"),
    (np.array(["x", "x"]), np.zeros((2, 16, 16), np.int16), "duplicate ids within the shard"),
    (np.array([1]), np.zeros((1, 16, 16), np.int16), "ids must be a 1-D unicode array"),
])
def test_bad_shards_are_named(tmp_path, ids, codes, message):
    CodesWriter(tmp_path, META)
    np.savez(tmp_path / "shard-00000.npz", ids=ids, codes=codes)
    with pytest.raises(CodesError, match=f"shard-00000.npz: {message}"):
        CodesDir.open(tmp_path)


def test_pickled_object_shard_and_cross_shard_duplicates(tmp_path):
    writer = CodesWriter(tmp_path, META)
    writer.write(["a"], random_codes(1))
    np.savez(tmp_path / "shard-00001.npz", ids=np.array(["a"]), codes=random_codes(1))
    with pytest.raises(CodesError, match="shard-00001.npz: id 'a' is also in .*shard-00000.npz"):
        CodesDir.open(tmp_path)
    np.savez(tmp_path / "shard-00001.npz", ids=np.array(["b"], dtype=object), codes=random_codes(1))
    with pytest.raises(CodesError, match="shard-00001.npz: unreadable shard: it holds pickled objects, which a codes shard never does"):
        CodesDir.open(tmp_path)


def test_interrupted_shard_write_is_ignored_and_cleaned(tmp_path):
    writer = CodesWriter(tmp_path, META)
    writer.write(["a"], random_codes(1))
    (tmp_path / "shard-00001.npz.tmp").write_bytes(b"PK\x03\x04 half a zip")  # a crash mid-write
    assert CodesDir.open(tmp_path).ids == ["a"]
    resumed = CodesWriter(tmp_path, META)
    assert not (tmp_path / "shard-00001.npz.tmp").exists()
    resumed.write(["b"], random_codes(1))
    assert CodesDir.open(tmp_path).ids == ["a", "b"]


def test_pickle_import_export(tmp_path):
    good = {f"id{i}": random_codes(1, i).reshape(-1).tolist() for i in range(5)}
    bad = {"short": [1] * 255, "too_big": [64] * 256, "negative": [-1] * 256}
    source = tmp_path / "indices.pickle"
    source.write_bytes(pickle.dumps({**good, **bad}))
    kept, dropped = codes_lib.import_pickle(source, tmp_path / "codes", META, shard_size=2)
    assert (kept, dropped) == (5, 3)
    reader = CodesDir.open(tmp_path / "codes")
    assert len(list((tmp_path / "codes").glob("shard-*.npz"))) == 3
    np.testing.assert_array_equal(reader["id3"].reshape(-1), good["id3"])
    assert reader.invalid_ids == set(bad) and not set(bad) & set(reader)  # kept aside, not codes
    codes_lib.export_pickle(reader, tmp_path / "back.pickle")
    with (tmp_path / "back.pickle").open("rb") as f:  # plain dict[str, list[int]], as the original's loader reads
        back = restricted_load(f, "back.pickle", {}, "plain data")
    assert {k: v for k, v in back.items() if k in good} == good
    assert codes_lib.read_pickle(tmp_path / "back.pickle", TINY.grid, TINY.num_codes)[1] == set(bad)


def test_pickle_of_numpy_integers_reads_as_lists_do(tmp_path):
    """Arrays and numpy integers (as `list(array)` or `array` per id would pickle them) hold the same codes;
    validity follows the original's loader for them too, and an empty entry is invalid, not an error."""
    lists = {f"id{i}": random_codes(1, i).reshape(-1).tolist() for i in range(3)}
    lists.update(big=[0] * 255 + [64], negative=[-1] * 256, short=[1] * 255, empty=[])
    variants = {"arrays": {k: np.asarray(v, np.int64) for k, v in lists.items()},
                "numpy ints": {k: [np.int32(c) for c in v] for k, v in lists.items()},
                "unsigned": {k: np.asarray(v, np.uint16) for k, v in lists.items() if k != "negative"}}
    (tmp_path / "lists.pickle").write_bytes(pickle.dumps(lists))
    want_codes, want_invalid = codes_lib.read_pickle(tmp_path / "lists.pickle", TINY.grid, TINY.num_codes)
    assert sorted(want_codes) == ["id0", "id1", "id2"] and want_invalid == {"big", "negative", "short", "empty"}
    for name, content in variants.items():
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(pickle.dumps(content))
        codes, invalid = codes_lib.read_pickle(path, TINY.grid, TINY.num_codes)
        assert invalid == want_invalid - ({"negative"} if name == "unsigned" else set()), name
        assert codes.keys() == want_codes.keys(), name
        for key, grid in want_codes.items():
            np.testing.assert_array_equal(codes[key], grid, err_msg=f"{name} {key}")


def test_encoded_directory_has_no_invalid_ids_and_a_writer_keeps_them_apart(tmp_path):
    writer = CodesWriter(tmp_path, META)
    writer.write(["a"], random_codes(1))
    assert CodesDir.open(tmp_path).invalid_ids == frozenset()
    writer.write_invalid(["z"])
    with pytest.raises(CodesError, match="ids recorded as invalid in invalid_ids.json: \\['z'\\]"):
        CodesWriter(tmp_path, META).write(["z"], random_codes(1))
    with pytest.raises(CodesError, match="ids to record as invalid already have codes: \\['a'\\]"):
        writer.write_invalid(["a"])
    (tmp_path / codes_lib.INVALID_FILE).write_text('["a"]')
    with pytest.raises(CodesError, match="invalid_ids.json: ids listed as invalid also have codes"):
        CodesDir.open(tmp_path)
    (tmp_path / codes_lib.INVALID_FILE).write_text('{"a": 1}')
    with pytest.raises(CodesError, match="invalid_ids.json: expected a JSON list of id strings"):
        CodesDir.open(tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


class NdarrayCall:
    """Pickles as a call of numpy.ndarray itself, e.g. an object array of Nones: `np.ndarray((256,), "O")`."""
    def __reduce__(self):
        return (np.ndarray, ((256,), "O"))


@pytest.mark.parametrize("content, message", [
    ({"a": Payload()}, "refusing to unpickle builtins.print"),
    ({"a": np.array([Payload()] * 256, dtype=object)}, "not a readable pickle: ValueError: numpy dtype object"),
    ({"a": np.ma.masked_array(np.zeros(256, np.int64))}, "refusing to unpickle numpy.ma.core._mareconstruct"),
    ({"a": NdarrayCall()}, "not a readable pickle: TypeError"),  # numpy.ndarray is a marker, not a constructor
    ({"a": np.zeros((16, 16), np.int64)}, "entry 'a' is not str -> list of int"),
    ({"a": np.zeros(256, np.float32)}, "entry 'a' is not str -> list of int"),
    ({"a": (1, 2)}, "entry 'a' is not str -> list of int"),
    ({"a": [True] * 256}, "entry 'a' is not str -> list of int"),
    ([1, 2, 3], "expected a dict of id -> list of codes, got list"),
])
def test_pickle_with_anything_else_is_refused(tmp_path, capsys, content, message):
    path = tmp_path / "indices.pickle"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(CodesError, match=f"indices.pickle: {message}"):
        codes_lib.read_pickle(path, TINY.grid, TINY.num_codes)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("length,error", [(2**63 + 5, "OverflowError"), (2**50, "MemoryError")])
def test_a_pickle_with_a_corrupted_length_is_refused_naming_the_file(tmp_path, length, error):
    """BINBYTES8 claiming more bytes than exist: Python tries to allocate them first."""
    path = tmp_path / "indices.pickle"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", length) + b"abc.")
    with pytest.raises(CodesError, match=f"indices.pickle: not a readable pickle: {error}"):
        codes_lib.read_pickle(path, TINY.grid, TINY.num_codes)


def make_images(directory: Path) -> dict[str, Path]:
    """Six usable images (PNG and JPG, portrait and landscape) and four bad files."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    good = {}
    for i, (h, w, suffix) in enumerate([(40, 48, ".png"), (48, 40, ".jpg"), (32, 32, ".png"),
                                         (64, 50, ".jpg"), (33, 45, ".png"), (50, 50, ".jpeg")]):
        path = directory / f"img{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
        good[f"img{i}"] = path
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(directory / "cut.jpg")
    (directory / "cut.jpg").write_bytes((directory / "cut.jpg").read_bytes()[:300])
    (directory / "text.png").write_text("not an image")
    (directory / "nopixels.dcm").write_bytes(b"\0" * 128 + b"DICM")
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(directory / "small.png")
    return good


def run_encode(vqgan_dir: Path, out: Path, inputs: list, capsys) -> str:
    encode_cli.main(["--vqgan", str(vqgan_dir), "--out", str(out), "--batch_size", "4", "--shard_size", "2",
                     "--workers", "2", *map(str, inputs)])
    return capsys.readouterr().err


def test_encode_cli_resumes_and_records_bad_files(vqgan_dir, tmp_path, capsys):
    good = make_images(tmp_path / "images")
    out = tmp_path / "codes"
    first = run_encode(vqgan_dir, out, [good["img0"], good["img1"], good["img2"]], capsys)  # an interrupted run
    assert "encoded 3, skipped 0" in first
    second = run_encode(vqgan_dir, out, [tmp_path / "images"], capsys)
    assert "encoded 3, skipped 3 already in" in second and "failed 4" in second

    reader = CodesDir.open(out)
    assert sorted(reader.ids) == sorted(good) and len(reader.ids) == len(set(reader.ids))
    assert reader.meta.fingerprint == vqgan_flax.checkpoint.read_fingerprint(vqgan_dir)
    assert reader.meta.recipe["size"] == 32 and reader.meta.grid == (16, 16)
    model = vqgan_flax.load(vqgan_dir)
    expected = nnx.jit(VQGAN.encode)(model, np.stack([preprocess(load_image(p), 32) for p in good.values()]))
    for image_id, codes in zip(good, np.asarray(expected)):
        np.testing.assert_array_equal(reader[image_id], codes, err_msg=image_id)

    rows = [line.split("\t") for line in (out / "errors.tsv").read_text().splitlines()]
    assert rows[0] == ["id", "path", "reason"]
    reasons = {row[0]: row[2] for row in rows[1:]}
    assert set(reasons) == {"cut", "text", "nopixels", "small"}
    assert "truncated" in reasons["cut"].lower() and "not a readable image" in reasons["text"]
    assert "DICOM" in reasons["nopixels"] and "short side 20 < 32" in reasons["small"]

    third = run_encode(vqgan_dir, out, [tmp_path / "images"], capsys)
    assert "encoded 0, skipped 6" in third and len(CodesDir.open(out)) == 6


def test_encoding_into_an_imported_directory_leaves_its_invalid_ids_alone(vqgan_dir, tmp_path, capsys):
    """The original's pickle held bad codes for img1: it stays invalid (alternation depends on it) and the
    other new images are still encoded and kept."""
    good = make_images(tmp_path / "images")
    out = tmp_path / "codes"
    run_encode(vqgan_dir, out, [good["img0"]], capsys)
    CodesWriter(out, CodesDir.open(out).meta).write_invalid(["img1"])
    assert "encoded 1, skipped 1" in run_encode(vqgan_dir, out, [good["img1"], good["img2"]], capsys)
    reader = CodesDir.open(out)
    assert sorted(reader.ids) == ["img0", "img2"] and reader.invalid_ids == frozenset({"img1"})
    assert "img1\t" in (out / "errors.tsv").read_text() and "recorded as invalid" in (out / "errors.tsv").read_text()


def test_an_interrupted_encode_keeps_what_it_encoded(vqgan_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM mid-run: the codes encoded so far are written (not only whole shards), and a rerun
    encodes the rest only."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):  # two batches: the batch is rounded up to the 8 devices
        images.append(tmp_path / f"img{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(images[-1])
    calls = []

    class InterruptedOnTheSecondBatch(encode_cli.DataParallel):
        def __call__(self, batch):
            calls.append(len(batch))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return super().__call__(batch)

    monkeypatch.setattr(encode_cli, "DataParallel", InterruptedOnTheSecondBatch)
    with pytest.raises(KeyboardInterrupt):  # shard_size 100: nothing would be written before the end
        encode_cli.main(["--vqgan", str(vqgan_dir), "--out", str(tmp_path / "codes"), "--batch_size", "8",
                         "--shard_size", "100", "--workers", "1", *map(str, images)])
    assert len(CodesDir.open(tmp_path / "codes")) == 8
    monkeypatch.undo()
    capsys.readouterr()
    assert "encoded 4, skipped 8" in run_encode(vqgan_dir, tmp_path / "codes", images, capsys)


def test_cli_bad_output_or_batch_size_is_one_error_line(vqgan_dir, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --out \S*afile exists and is not a directory$"):
        encode_cli.main(["--vqgan", str(vqgan_dir), "--out", str(tmp_path / "afile"), str(image)])
    with pytest.raises(SystemExit, match=r"^error: batch_size must be at least 1, got 0"):
        encode_cli.main(["--vqgan", str(vqgan_dir), "--out", str(tmp_path / "codes"), "--batch_size", "0", str(image)])
    with pytest.raises(SystemExit, match=r"^error: --shard_size 0, --workers -1: must be at least 1$"):
        encode_cli.main(["--vqgan", str(vqgan_dir), "--out", str(tmp_path / "codes"), "--shard_size", "0",
                         "--workers", "-1", str(image)])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "scan.tif").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: .*empty: no image files \(.jpg .jpeg .png .dcm .dicom\) in this "):
        encode_cli.main(["--vqgan", str(vqgan_dir), "--out", str(tmp_path / "none"), str(tmp_path / "empty")])
    assert not (tmp_path / "none").exists()
    meta = CodesMeta(vqgan_flax.checkpoint.read_fingerprint(vqgan_dir), TINY.grid, TINY.num_codes, META.recipe)
    CodesWriter(tmp_path / "codes2", meta).write(["x1"], random_codes(1))
    for cli, inputs in ((encode_cli, [str(image)]), (decode_cli, ["--codes", str(tmp_path / "codes2")])):
        with pytest.raises(SystemExit, match=r"^error: "):  # a VQ-GAN that is not there: no --out left behind
            cli.main(["--vqgan", str(tmp_path / "no_vqgan"), "--out", str(tmp_path / "unmade"), *inputs])
        assert not (tmp_path / "unmade").exists()
    with pytest.raises(SystemExit, match=r"^error: --out \S*afile exists and is not a directory$"):
        decode_cli.main(["--vqgan", str(vqgan_dir), "--codes", str(tmp_path / "codes2"), "--out",
                         str(tmp_path / "afile")])


def test_encode_cli_refuses_duplicate_ids(vqgan_dir, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / sub / "same.png")
    with pytest.raises(SystemExit, match=r"1 ids name more than one file .*same: .*a/same.png, .*b/same.png"):
        encode_cli.main(["--vqgan", str(vqgan_dir), "--out", str(tmp_path / "codes"), str(tmp_path)])


def test_decode_cli_from_codes_dir_and_pickle(vqgan_dir, tmp_path, capsys):
    meta = CodesMeta(vqgan_flax.checkpoint.read_fingerprint(vqgan_dir), TINY.grid, TINY.num_codes, META.recipe)
    CodesWriter(tmp_path / "codes", meta).write(["x1", "x2", "x3"], random_codes(3))
    decode_cli.main(["--vqgan", str(vqgan_dir), "--codes", str(tmp_path / "codes"), "--out", str(tmp_path / "png"),
                     "--batch_size", "2"])
    model = vqgan_flax.load(vqgan_dir)
    expected = postprocess(np.asarray(nnx.jit(VQGAN.decode)(model, random_codes(3).astype(np.int32))))
    for i, image_id in enumerate(["x1", "x2", "x3"]):
        png = np.asarray(Image.open(tmp_path / "png" / f"{image_id}.png"))
        assert png.shape == (32, 32)
        assert np.abs(png.astype(int) - expected[i]).max() <= 1  # device-sharded vs direct: float rounding only

    (tmp_path / "png" / "x2.png").unlink()  # as if interrupted: a rerun decodes only what is missing
    before = (tmp_path / "png" / "x1.png").stat().st_mtime_ns
    decode_cli.main(["--vqgan", str(vqgan_dir), "--codes", str(tmp_path / "codes"), "--out", str(tmp_path / "png")])
    assert "decoded 1, skipped 2" in capsys.readouterr().err
    assert (tmp_path / "png" / "x1.png").stat().st_mtime_ns == before and (tmp_path / "png" / "x2.png").exists()

    codes_lib.export_pickle(CodesDir.open(tmp_path / "codes"), tmp_path / "codes.pickle")
    decode_cli.main(["--vqgan", str(vqgan_dir), "--codes", str(tmp_path / "codes.pickle"), "--out",
                     str(tmp_path / "png2")])
    for image_id in ["x1", "x2", "x3"]:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png2" / f"{image_id}.png")),
                                      np.asarray(Image.open(tmp_path / "png" / f"{image_id}.png")))
    # Other codes into the first directory: its images would be kept as theirs
    with pytest.raises(SystemExit, match=r"^error: .*png: holds images decoded from \{.*codes'.*\}, not from "
                                         r"\{.*codes.pickle'.*\}; use another --out"):
        decode_cli.main(["--vqgan", str(vqgan_dir), "--codes", str(tmp_path / "codes.pickle"), "--out",
                         str(tmp_path / "png")])


def test_decode_cli_refuses_codes_of_another_vqgan(vqgan_dir, tmp_path):
    CodesWriter(tmp_path / "codes", META).write(["x"], random_codes(1))
    with pytest.raises(SystemExit, match="codes were made by VQ-GAN ffffffffffff"):
        decode_cli.main(["--vqgan", str(vqgan_dir), "--codes", str(tmp_path / "codes"), "--out", str(tmp_path)])
