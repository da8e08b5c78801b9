"""VQ-GAN codes for the MIMIC builder: a `vqgan_flax.codes` directory or the original's pickle, plus which VQ-GAN.

A codes directory is validated as a whole by `vqgan_flax.codes.CodesDir` (a bad shard is an error naming it) and
carries the VQ-GAN fingerprint. The original's pickle `dict[dicom_id -> list[int]]` carries none, and its entries
of the wrong length or with codes outside the codebook are kept aside as *invalid*: SPEC §6 removes those ids
before alternating tasks, unlike ids with no codes at all, so the builder must know which they are. A directory
imported from the pickle lists them in its invalid_ids.json; one written by the encoder has none.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vqgan_flax.codes import CodesDir, CodesMeta, read_pickle

CODES_DIR = "codes"
CODES_PICKLE = "mimic-cxr-256-txvloss_codebook_indices.pickle"
WHERE = ("a codes directory written by `python -m vqgan_flax.encode` over MIMIC-CXR-JPG 2.0.0 images (put it at "
         f"{CODES_DIR}/ or set `codes_path` in the builder config), or the original's {CODES_PICKLE} made by "
         "LLM-CXR's encode_cxr_all.py")


class VqganMismatchError(ValueError):
    """The codes (or a dataset built from them) come from another VQ-GAN or grid than the one asked for."""


@dataclasses.dataclass(frozen=True)
class Codes:
    """Valid codes by image id (int16 (h, w)), the ids whose codes were invalid, and what made them."""

    by_id: Mapping[str, np.ndarray]
    invalid: frozenset[str]
    meta: CodesMeta
    source: Path


def default_codes_path(manual_dir: Path) -> Path:
    """`codes/` in the manual directory if present, else the original's pickle name there."""
    return manual_dir / CODES_DIR if (manual_dir / CODES_DIR).is_dir() else manual_dir / CODES_PICKLE


def load_codes(path: Path, grid: tuple[int, int], num_codes: int) -> Codes:
    """Codes from a codes directory (grid and codebook size must match) or the original's pickle."""
    if path.is_dir():
        store = CodesDir.open(path)
        if tuple(store.meta.grid) != tuple(grid) or store.meta.num_codes != num_codes:
            raise VqganMismatchError(
                f"{path}: codes have grid {tuple(store.meta.grid)} and {store.meta.num_codes} codes, expected grid "
                f"{tuple(grid)} and {num_codes} (the builder config's `grid`/`num_codes`, or the VQ-GAN's)")
        return Codes(store, store.invalid_ids, store.meta, path)
    if path.is_file():
        valid, invalid = read_pickle(path, grid, num_codes)
        return Codes(valid, invalid, CodesMeta("", grid, num_codes, {}), path)
    raise FileNotFoundError(f"{path}: no codes here; expected {WHERE}")


def vqgan_metadata(codes: Codes) -> dict:
    """What a dataset records about its codes, so a training run can refuse another VQ-GAN or grid."""
    return {"fingerprint": codes.meta.fingerprint, "grid": list(codes.meta.grid), "num_codes": codes.meta.num_codes,
            "recipe": dict(codes.meta.recipe), "codes_source": str(codes.source)}


def require_vqgan(recorded: Mapping, source: str, *, fingerprint: str | None = None,
                  grid: tuple[int, int] | None = None) -> None:
    """Raise VqganMismatchError unless `recorded` (as `vqgan_metadata` writes it) has this fingerprint and grid.

    An unknown recorded fingerprint ("", from the original's pickle) never matches a requested one.
    """
    if fingerprint is not None and recorded["fingerprint"] != fingerprint:
        have = recorded["fingerprint"] or "none (the original's pickle carries no fingerprint; import it with " \
                                          "vqgan_flax.codes.import_pickle and the VQ-GAN's fingerprint)"
        raise VqganMismatchError(f"{source}: codes from VQ-GAN fingerprint {have}, but {fingerprint} was asked for; "
                                 "encode the images with that VQ-GAN or change the expected fingerprint")
    if grid is not None and tuple(recorded["grid"]) != tuple(grid):
        raise VqganMismatchError(f"{source}: codes on a {tuple(recorded['grid'])} grid, expected {tuple(grid)}")
