"""TFDS builder `cxr_images`: chest X-rays from a folder, preprocessed once; the batches VQ-GAN training reads.

    builder = CxrImages(config="llmcxr256", data_dir=DATA)  # or config=CxrImagesConfig(name=..., size=...)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=IMAGES))
    train = builder.as_data_source("train")  # or tfds.data_source("cxr_images/llmcxr256", data_dir=DATA)

Every JPG, PNG and DICOM under `manual_dir` (recursively, sorted) is read with `vqgan_flax.images.load_image` and
preprocessed with LLM-CXR's recipe (`vqgan_flax.images.preprocess`: Lanczos short side to `size`, centre crop) and
stored as uint8 PNG: `{"image_id": relative path without suffix, "image": (size, size, channels)}`. The stored
pixels are exactly `round((preprocess(x) + 1) · 127.5)`, so training sees the recipe's values. `channels=1` keeps
grayscale (MIMIC-CXR-JPG is 8-bit grayscale; the recipe's RGB copies are identical) and skips colour images.

Splits: with MIMIC-CXR-JPG's `mimic-cxr-2.0.0-split.csv` in `manual_dir` (e.g. manual_dir = the MIMIC-CXR-JPG root
holding `files/`), MIMIC's split by dicom_id (= file stem): `train`, and `validation` = validate ∪ test. Otherwise
a `validation_fraction` of the files, chosen by a hash of their relative path, forms `validation`. Files that
cannot be used (unreadable, too small, colour in a grayscale set, not in the split CSV) are skipped; their count
by reason and the list of paths are in `info.metadata["skipped"]` and in `builder.build_counts` after a build;
`info.metadata["counts"]` has the kept images per split and the number skipped.

The training iterator (`make_image_iterator`) works on any source of records with a uint8 `image` of (H, W, 1)
or (H, W, 3), e.g. this builder's or `cxr_phantoms`' splits, or `phantom_records`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from llmcxr_jax.data import mimic_files
from llmcxr_jax.data.process_share import IN_CALLING_THREAD, process_share
from llmcxr_jax.data.tfds_local import LocalFilesBuilder
from vqgan_flax.images import (IMAGE_SUFFIXES, ImageLoadError, ImageTooSmallError, image_files, load_image,
                               png_bytes, preprocess)

_CHUNK = 256  # files prepared concurrently before they are written in order


@dataclasses.dataclass
class CxrImagesConfig(tfds.core.BuilderConfig):
    """Stored side in pixels, channels (1: grayscale, 3: RGB), upscaling and the validation share of a plain folder."""

    size: int = 256
    channels: int = 1
    allow_upscale: bool = False
    validation_fraction: float = 0.01
    num_workers: int = 8

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"CxrImagesConfig({self.name!r}).size={self.size!r}: expected an int >= 16")
        if self.channels not in (1, 3):
            raise ValueError(f"CxrImagesConfig({self.name!r}).channels={self.channels!r}: expected 1 or 3")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"CxrImagesConfig({self.name!r}).validation_fraction={self.validation_fraction!r}: "
                             "expected 0 <= fraction < 1")


def prepare(path: Path, size: int, channels: int, allow_upscale: bool) -> np.ndarray:
    """uint8 (size, size, channels) of one file after LLM-CXR's preprocessing; ImageLoadError says why not."""
    try:
        rgb = preprocess(load_image(path), size, allow_upscale)
    except ImageTooSmallError as err:
        raise ImageLoadError(path, f"too small: {err}") from None
    pixels = np.round((rgb + 1.0) * 127.5).astype(np.uint8)
    if channels == 3:
        return pixels
    if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
        raise ImageLoadError(path, "colour image in a grayscale (channels=1) dataset; build with channels=3")
    return pixels[..., :1]


def _in_validation(relative: str, fraction: float) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest()[:12], 16) / 16**12 < fraction


def example_key(root: Path, path: Path) -> str:
    """An image's id and example key: its path under `root` without the suffix."""
    return path.relative_to(root).with_suffix("").as_posix()


def plan_splits(root: Path, fraction: float) -> tuple[dict[str, list[Path]], dict[str, str], str]:
    """(split -> files, skipped file -> reason, where the split came from) before any image is decoded."""
    csv = root / mimic_files.SPLIT_CSV
    if not csv.is_file() and csv.with_name(csv.name + ".gz").is_file():  # the hashed split would train on test images
        raise mimic_files.ManualFilesMissingError(
            f"{root}: {csv.name}.gz is there but not {csv.name}: gunzip it to build with MIMIC's split (without it "
            "the build would make its own validation split, and MIMIC's test images would be trained on)")
    files = image_files(root)
    if not files:
        raise mimic_files.ManualFilesMissingError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} files found (searched "
                                                  "recursively); put the chest X-rays there")
    by_key: dict[str, list[str]] = {}
    for p in files:  # a.png and a.jpg would share a key and collide only after every image was processed
        by_key.setdefault(example_key(root, p), []).append(p.relative_to(root).as_posix())
    clashes = [names for names in by_key.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(", ".join(names) for names in clashes[:10])
        raise ValueError(f"{root}: {len(clashes)} images differ only in their suffix (an image's id is its path "
                         f"without the suffix), remove or rename one of each: {shown}")
    if not csv.is_file():
        relative = {p: p.relative_to(root).as_posix() for p in files}
        return ({"train": [p for p in files if not _in_validation(relative[p], fraction)],
                 "validation": [p for p in files if _in_validation(relative[p], fraction)]}, {},
                f"validation: {fraction:g} of the images, by a hash of their paths")
    split_of = {row.dicom_id: split for split in mimic_files.SPLITS
                for row in mimic_files.rows_of_split(mimic_files.read_split_csv(csv), split)}
    plans = {split: [p for p in files if split_of.get(p.stem) == split] for split in mimic_files.SPLITS}
    skipped = {p.relative_to(root).as_posix(): f"dicom_id {p.stem} not in {mimic_files.SPLIT_CSV}"
               for p in files if p.stem not in split_of}
    return plans, skipped, f"{csv.name} (validation: MIMIC's validate and test)"


class CxrImages(LocalFilesBuilder):
    """Chest X-ray images from a folder (or MIMIC-CXR-JPG), preprocessed with LLM-CXR's recipe, for VQ-GAN training."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put chest X-rays (JPG, PNG or DICOM, any folder layout) in the manual directory, "
                                    "or point it at the MIMIC-CXR-JPG 2.0.0 root (files/ plus "
                                    f"{mimic_files.SPLIT_CSV}, gunzipped) to use MIMIC's split.")
    BUILDER_CONFIGS = [
        CxrImagesConfig(name="llmcxr256", size=256, description="LLM-CXR's VQ-GAN input: 256 x 256 grayscale."),
        CxrImagesConfig(name="demo128", size=128, description="128 x 128 grayscale, for small VQ-GANs."),
        CxrImagesConfig(name="demo64", size=64, description="64 x 64 grayscale, for the smallest demo VQ-GAN."),
    ]
    build_counts: dict | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n")[0], metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict({
                "image_id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(c.size, c.size, c.channels), encoding_format="png"),
            }))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        plans, skipped, split_from = plan_splits(root, self.builder_config.validation_fraction)
        self.build_counts = {"skipped": skipped, "kept": {split: 0 for split in plans}, "split_from": split_from}
        self.info.metadata["skipped"] = skipped
        return {split: self._generate_examples(root, split, files) for split, files in plans.items() if files}

    def _generate_examples(self, root: Path, split: str, files: Sequence[Path]):
        c = self.builder_config
        skipped = self.build_counts["skipped"]

        def one(path: Path) -> np.ndarray | str:
            try:
                return prepare(path, c.size, c.channels, c.allow_upscale)
            except ImageLoadError as err:
                return err.reason

        with ThreadPoolExecutor(max(1, c.num_workers)) as pool:
            for start in range(0, len(files), _CHUNK):
                chunk = files[start:start + _CHUNK]
                for path, result in zip(chunk, pool.map(one, chunk)):
                    key = example_key(root, path)
                    if isinstance(result, str):
                        skipped[path.relative_to(root).as_posix()] = result
                        continue
                    self.build_counts["kept"][split] += 1
                    yield key, {"image_id": key, "image": png_bytes(result)}
        if not self.build_counts["kept"][split]:  # TFDS would only say "No examples were yielded"
            reasons = [f"{name}: {skipped[name]}" for name in (p.relative_to(root).as_posix() for p in files)]
            raise ValueError(f"{root}: none of the {len(files)} images of split {split!r} is usable, e.g. "
                             + "; ".join(reasons[:3]))
        self.info.metadata["skipped"] = dict(sorted(skipped.items()))
        self.info.metadata["counts"] = {"kept": dict(self.build_counts["kept"]), "skipped": len(skipped),
                                        "split_from": self.build_counts["split_from"]}


# ---------------------------------------------------------------------------------------------------- training


def phantom_records(seed: int, count: int, size: int, start: int = 0) -> list[dict[str, np.ndarray]]:
    """In-memory phantom chest X-rays as records with a uint8 (size, size, 1) `image` (no TFDS build needed)."""
    from llmcxr_jax.data.phantom import make_phantoms

    return [{"image": p.image[..., None]} for p in make_phantoms(seed, start, count, size)]


@dataclasses.dataclass(frozen=True)
class ToModelInput:
    """record -> {"images": float32 (H, W, 3) in [-1, 1]}, the same arithmetic as `preprocess` (x/255·2 − 1)."""

    resolution: int

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(record["image"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(f"records must hold a uint8 (H, W, 1|3) 'image', got {image.dtype} {image.shape}")
        if image.shape[:2] != (self.resolution, self.resolution):
            raise ValueError(f"image is {image.shape[0]}x{image.shape[1]} but the VQ-GAN's resolution is "
                             f"{self.resolution}: build the data at that size (e.g. cxr_images/demo64 for 64)")
        pixels = np.broadcast_to(image, (*image.shape[:2], 3)).astype(np.float32)
        return {"images": pixels / np.float32(255) * np.float32(2) - np.float32(1)}


def make_image_iterator(source: Sequence[Mapping[str, Any]], *, global_batch_size: int, resolution: int,
                        seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                        ) -> grain.DatasetIterator:
    """Endless {"images": float32 (B_local, H, W, 3)} batches: this process's records (`[index::count]`), shuffled by
    `seed` (reshuffled every epoch), cut into full batches. `get_state`/`set_state` round-trip through JSON."""
    index, count, local = process_share(global_batch_size, process_index, process_count)
    records = grain.MapDataset.source(source)[index::count]
    if len(records) < local:
        raise ValueError(f"{len(records)} records for this process are fewer than one batch of {local}")
    batches = records.shuffle(seed).repeat().map(ToModelInput(resolution)).batch(local, drop_remainder=True)
    return iter(batches.to_iter_dataset(IN_CALLING_THREAD))


def make_eval_iterator(source: Sequence[Mapping[str, Any]], *, global_batch_size: int, resolution: int,
                       max_batches: int = 0, process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One unshuffled pass of full batches (the remainder is left out), at most `max_batches` (0: all)."""
    index, count, local = process_share(global_batch_size, process_index, process_count)
    num = len(source) // global_batch_size
    num = min(num, max_batches) if max_batches else num
    records = grain.MapDataset.source(source)[: num * global_batch_size][index::count]
    return iter(records.map(ToModelInput(resolution)).batch(local, drop_remainder=True).to_iter_dataset(IN_CALLING_THREAD))
