"""Encode image files into a codes directory, data-parallel over all local devices, resumably.

    python -m vqgan_flax.encode --vqgan DIR --out CODES_DIR [--batch_size N] IMAGES_OR_DIRS...

Ids are file stems (two files with one stem are an error). Ids already in CODES_DIR (or recorded there as
invalid by a pickle import) are skipped, so an interrupted run is finished by running it again. Files that
cannot be read or are too small go to CODES_DIR/errors.tsv (id, path, reason) and the run goes on; errors.tsv
lists the failures of the latest run, whose files are retried by the next.
"""
from __future__ import annotations

import argparse
import collections
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vqgan_flax import checkpoint
from vqgan_flax.atomic import check_output_dir
from vqgan_flax.codes import INVALID_FILE, CodesMeta, CodesWriter
from vqgan_flax.images import DICOM_MODES, IMAGE_SUFFIXES, RECIPE, image_files, load_image, preprocess
from vqgan_flax.model import VQGAN
from vqgan_flax.parallel import DataParallel

ERRORS_FILE = "errors.tsv"


def find_images(inputs: Sequence[str | Path]) -> dict[str, Path]:
    """id (file stem) -> path for the given files and the image files under the given directories (a directory
    without any is an error: a wrong path must not pass as an empty dataset)."""
    files: dict[Path, None] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            if not (found := image_files(item)):
                raise ValueError(f"{item}: no image files ({' '.join(IMAGE_SUFFIXES)}) in this directory or below")
            files.update(dict.fromkeys(found))
        elif item.is_file():
            files[item] = None
        else:
            raise ValueError(f"{item}: no such file or directory")
    by_id: dict[str, list[Path]] = collections.defaultdict(list)
    for f in files:
        by_id[f.stem].append(f)
    duplicates = {i: paths for i, paths in by_id.items() if len(paths) > 1 and len({p.resolve() for p in paths}) > 1}
    if duplicates:
        shown = "; ".join(f"{i}: {', '.join(map(str, p))}" for i, p in sorted(duplicates.items())[:10])
        raise ValueError(f"{len(duplicates)} ids name more than one file (ids are file stems): {shown}")
    return {i: paths[0] for i, paths in sorted(by_id.items())}


def _prepare(path: Path, size: int, dicom_mode: str) -> np.ndarray | str:
    """Preprocessed pixels, or the reason the file cannot be used (any failure is per-file, never fatal)."""
    try:
        return preprocess(load_image(path, dicom_mode), size)
    except Exception as err:  # noqa: BLE001 - a bad file must not stop a batch run; the reason is recorded
        return getattr(err, "reason", None) or f"{type(err).__name__}: {err}"


def _prepared(todo: list[tuple[str, Path]], batch_size: int, prepare: Callable[[Path], np.ndarray | str],
              pool: ThreadPoolExecutor) -> Iterator[list[tuple[str, Path, np.ndarray | str]]]:
    """Chunks of prepared images in order, with two chunks decoding ahead on the pool."""
    ahead: collections.deque[list[tuple[str, Path, Future]]] = collections.deque()
    for start in range(0, len(todo), batch_size):
        ahead.append([(i, p, pool.submit(prepare, p)) for i, p in todo[start:start + batch_size]])
        if len(ahead) > 2:
            yield [(i, p, f.result()) for i, p, f in ahead.popleft()]
    while ahead:
        yield [(i, p, f.result()) for i, p, f in ahead.popleft()]


def encode_files(model: VQGAN, images: dict[str, Path], writer: CodesWriter, *, batch_size: int = 64,
                 shard_size: int = 4096, dicom_mode: str = "mimic_jpg", workers: int = 8) -> tuple[int, int, int]:
    """Encode the images not yet in `writer`'s directory; returns (encoded, skipped, failed).

    Ids an import recorded as invalid (the original's pickle held bad codes for them) are skipped too and listed
    in errors.tsv: the original dropped them before alternating directions, so codes for them would shift it.
    """
    done, invalid = writer.done_ids(), writer.invalid_ids()
    todo = [(i, p) for i, p in images.items() if i not in done and i not in invalid]
    encode = DataParallel(VQGAN.encode, model, batch_size)
    batch_size = encode.batch_size  # a multiple of the device count
    pending_ids: list[str] = []
    pending_codes: list[np.ndarray] = []
    encoded = failed = 0

    def flush() -> None:
        if pending_ids:
            writer.write(pending_ids, np.concatenate(pending_codes))
            pending_ids.clear()
            pending_codes.clear()

    size = model.config.resolution
    with ThreadPoolExecutor(workers) as pool, (writer.path / ERRORS_FILE).open("w") as errors, \
            tqdm(total=len(todo), unit="img", desc="encode") as bar:
        errors.write("id\tpath\treason\n")
        for i in sorted(invalid.intersection(images)):
            errors.write(f"{i}\t{images[i]}\tnot encoded: recorded as invalid in {INVALID_FILE} by the import\n")
        try:
            for chunk in _prepared(todo, batch_size, lambda p: _prepare(p, size, dicom_mode), pool):
                good = [(i, x) for i, _, x in chunk if isinstance(x, np.ndarray)]
                for i, p, reason in ((i, p, x) for i, p, x in chunk if isinstance(x, str)):
                    errors.write(f"{i}\t{p}\t{' '.join(reason.split())}\n")
                    failed += 1
                errors.flush()
                if good:
                    pending_codes.append(encode(np.stack([x for _, x in good])))  # ids only once their codes exist
                    pending_ids.extend(i for i, _ in good)
                    encoded += len(good)
                if len(pending_ids) >= shard_size:
                    flush()
                bar.update(len(chunk))
        finally:  # an interrupted run keeps every image it encoded; the next run resumes after them
            flush()
    return encoded, len(images) - len(todo), failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vqgan_flax.encode", description=__doc__.split("\n")[0])
    parser.add_argument("--vqgan", required=True, help="VQ-GAN directory (from vqgan_flax.convert or save)")
    parser.add_argument("--out", required=True, help="codes directory to create or resume")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch, rounded up to the device count")
    parser.add_argument("--shard_size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--dicom_mode", choices=DICOM_MODES, default="mimic_jpg")
    parser.add_argument("--workers", type=int, default=8, help="threads reading and resizing images")
    parser.add_argument("inputs", nargs="+", help="image files (.jpg .png .dcm) or directories searched recursively")
    args = parser.parse_args(argv)
    if bad := [f"--{name} {getattr(args, name)}" for name in ("shard_size", "workers") if getattr(args, name) < 1]:
        raise SystemExit(f"error: {', '.join(bad)}: must be at least 1")
    try:
        images = find_images(args.inputs)
        check_output_dir(args.out)
        model = checkpoint.load(args.vqgan)
        recipe = {**RECIPE, "size": model.config.resolution, "dicom_mode": args.dicom_mode}
        meta = CodesMeta(checkpoint.read_fingerprint(args.vqgan), model.config.grid, model.config.num_codes, recipe)
        writer = CodesWriter(args.out, meta)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwinds, so codes are flushed
        encoded, skipped, failed = encode_files(model, images, writer, batch_size=args.batch_size,
                                                shard_size=args.shard_size, dicom_mode=args.dicom_mode,
                                                workers=args.workers)
    except (ValueError, OSError) as err:  # OSError: e.g. --out is a file or not writable
        raise SystemExit(f"error: {err}") from err
    print(f"encoded {encoded}, skipped {skipped} already in {args.out}, failed {failed}"
          + (f" (see {Path(args.out) / ERRORS_FILE})" if failed else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
