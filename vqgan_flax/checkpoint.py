"""A VQ-GAN directory: `config.json` + `params.safetensors` + `meta.json`, and the parameter fingerprint.

Parameters are stored as one safetensors file of fp32 arrays keyed by their dotted NNX path
(`encoder.down.0.block.1.conv1.kernel`), readable without orbax or torch. `meta.json` holds the
fingerprint: sha256 over, for each name in sorted order, `name:dtype:shape\\n` then the C-order bytes
of the array, so it is independent of file layout and stable across save/load.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from vqgan_flax.atomic import write_atomic
from vqgan_flax.config import VQGANConfig
from vqgan_flax.json_object import read_json_object
from vqgan_flax.layers import Dtype
from vqgan_flax.model import VQGAN

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
META_FILE = "meta.json"
FORMAT = "vqgan_flax.params/1"


class CheckpointError(ValueError):
    """A VQ-GAN directory or parameter set is missing, corrupt or does not fit its config."""


def _name(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in path)


def _abstract(config: VQGANConfig, dtype: Dtype) -> VQGAN:
    return nnx.eval_shape(lambda: VQGAN(config, dtype=dtype, rngs=nnx.Rngs(0)))


def param_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, computed abstractly (no memory, no FLOPs)."""
    return {_name(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(nnx.state(_abstract(
        config, jnp.float32)))}


def params_of(model: VQGAN) -> dict[str, np.ndarray]:
    """Name -> host numpy copy of every parameter."""
    return {_name(path): np.asarray(jax.device_get(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def check_params(params: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise naming every missing, unknown and wrongly shaped parameter."""
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    shapes = [f"{n}: has {tuple(params[n].shape)}, config needs {tuple(expected[n])}"
              for n in sorted(set(params) & set(expected)) if tuple(params[n].shape) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unknown:
        problems.append(f"unknown keys {_some(unknown)}")
    if shapes:
        problems.append("shape mismatches " + "; ".join(_some(shapes)))
    if prefix := _common_prefix(unknown, expected):
        problems.append(f"every key carries the prefix {prefix!r} (e.g. a Net2Net checkpoint's first stage): strip it")
    if problems:
        raise CheckpointError(f"{source}: " + ". ".join(problems))


def _some(names: list[str], shown: int = 10) -> list[str]:
    """The first names of a long list, and how many more (a wrong checkpoint lists hundreds)."""
    return names if len(names) <= shown else [*names[:shown], f"... {len(names) - shown} more"]


def _common_prefix(unknown: list[str], expected: Mapping[str, Any]) -> str | None:
    """A prefix such that every unknown key is an expected key behind it, if there is one."""
    if not unknown:
        return None
    first = unknown[0]
    prefix = next((first[:-len(name)] for name in expected if first.endswith(name) and first != name), None)
    if prefix and all(k.startswith(prefix) and k[len(prefix):] in expected for k in unknown):
        return prefix
    return None


def build(config: VQGANConfig, params: Mapping[str, np.ndarray], *, dtype: Dtype = jnp.float32,
          source: str = "params") -> VQGAN:
    """A VQGAN holding exactly `params` (checked by name and shape), without a random initialisation pass."""
    graphdef, state = nnx.split(_abstract(config, dtype))
    flat = nnx.to_flat_state(state)
    check_params(params, {_name(p): tuple(v.get_value().shape) for p, v in flat}, source)
    pairs = [(p, v.replace(jnp.asarray(params[_name(p)], jnp.float32))) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(pairs))


def random_params(config: VQGANConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters drawn on the host, for tests and benchmarks: no init program to compile.

    (XLA compiles threefry-based init slowly: ~10 s for the tiny config on a 2-core CPU.) Kernels
    U(±1/√fan_in) like torch's Conv2d default, GroupNorm scales 1 ± 0.1 and biases ~0.1 so that every
    parameter matters, codebook U(±1/n_embed) like taming's.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name == "quantize.embedding":
            value = rng.uniform(-1 / config.n_embed, 1 / config.n_embed, shape)
        elif name.endswith(".kernel"):
            bound = 1 / np.sqrt(np.prod(shape[:-1]))
            value = rng.uniform(-bound, bound, shape)
        elif name.endswith(".scale"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        params[name] = value.astype(np.float32)
    return params


def fingerprint(params: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _stored(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameters as a VQ-GAN directory stores (and fingerprints) them."""
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in params.items()}


def stored_fingerprint(params: Mapping[str, np.ndarray]) -> str:
    """The fingerprint `write` would record for `params`."""
    return fingerprint(_stored(params))


def write(directory: str | Path, config: VQGANConfig, params: Mapping[str, np.ndarray],
          extra_meta: Mapping[str, Any] | None = None) -> str:
    """Write a VQ-GAN directory; returns the fingerprint."""
    directory = Path(directory)
    check_params(params, param_shapes(config), str(directory))
    arrays = _stored(params)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / PARAMS_FILE, safetensors.numpy.save(arrays))
    write_atomic(directory / CONFIG_FILE, json.dumps(config.to_dict(), indent=1) + "\n")
    meta = {"format": FORMAT, "fingerprint": fingerprint(arrays),
            "num_params": int(sum(a.size for a in arrays.values())), **(extra_meta or {})}
    # Last: `load` checks the parameters against this fingerprint, so an interrupted write never loads.
    write_atomic(directory / META_FILE, json.dumps(meta, indent=1) + "\n")
    return meta["fingerprint"]


def save(model: VQGAN, directory: str | Path) -> str:
    """Write `model` as a VQ-GAN directory; returns its fingerprint."""
    return write(directory, model.config, params_of(model))


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError)


def read_config(directory: str | Path) -> VQGANConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return VQGANConfig.from_dict(_read_json(path), source=str(path))
    except ValueError as err:
        raise CheckpointError(str(err)) from err


def read_fingerprint(directory: str | Path) -> str:
    """The fingerprint recorded in `meta.json` (verified against the parameters by `load`)."""
    path = Path(directory) / META_FILE
    meta = _read_json(path)
    if meta.get("format") != FORMAT or not isinstance(meta.get("fingerprint"), str):
        raise CheckpointError(f"{path}: expected format {FORMAT!r} with a fingerprint, got {meta}")
    return meta["fingerprint"]


def load(directory: str | Path, *, dtype: Dtype = jnp.float32) -> VQGAN:
    """Load a VQ-GAN directory written by `save` or `python -m vqgan_flax.convert`; `dtype` is the compute dtype."""
    directory = Path(directory)
    config = read_config(directory)
    recorded = read_fingerprint(directory)
    path = directory / PARAMS_FILE
    try:
        params = safetensors.numpy.load_file(path)
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read parameters: {err}") from err
    if fingerprint(params) != recorded:
        raise CheckpointError(f"{path}: parameters do not match the fingerprint in {directory / META_FILE}")
    return build(config, params, dtype=dtype, source=str(path))
