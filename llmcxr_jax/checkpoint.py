"""Orbax parameter checkpoints: the one layout that conversion, stage-2 seeding and the sampler read.

A model checkpoint directory holds `params/` (an Orbax PyTree of the model's `nnx.Param` state, as a pure
dict in the stacked-layer layout of `llmcxr_jax.model`) and `meta.json` (the model config and provenance).
Restoring goes straight onto a mesh from an abstract target, so nothing is materialised on one host first.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from llmcxr_jax import parallel
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig

FORMAT_VERSION = 1
_PACKAGES = ("jax", "flax", "orbax-checkpoint", "llmcxr-jax")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def model_metadata(config: GPTNeoXConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "model_config": config.__dict__.copy(),
            "versions": package_versions(), **(extra or {})}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {directory} is not a model checkpoint written by llmcxr_jax") from None


def config_from_metadata(meta: dict[str, Any], source: str, **runtime: Any) -> GPTNeoXConfig:
    fields = {**meta["model_config"], **runtime}
    try:
        return GPTNeoXConfig(**fields)
    except TypeError as e:
        raise ValueError(f"{source}: model_config does not fit this version of llmcxr_jax ({e})") from None


def save_model(model: GPTNeoX, directory: str | Path, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write `params/` and `meta.json`. Orbax commits `params/` atomically; meta.json is written last."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
        ckptr.wait_until_finished()
    write_json_atomic(directory / "meta.json", model_metadata(model.config, extra_metadata))


def load_model(directory: str | Path, *, mesh: jax.sharding.Mesh | None = None,
               rules: parallel.Rules = parallel.DEFAULT_RULES, **runtime: Any) -> GPTNeoX:
    """Restore a model checkpoint; `runtime` overrides config fields such as dtype or attention_impl."""
    directory = Path(directory).absolute()
    cfg = config_from_metadata(read_metadata(directory), str(directory / "meta.json"), **runtime)
    return restore_params_into(cfg, directory / "params", mesh=mesh, rules=rules)


def restore_params_into(cfg: GPTNeoXConfig, params_dir: Path, *, mesh: jax.sharding.Mesh | None = None,
                        rules: parallel.Rules = parallel.DEFAULT_RULES) -> GPTNeoX:
    """Build the model abstractly and fill it from an Orbax parameter tree, placed by `mesh` when given."""
    abstract = nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              nnx.to_pure_dict(state))
    else:
        shardings = nnx.to_pure_dict(parallel.state_shardings(state, mesh, rules))
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              nnx.to_pure_dict(state), shardings)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(params_dir, target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{params_dir}: parameters do not match the model config in meta.json ({e})") from None
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
