"""Read the tensors of a (Lightning) torch checkpoint as numpy arrays without executing pickled code.

First `torch.load(weights_only=True)`. Where torch is missing or refuses the file, a restricted reader of
torch's zip format (torch >= 1.6) takes over: its unpickler resolves the tensor-rebuild functions, the typed
storage classes and `collections.OrderedDict` to our numpy versions and every other global to an inert stand-in
(`Opaque`) that records nothing and runs nothing. A Lightning 1.0 checkpoint keys its callback states by the
callback's class (taming's `ModelCheckpoint`), so refusing unknown classes would refuse the released VQ-GANs;
only the `state_dict` is kept, and it must hold named tensors. Tensor views are bounds-checked against their
storage.
"""
from __future__ import annotations

import collections
import functools
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vqgan_flax.safe_pickle import UnsafePickleError, restricted_load


class CheckpointReadError(ValueError):
    """The checkpoint file cannot be read safely."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stand-in for torch.<X>Storage: only carries the element dtype.

    A pickle can BUILD (set the state of) any object it holds, this one included, so each load gets fresh
    instances (`_allowed`): a crafted file cannot change how a later one's storages decode.
    """

    __slots__ = ("dtype",)

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


class Opaque:
    """What any class or function outside the allowlist unpickles to: accepts arguments and state, keeps none."""

    def __init__(self, *_args: Any, **_kwargs: Any):
        pass

    def __setstate__(self, _state: Any) -> None:
        pass


@functools.cache
def _stand_in(module: str, name: str) -> type[Opaque]:
    """One `Opaque` subclass per global name (a name can be a dict key, as Lightning's callback classes are)."""
    return type(f"Opaque[{module}.{name}]", (Opaque,), {})


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_ignored: Any) -> np.ndarray:
    """The tensor's view of its storage, copied out; views reaching outside the storage are refused."""
    if not (isinstance(offset, int) and all(isinstance(n, int) for n in (*size, *stride)) and len(size) == len(stride)):
        raise ValueError(f"tensor with malformed offset/size/stride {offset!r}, {size!r}, {stride!r}")
    if offset < 0 or min((*size, *stride), default=0) < 0:
        raise ValueError(f"tensor with negative offset, size or stride: {offset}, {size}, {stride}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if 0 not in size and last >= storage.size:
        raise ValueError(f"tensor view (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) reaches element "
                         f"{last} of a storage of {storage.size}")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=[s * item for s in stride])
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_ignored: Any) -> np.ndarray:
    return data


def _allowed() -> dict[tuple[str, str], Any]:
    return {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    }


def _restricted_torch_load(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise CheckpointReadError(f"{path}: not a zip-format torch checkpoint (torch >= 1.6): {err}") from err
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointReadError(f"{path}: expected one */data.pkl in the torch zip archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
            raise CheckpointReadError(f"{path}: big-endian torch checkpoints are not supported")
        storages: dict[str, np.ndarray] = {}

        def persistent_load(pid: Any) -> np.ndarray:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType)):
                raise UnsafePickleError(f"{path}: unexpected persistent id {pid!r}")
            key = str(pid[2])
            if key not in storages:
                storages[key] = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=pid[1].dtype)
            return storages[key]

        with archive.open(pickles[0]) as f:
            return restricted_load(f, str(path), _allowed(), "torch tensors and plain containers", persistent_load,
                                   stand_in=_stand_in)


def damaged_entry(path: Path) -> str | None:
    """The first entry of a zip-format torch file that fails its CRC check, if any (one pass over the file):
    torch.load reads a damaged one without checking, and its corrupt weights would convert (and be fingerprinted
    or checksummed) as if they were the model. None also for torch < 1.6's format, which has no CRCs."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def _check_archive(path: Path) -> None:
    if (damaged := damaged_entry(path)) is not None:
        raise CheckpointReadError(f"{path}: damaged: entry {damaged} fails its CRC check; copy the file again")


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True), or the restricted reader where torch is absent or refuses the file."""
    _check_archive(path)
    try:
        import torch
    except ImportError:
        return _restricted_torch_load(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return _restricted_torch_load(path)  # e.g. Lightning's class-keyed callback states
    except Exception as err:  # torch's reader meets bytes that are no pickle with KeyError, IndexError, struct.error…
        raise CheckpointReadError(f"{path}: cannot read torch checkpoint: {type(err).__name__}: {err}") from err


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        array = value
    else:  # a torch.Tensor from torch.load; numpy has no bfloat16, and the upcast is exact
        tensor = value.detach().cpu()
        array = (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
    return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The `state_dict` of a Lightning checkpoint (or a bare state dict) as name -> numpy array."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such checkpoint file")
    try:
        obj = _torch_load(path)
    except UnsafePickleError as err:
        raise CheckpointReadError(str(err)) from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointReadError(f"{path}: holds no state_dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not hasattr(v, "shape")]
    if bad:
        raise CheckpointReadError(f"{path}: state_dict entries that are not named tensors: {bad[:10]}")
    return {name: _to_numpy(value) for name, value in state.items()}
