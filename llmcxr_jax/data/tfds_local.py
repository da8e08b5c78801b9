"""A TFDS builder base for datasets made only from local files (manual_dir), usable without TensorFlow.

Builders write ArrayRecord unless told otherwise: TFDS's default, tfrecord, needs TensorFlow to write and read.

TFDS 4.9.10 finds a builder's source file through `importlib_resources`, a package it requires only on Python
< 3.9, so on 3.11 without it every builder defined in a package fails in `download_and_prepare`. Our builders
take their code path from the class's own file instead; nothing else depends on it (they download nothing).
"""
from __future__ import annotations

import inspect

import tensorflow_datasets as tfds
from etils import epath


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """`GeneratorBasedBuilder` writing ArrayRecord by default, whose `code_path` is the defining module's file."""

    def __init__(self, *, file_format: str | None = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))
