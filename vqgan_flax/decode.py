"""Decode codes into images, data-parallel over all local devices.

    python -m vqgan_flax.decode --vqgan DIR --codes CODES_DIR_OR_PICKLE --out DIR [--batch_size N] [--format jpg]

CODES may be a codes directory (its VQ-GAN fingerprint must match DIR's) or the original's pickle
`dict[id -> list[int]]` (invalid entries are dropped and counted, as the original does). Writes OUT/<id>.png
(grayscale, lossless) or, with `--format jpg`, OUT/<id>.jpg as LLM-CXR saved them (3 channels, JPEG; SPEC §12),
each whole or not at all; a rerun skips the ids whose file is already there, so an interrupted run resumes, and
refuses another VQ-GAN, other codes or other codes of an id already decoded (recorded in OUT/.decoded_from.json).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vqgan_flax import checkpoint
from vqgan_flax.atomic import check_output_dir, write_atomic
from vqgan_flax.codes import CodesDir, CodesError, read_pickle
from vqgan_flax.images import postprocess, postprocess_original
from vqgan_flax.json_object import read_json_object
from vqgan_flax.model import VQGAN
from vqgan_flax.parallel import DataParallel


def read_codes(path: Path, model: VQGAN, fingerprint: str) -> dict[str, np.ndarray]:
    """id -> (h, w) codes from a codes directory or a pickle, checked against the model."""
    config = model.config
    if not path.is_dir():
        codes, invalid = read_pickle(path, config.grid, config.num_codes)
        print(f"{path}: {len(codes)} entries read, {len(invalid)} invalid ones skipped (wrong length or code out "
              "of range)", file=sys.stderr)
        return codes
    directory = CodesDir.open(path)
    meta = directory.meta
    if meta.grid != config.grid or meta.num_codes != config.num_codes:
        raise CodesError(f"{path}: grid {meta.grid} / {meta.num_codes} codes, but the VQ-GAN has "
                         f"{config.grid} / {config.num_codes}")
    if meta.fingerprint and meta.fingerprint != fingerprint:
        raise CodesError(f"{path}: codes were made by VQ-GAN {meta.fingerprint[:12]}…, not {fingerprint[:12]}…")
    return dict(directory)


def check_ids(ids: Iterable[str], source: Path) -> None:
    """Refuse ids that cannot be file names (they become OUT/<id>.<format>)."""
    bad = [i for i in ids if not i or i in {".", ".."} or "/" in i or "\\" in i]
    if bad:
        raise CodesError(f"{source}: ids that are not usable as file names: {bad[:10]}")


# Hidden beside the images: what they were decoded from, so that a resume cannot mix two sources.
SOURCE_FILE = ".decoded_from.json"

def _digest(codes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codes, np.int32).tobytes()).hexdigest()[:16]


# suffix -> (decoder output to uint8 pixels, PIL format)
FORMATS = {"png": (postprocess, "PNG"), "jpg": (postprocess_original, "JPEG")}


def decode_to_files(model: VQGAN, codes: dict[str, np.ndarray], out: Path, batch_size: int = 32,
                    image_format: str = "png", made_from: dict[str, Any] | None = None) -> int:
    """Write OUT/<id>.<image_format> for the ids without one yet; returns how many were decoded.

    `made_from` (e.g. the VQ-GAN's fingerprint and the codes' path) is recorded in OUT/SOURCE_FILE with a digest
    of each id's codes: a rerun from anything else, or with other codes for an id whose image is there (a results
    file regenerated at the same path), is refused, since the images already there, which it would keep, came
    from the first.
    """
    if image_format not in FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {sorted(FORMATS)}")
    to_pixels, pil_format = FORMATS[image_format]
    out.mkdir(parents=True, exist_ok=True)
    if made_from is not None:
        digests = {i: _digest(c) for i, c in codes.items()}
        recorded = read_json_object(out / SOURCE_FILE, CodesError, missing_ok=True)
        if recorded:
            earlier = recorded.pop("digests", {})  # absent: written before digests were recorded
            if recorded != made_from:
                raise CodesError(f"{out}: holds images decoded from {recorded}, not from {made_from}; use another "
                                 "--out")
            changed = sorted(i for i, d in digests.items()
                             if earlier.get(i, d) != d and (out / f"{i}.{image_format}").exists())
            if changed:
                raise CodesError(f"{out}: the images of {len(changed)} ids there were decoded from other codes than "
                                 f"these (e.g. {changed[:3]}); use another --out")
            digests = {**earlier, **digests}
        write_atomic(out / SOURCE_FILE, json.dumps({**made_from, "digests": digests}, sort_keys=True))
    decode = DataParallel(VQGAN.decode, model, batch_size)
    batch_size = decode.batch_size  # a multiple of the device count
    ids = sorted(i for i in codes if not (out / f"{i}.{image_format}").exists())
    with tqdm(total=len(ids), unit="img", desc="decode") as bar:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            images = to_pixels(decode(np.stack([codes[i] for i in chunk]).astype(np.int32)))
            for image_id, image in zip(chunk, images):
                data = io.BytesIO()
                Image.fromarray(image).save(data, format=pil_format)
                write_atomic(out / f"{image_id}.{image_format}", data.getvalue())
            bar.update(len(chunk))
    return len(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vqgan_flax.decode", description=__doc__.split("\n")[0])
    parser.add_argument("--vqgan", required=True, help="VQ-GAN directory")
    parser.add_argument("--codes", required=True, help="codes directory or the original's .pickle")
    parser.add_argument("--out", required=True, help="directory for <id>.png (or .jpg)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png",
                        help="png: grayscale, lossless; jpg: 3-channel JPEG as LLM-CXR's decode_cxr_all.py saved")
    parser.add_argument("--batch_size", type=int, default=32, help="global batch, rounded up to the device count")
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.out)
        model = checkpoint.load(args.vqgan)
        fingerprint = checkpoint.read_fingerprint(args.vqgan)
        codes = read_codes(Path(args.codes), model, fingerprint)
        check_ids(codes, Path(args.codes))
        decoded = decode_to_files(model, codes, Path(args.out), args.batch_size, args.format,
                                  {"vqgan": fingerprint, "codes": str(Path(args.codes).resolve())})
    except (ValueError, OSError) as err:  # OSError: e.g. --out is a file or not writable
        raise SystemExit(f"error: {err}") from err
    print(f"decoded {decoded}, skipped {len(codes) - decoded} already in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
