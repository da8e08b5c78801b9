"""TFDS builder `cxr_phantoms`: synthetic chest radiographs with reports, in MIMIC-CXR's record layout.

Nothing is downloaded and TensorFlow is not needed: images are PNG-encoded with Pillow before TFDS sees them, the
records are written as ArrayRecord (the `LocalFilesBuilder` default), and `tfds.data_source` reads them back
(decoding PNGs with Pillow).

    builder = CxrPhantoms(config="demo64", data_dir=DIR)  # or config=CxrPhantomsConfig(name=..., size=...)
    builder.download_and_prepare()
    source = tfds.data_source("cxr_phantoms/demo64", data_dir=DIR)["train"]

Train and test draw disjoint case indices of the same seed; the test cases do not depend on `num_train`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from llmcxr_jax.data.phantom import LABELS, Phantom, make_phantoms
from llmcxr_jax.data.phantom.generate import MIN_SIZE
from llmcxr_jax.data.tfds_local import LocalFilesBuilder
from vqgan_flax.images import png_bytes

TEST_OFFSET = 20_000_000  # first case index of the test split; also the most cases a split may hold
SUBJECT_BASE, STUDY_BASE = 10_000_000, 50_000_000  # 8-digit ids, like MIMIC-CXR's


@dataclasses.dataclass
class CxrPhantomsConfig(tfds.core.BuilderConfig):
    """Image side in pixels, split sizes and the seed that draws every case."""

    size: int = 256
    num_train: int = 10_000
    num_test: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < MIN_SIZE:
            raise ValueError(f"CxrPhantomsConfig({self.name!r}).size={self.size!r}: expected an int >= {MIN_SIZE}")
        for field in ("num_train", "num_test", "seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"CxrPhantomsConfig({self.name!r}).{field}={value!r}: expected an int >= 0")
        for field in ("num_train", "num_test"):
            if getattr(self, field) > TEST_OFFSET:
                raise ValueError(f"CxrPhantomsConfig({self.name!r}).{field}={getattr(self, field)}: at most "
                                 f"{TEST_OFFSET} cases per split")


def record(phantom: Phantom, index: int) -> dict:
    """The TFDS example of one phantom: one subject, one study, one PA image each."""
    return {
        "dicom_id": phantom.id,
        "subject_id": str(SUBJECT_BASE + index),
        "study_id": str(STUDY_BASE + index),
        "view": "PA",
        "report": phantom.report,
        "image": png_bytes(phantom.image),
        "labels": dict(phantom.labels),
    }


class CxrPhantoms(LocalFilesBuilder):
    """Chest X-ray phantoms with MIMIC-style reports and ground-truth finding labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        CxrPhantomsConfig(name="demo64", size=64, num_train=20_000, num_test=1_000,
                          description="64 x 64 phantoms for the small demo (8 x 8 VQ-GAN grid)."),
        CxrPhantomsConfig(name="demo128", size=128, num_train=20_000, num_test=1_000,
                          description="128 x 128 phantoms (8 x 8 grid with an f16 VQ-GAN)."),
        CxrPhantomsConfig(name="full256", size=256, num_train=50_000, num_test=2_000,
                          description="256 x 256 phantoms, LLM-CXR's image size (16 x 16 grid)."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict({
                "dicom_id": tfds.features.Text(),
                "subject_id": tfds.features.Text(),
                "study_id": tfds.features.Text(),
                "view": tfds.features.Text(),
                "report": tfds.features.Text(),
                "image": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
                "labels": tfds.features.FeaturesDict({name: np.int64 for name in LABELS}),
            }),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {"train": self._generate_examples(0, c.num_train),
                "test": self._generate_examples(TEST_OFFSET, c.num_test)}

    def _generate_examples(self, start: int, count: int):
        c = self.builder_config
        for i, phantom in enumerate(make_phantoms(c.seed, start, count, c.size)):
            yield phantom.id, record(phantom, start + i)
