"""The codes directory (DESIGN "Codes file"): image ids and their VQ-GAN codes, in append-only shards.

    CODES_DIR/meta.json           format, VQ-GAN fingerprint, grid, codebook size, preprocessing recipe
    CODES_DIR/shard-00000.npz     arrays `ids` (unicode, (n,)) and `codes` (int16, (n, h, w)), raster order
    CODES_DIR/invalid_ids.json    optional: sorted list of ids whose codes the source held but were invalid

Shards are written to a temporary name and renamed, so a crash leaves only whole shards; a writer reopened
on the directory continues after the last one. Every shard is validated when read (errors name the shard).
The original's pickle `dict[dicom_id -> list[int]]` converts to and from this format. Its invalid entries
(wrong length, code out of range) carry no usable codes, but their ids matter downstream (LLM-CXR removes them
before alternating tasks, unlike ids with no entry), so an import records them in invalid_ids.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vqgan_flax.atomic import TMP_SUFFIX, write_atomic
from vqgan_flax.json_object import read_json_object
from vqgan_flax.safe_pickle import NUMERIC_NUMPY, UnsafePickleError, restricted_load

META_FILE = "meta.json"
INVALID_FILE = "invalid_ids.json"
FORMAT = "vqgan_flax.codes/1"
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".npz"


class CodesError(ValueError):
    """A codes directory, shard or pickle is malformed or does not fit its metadata."""


@dataclasses.dataclass(frozen=True)
class CodesMeta:
    """What the codes mean: which VQ-GAN (fingerprint, "" if unknown) and which preprocessing made them."""

    fingerprint: str
    grid: tuple[int, int]
    num_codes: int
    recipe: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "grid": list(self.grid),
                "num_codes": self.num_codes, "recipe": dict(self.recipe)}

    @classmethod
    def from_json(cls, data: Any, source: str) -> CodesMeta:
        try:
            fmt = data["format"]
            meta = cls(str(data["fingerprint"]), (int(data["grid"][0]), int(data["grid"][1])),
                       int(data["num_codes"]), dict(data["recipe"]))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CodesError(f"{source}: malformed codes metadata ({type(err).__name__}: {err})") from err
        if fmt != FORMAT:
            raise CodesError(f"{source}: format {fmt!r}, expected {FORMAT!r}")
        return meta


def _shard_name(index: int) -> str:
    return f"{_SHARD_PREFIX}{index:05d}{_SHARD_SUFFIX}"


def _shard_index(path: Path) -> int | None:
    digits = path.name[len(_SHARD_PREFIX):-len(_SHARD_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def _shard_paths(path: Path) -> list[Path]:
    shards = [p for p in path.glob(f"{_SHARD_PREFIX}*{_SHARD_SUFFIX}") if _shard_index(p) is not None]
    return sorted(shards, key=_shard_index)


def validate(ids: np.ndarray, codes: np.ndarray, meta: CodesMeta, source: str) -> None:
    """Raise naming `source` unless ids are unique strings and codes are int16 (n, h, w) within the codebook."""
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise CodesError(f"{source}: ids must be a 1-D unicode array, got {ids.dtype} {ids.shape}")
    if codes.dtype != np.int16 or codes.ndim != 3:
        raise CodesError(f"{source}: codes must be int16 (n, h, w), got {codes.dtype} {codes.shape}")
    if codes.shape[1:] != meta.grid:
        raise CodesError(f"{source}: codes grid {codes.shape[1:]} != {meta.grid} in the metadata")
    if len(ids) != len(codes):
        raise CodesError(f"{source}: {len(ids)} ids but {len(codes)} code maps")
    if codes.size and (codes.min() < 0 or codes.max() >= meta.num_codes):
        raise CodesError(f"{source}: codes span {codes.min()}..{codes.max()}, outside 0..{meta.num_codes - 1}")
    if len(set(ids.tolist())) != len(ids):
        raise CodesError(f"{source}: duplicate ids within the shard")


def _read_shard(path: Path, meta: CodesMeta) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:  # not numpy's advice to allow pickles
        reason = "it holds pickled objects, which a codes shard never does" if "allow_pickle" in str(err) else err
        raise CodesError(f"{path}: unreadable shard: {reason}") from err
    if set(arrays) != {"ids", "codes"}:
        raise CodesError(f"{path}: expected arrays ids and codes, found {sorted(arrays)}")
    ids, codes = arrays["ids"], arrays["codes"]
    validate(ids, codes, meta, str(path))
    return ids, codes


def _read_invalid(path: Path, ids: Iterable[str]) -> frozenset[str]:
    """The ids in INVALID_FILE (none if absent: encoded directories have no invalid entries); none may have codes."""
    invalid_path = path / INVALID_FILE
    if not invalid_path.exists():
        return frozenset()
    try:
        data = json.loads(invalid_path.read_text())
    except (OSError, ValueError) as err:
        raise CodesError(f"{invalid_path}: cannot read the invalid ids: {err}") from err
    if not isinstance(data, list) or not all(isinstance(i, str) for i in data):
        raise CodesError(f"{invalid_path}: expected a JSON list of id strings")
    both = set(data).intersection(ids)
    if both:
        raise CodesError(f"{invalid_path}: ids listed as invalid also have codes: {sorted(both)[:10]}")
    return frozenset(data)


def _read_meta(path: Path) -> CodesMeta:
    meta_path = path / META_FILE
    return CodesMeta.from_json(read_json_object(meta_path, CodesError), str(meta_path))


class CodesDir(Mapping[str, np.ndarray]):
    """A read-only, validated codes directory as a mapping id -> int16 (h, w), in shard order.

    `invalid_ids` are the ids whose source entry was invalid (not in the mapping; see INVALID_FILE).
    """

    def __init__(self, path: Path, meta: CodesMeta, ids: list[str], codes: np.ndarray,
                 invalid_ids: frozenset[str] = frozenset()):
        self.path, self.meta, self.ids, self.codes, self.invalid_ids = path, meta, ids, codes, invalid_ids
        self._row = {image_id: i for i, image_id in enumerate(ids)}

    @classmethod
    def open(cls, path: str | Path) -> CodesDir:
        path = Path(path)
        meta = _read_meta(path)
        ids: list[str] = []
        blocks = [np.zeros((0, *meta.grid), np.int16)]
        seen: dict[str, Path] = {}
        for shard in _shard_paths(path):
            shard_ids, shard_codes = _read_shard(shard, meta)
            for image_id in shard_ids.tolist():
                if image_id in seen:
                    raise CodesError(f"{shard}: id {image_id!r} is also in {seen[image_id]}")
                seen[image_id] = shard
            ids.extend(shard_ids.tolist())
            blocks.append(shard_codes)
        return cls(path, meta, ids, np.concatenate(blocks), _read_invalid(path, seen))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def __getitem__(self, image_id: str) -> np.ndarray:
        try:
            return self.codes[self._row[image_id]]
        except KeyError:
            raise KeyError(f"{self.path}: no codes for id {image_id!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def done_ids(self) -> frozenset[str]:
        return frozenset(self._row)


class CodesWriter:
    """Appends shards to a codes directory; reopening an existing one resumes it (same metadata required)."""

    def __init__(self, path: str | Path, meta: CodesMeta):
        self.path = Path(path)
        self.meta = meta
        if (self.path / META_FILE).exists():
            existing = _read_meta(self.path)
            if existing != meta:
                diffs = [f"{f.name}: {getattr(existing, f.name)!r} there, {getattr(meta, f.name)!r} now"
                         for f in dataclasses.fields(meta) if getattr(existing, f.name) != getattr(meta, f.name)]
                raise CodesError(f"{self.path / META_FILE}: cannot resume with different settings ("
                                 + "; ".join(diffs) + "); write to another directory")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / META_FILE, json.dumps(meta.to_json(), indent=1) + "\n")
        for leftover in self.path.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink()  # half-written file of an interrupted run
        existing_dir = CodesDir.open(self.path)
        self._done, self._invalid = set(existing_dir.done_ids()), existing_dir.invalid_ids
        shards = _shard_paths(self.path)
        self._next = _shard_index(shards[-1]) + 1 if shards else 0

    def done_ids(self) -> frozenset[str]:
        return frozenset(self._done)

    def invalid_ids(self) -> frozenset[str]:
        return frozenset(self._invalid)

    def write_invalid(self, ids: Iterable[str]) -> None:
        """Record (replacing any earlier list) the ids whose source codes were invalid; none may have codes."""
        invalid = sorted(set(ids))
        both = self._done.intersection(invalid)
        if both:
            raise CodesError(f"{self.path}: ids to record as invalid already have codes: {sorted(both)[:10]}")
        write_atomic(self.path / INVALID_FILE, json.dumps(invalid) + "\n")
        self._invalid = frozenset(invalid)

    def write(self, ids: Iterable[str], codes: np.ndarray) -> Path:
        """Write one shard atomically; ids must be new to the directory."""
        target = self.path / _shard_name(self._next)
        id_array = np.asarray(list(ids), dtype=str)
        code_array = np.asarray(codes)
        if code_array.dtype.kind not in "iu" or (
                code_array.size and (code_array.min() < 0 or code_array.max() >= self.meta.num_codes)):
            raise CodesError(f"{target}: codes must be integers in 0..{self.meta.num_codes - 1}")
        code_array = code_array.astype(np.int16)  # exact: the range was checked above
        validate(id_array, code_array, self.meta, str(target))
        again = self._done.intersection(id_array.tolist())
        if again:
            raise CodesError(f"{self.path}: ids already written: {sorted(again)[:10]}")
        invalid = self._invalid.intersection(id_array.tolist())
        if invalid:
            raise CodesError(f"{self.path}: ids recorded as invalid in {INVALID_FILE}: {sorted(invalid)[:10]}")
        tmp = target.with_name(target.name + TMP_SUFFIX)
        with tmp.open("wb") as f:
            np.savez(f, ids=id_array, codes=code_array)
            f.flush()
            os.fsync(f.fileno())
        another = (f"another writer is appending to {self.path}: run one encode per codes directory (this one "
                   "resumes when rerun alone)")
        try:
            _publish_new(tmp, target)
        except FileExistsError:
            tmp.unlink()
            raise CodesError(f"{target} was written meanwhile: {another}") from None
        except FileNotFoundError:
            raise CodesError(f"{tmp} was removed meanwhile (a writer starting deletes leftovers): {another}") from None
        self._done.update(id_array.tolist())
        self._next += 1
        return target


def _publish_new(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`, which must not exist: a hard link is exclusive, so of two writers that counted the
    same shards only one gets each name, and the other stops before its ids can appear twice. Filesystems without
    hard links (e.g. gcsfuse) get a check before an atomic rename, which narrows the race but cannot close it."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        if target.exists():
            raise FileExistsError(target) from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def read_pickle(path: str | Path, grid: tuple[int, int],
                num_codes: int) -> tuple[dict[str, np.ndarray], frozenset[str]]:
    """The original's `dict[dicom_id -> list[int]]` as id -> int16 (h, w), and the ids of the invalid entries.

    Like LLM-CXR's loader, entries with len != h·w or max >= num_codes are invalid; so are (not in the
    original) entries with negative codes, which no codebook can hold. Values may also be 1-D integer numpy
    arrays or lists of numpy integers (what `list(array)` gives), which the original's loader reads alike.
    Nothing else is constructed: other classes are refused unbuilt.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = restricted_load(f, str(path), NUMERIC_NUMPY, "a dict of str -> list of int (or integer arrays)")
    except OSError as err:
        raise CodesError(f"{path}: cannot open: {err}") from err
    except UnsafePickleError as err:
        raise CodesError(str(err)) from err
    if not isinstance(obj, dict):
        raise CodesError(f"{path}: expected a dict of id -> list of codes, got {type(obj).__name__}")
    out, invalid = {}, set()
    for key, value in obj.items():
        extent = _code_extent(value)
        if type(key) is not str or extent is None:
            raise CodesError(f"{path}: entry {key!r} is not str -> list of int")
        length, largest, smallest = extent
        if length != grid[0] * grid[1] or largest >= num_codes or smallest < 0:
            invalid.add(key)
            continue
        out[key] = np.asarray(value, dtype=np.int16).reshape(grid)
    return out, frozenset(invalid)


def _code_extent(value: Any) -> tuple[int, int, int] | None:
    """(length, max, min) of a list of ints or numpy integers or of a 1-D integer array; None for anything else.

    Exact types: bool is not a code. `set(map(type, ...))` runs in C over the ~10^8 values of a MIMIC file.
    """
    if type(value) is np.ndarray:
        if value.ndim != 1 or value.dtype.kind not in "iu":
            return None
        return (value.size, int(value.max()), int(value.min())) if value.size else (0, 0, 0)
    if type(value) is not list:
        return None
    if any(t is not int and not issubclass(t, np.integer) for t in set(map(type, value))):
        return None
    return (len(value), int(max(value)), int(min(value))) if value else (0, 0, 0)


def import_pickle(pickle_path: str | Path, out: str | Path, meta: CodesMeta,
                  shard_size: int = 65536) -> tuple[int, int]:
    """Write the original's pickle as a codes directory, invalid ids included; returns (kept, invalid) counts."""
    codes, invalid = read_pickle(pickle_path, meta.grid, meta.num_codes)
    writer = CodesWriter(out, meta)
    writer.write_invalid(invalid)
    todo = sorted(set(codes) - writer.done_ids())
    for start in range(0, len(todo), shard_size):
        chunk = todo[start:start + shard_size]
        writer.write(chunk, np.stack([codes[i] for i in chunk]))
    return len(codes), len(invalid)


def export_pickle(codes: CodesDir, path: str | Path) -> None:
    """Write the original's format: dict[id -> list[int]] of h·w codes in raster order.

    Invalid ids are written as h·w copies of `num_codes`, out of range by any order of the original's checks,
    so reading the pickle back finds them invalid again.
    """
    out = {image_id: grid.reshape(-1).tolist() for image_id, grid in codes.items()}
    size = codes.meta.grid[0] * codes.meta.grid[1]
    out.update((image_id, [codes.meta.num_codes] * size) for image_id in sorted(codes.invalid_ids))
    write_atomic(Path(path), pickle.dumps(out, protocol=4))
