"""Orbax parameter checkpoints: the one layout that conversion, stage-2 seeding and the sampler read.

A model checkpoint directory holds `params/` (an Orbax PyTree of the model's `nnx.Param` state, as a pure
dict in the stacked-layer layout of `llmcxr_jax.model`) and `meta.json` (the model config and provenance).
Restoring goes straight onto a mesh from an abstract target, so nothing is materialised on one host first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from llmcxr_jax import array_checksums, parallel
from llmcxr_jax.lm_checkpoint import checkpoint_kind
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, resolve_dtype
from vqgan_flax.atomic import write_atomic
from vqgan_flax.json_object import read_json_object

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


def local_path(path: str | Path, what: str) -> Path:
    """`path` as a Path, refusing URLs, which pathlib would silently make local (gs://b/run -> gs:/b/run)."""
    if "://" in str(path):
        raise ValueError(f"{what} {path}: URLs are not supported, since checkpoints, TensorBoard events and the "
                         "tokenizer are written through local paths; mount the bucket on every host (e.g. with "
                         "gcsfuse) and pass the mount path")
    return Path(path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {directory} is not a model checkpoint written by llmcxr_jax")
    return read_json_object(path, ValueError)


def require_language_model(meta: dict[str, Any], source: str) -> None:
    """Refuse metadata of anything but a language model (e.g. a VQ-GAN training workdir) by name."""
    if "model_config" not in meta:
        what = "a VQ-GAN training workdir" if meta.get("task") == "vqgan" else "not a language-model checkpoint"
        raise ValueError(f"{source}: {what} (its metadata has no model_config); give an LM checkpoint, HF "
                         "directory or LM training workdir")


def config_from_metadata(meta: dict[str, Any], source: str, **runtime: Any) -> GPTNeoXConfig:
    require_language_model(meta, source)
    # Metadata from before GPTNeoXConfig.vocab_multiple existed describes unpadded tables.
    fields = {"vocab_multiple": 1, **meta["model_config"], **runtime}
    try:
        return GPTNeoXConfig(**fields)
    except TypeError as e:
        raise ValueError(f"{source}: model_config does not fit this version of llmcxr_jax ({e})") from None


def save_model(model: GPTNeoX, directory: str | Path, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write `params/` and `meta.json` (with the parameters' checksums). Orbax commits `params/` atomically;
    meta.json is written last."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
        ckptr.wait_until_finished()
    checksums = {"checksums": array_checksums.tree_checksums(params)}
    write_json_atomic(directory / "meta.json", model_metadata(model.config, {**(extra_metadata or {}), **checksums}))


def load_model(directory: str | Path, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: parallel.Rules = parallel.DEFAULT_RULES, **runtime: Any) -> GPTNeoX:
    """Restore a model checkpoint, or `step` (default: the latest) of a training workdir (parameters only).

    `runtime` overrides config fields such as dtype or attention_impl. A `param_dtype` other than the saved one
    is cast to after the read, once the parameters have been compared with their checksums.
    """
    directory = Path(directory).absolute()
    meta, source, step = latest_metadata(directory, step)
    cfg = config_from_metadata(meta, source, **runtime)
    graphdef, state, _ = _abstract_params(cfg, mesh, rules)
    saved_dtype = meta["model_config"].get("param_dtype", cfg.param_dtype)
    _, _, target = _abstract_params(cfg.replace(param_dtype=saved_dtype), mesh, rules)
    if step is not None:
        ckpts = TrainCheckpoints(directory, read_only=True)
        try:
            params = ckpts.restore_subtree(step, {"model": target})["model"]
        finally:
            ckpts.close()
    else:
        params_dir = directory / "params"
        if not params_dir.is_dir():
            raise FileNotFoundError(f"{params_dir}: missing; {directory} has meta.json but no parameters")
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params_dir).item_metadata  # None without Orbax's _METADATA file
            differences = _shape_differences(stored.tree, target) if stored is not None else []
            if differences:  # before any read starts: Orbax's failed asynchronous reads leave noise behind
                raise ValueError(f"{params_dir}: parameters do not match the model config in meta.json "
                                 f"({'; '.join(differences)})")
            params = ckptr.restore(params_dir, target)
        if changed := _changed_arrays(params, read_metadata(directory).get("checksums", {}), params_dir):
            raise DamagedCheckpointError(f"{params_dir}: {_differ(changed)} (the checksums in meta.json): its files "
                                         "were changed or damaged on disk; convert or copy the checkpoint again")
    nnx.replace_by_pure_dict(state, _cast(params, resolve_dtype(cfg.param_dtype)))
    return nnx.merge(graphdef, state)


def _cast(tree: Any, dtype: Any) -> Any:
    """`tree` in `dtype`, each leaf freed once cast: at the peak the saved tree plus its largest leaf cast."""
    def cast(x: jax.Array) -> jax.Array:
        if x.dtype == dtype:
            return x
        cast_x = x.astype(dtype)
        x.delete()
        return cast_x

    return jax.tree.map(cast, tree)


def _listed(names: list[str], limit: int = 3) -> str:
    """'a, b, c and 4 more (7 arrays)' for messages."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{', '.join(names[:limit])}{more} ({len(names)} array{'s' if len(names) > 1 else ''})"


def _differ(names: list[str]) -> str:
    return f"{_listed(names)} {'differs' if len(names) == 1 else 'differ'} from what was saved"


def _changed_arrays(tree: Any, recorded: dict[str, str], where: Path) -> list[str]:
    """The arrays of a restored `tree` that differ from their saved checksums; a warning names those that could
    not be compared although checksums were saved (restored in another dtype or shape, or renamed)."""
    changed, unchecked = array_checksums.compare(tree, recorded)
    if recorded and unchecked:
        logging.warning("%s: %s could not be compared with the saved checksums (restored in another dtype or shape "
                        "than saved, or not among the saved arrays)", where, _listed(unchecked))
    return changed


def _shape_differences(stored: Any, target: Any, limit: int = 3) -> list[str]:
    """A line per parameter that one tree has and the other lacks, or whose shapes differ: the first `limit`,
    then how many more."""
    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in leaves}

    have, want = shapes(stored), shapes(target)
    lines = [f"{name}: stored {have.get(name, 'nothing')}, the config needs {want.get(name, 'nothing')}"
             for name in sorted(have.keys() | want.keys()) if have.get(name) != want.get(name)]
    return lines[:limit] + ([f"and {len(lines) - limit} more"] if len(lines) > limit else [])


def latest_metadata(directory: str | Path, step: int | None = None) -> tuple[dict[str, Any], str, int | None]:
    """(metadata, where it was read, step) of a converted checkpoint (step None) or of a training workdir's
    `step` (default: its latest finished one); `checkpoint_kind` tells them apart."""
    directory = Path(directory).absolute()
    if checkpoint_kind(directory) != "workdir":
        return _without_checksums(read_metadata(directory)), str(directory / "meta.json"), None
    with workdir_step(directory, step) as (ckpts, step):
        return ckpts.read_meta(step), f"{directory / 'checkpoints'} step {step} meta", step


@contextlib.contextmanager
def workdir_step(workdir: str | Path, step: int | None = None) -> Iterator[tuple[TrainCheckpoints, int]]:
    """A training workdir opened read-only with `step` (default: its latest finished one), closed afterwards."""
    ckpts = TrainCheckpoints(workdir, read_only=True)
    try:
        steps = ckpts.all_steps()
        if not steps:
            raise FileNotFoundError(f"{ckpts.directory}: no finished checkpoint to load")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{ckpts.directory}: no checkpoint of step {step} (it has {steps})")
        yield ckpts, max(steps) if step is None else step
    finally:
        ckpts.close()


def _abstract_params(cfg: GPTNeoXConfig, mesh: jax.sharding.Mesh | None, rules: parallel.Rules):
    """(graphdef, abstract state, restore target with shardings) for a model config; nothing is allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0))))
    shardings = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                 else nnx.to_pure_dict(parallel.state_shardings(state, mesh, rules)))
    return graphdef, state, parallel.abstract_arrays(nnx.to_pure_dict(state), shardings)


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DamagedCheckpointError(ValueError):
    """A checkpoint's files cannot be read; the message names the step's directory and how to go on."""


# TensorStore's status codes for bytes that are missing or do not decode (its errors reach us as their text);
# an array chunk whose zstd frame no longer decodes is a FAILED_PRECONDITION naming zstd's decoder.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_UNDECODABLE = re.compile(r"FAILED_PRECONDITION: .*\bzstd", re.IGNORECASE)


def _damage(error: BaseException) -> str | None:
    """The first line of what says a checkpoint's files are damaged, anywhere in `error`'s chain; else None."""
    while error is not None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        if (isinstance(error, (json.JSONDecodeError, FileNotFoundError)) or first.startswith(_DAMAGE_CODES)
                or _UNDECODABLE.match(first)):
            return first
        error = error.__cause__
    return None


def _without_checksums(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in meta.items() if key != "checksums"}


class ProcessJsonHandler(ocp.CheckpointHandler):
    """One JSON file per process, `process_<i>-of-<n>.json`, each restored by the process that wrote it.

    Every host's data iterator has a state of its own (it drops over-long examples of its own slice), and
    Orbax's JsonSave keeps only the primary host's. The files go into the step's temporary directory like any
    item, so they are committed (or lost) with the step.
    """

    def save(self, directory: epath.Path, args: ProcessJsonSave) -> None:
        (directory / _process_file()).write_text(json.dumps(args.state, sort_keys=True))

    def restore(self, directory: epath.Path, args: ProcessJsonRestore | None = None) -> dict[str, Any]:
        path = directory / _process_file()
        if not path.exists():
            found = sorted(p.name for p in directory.glob("process_*.json"))
            if any(name.endswith(f"-of-{jax.process_count()}.json") for name in found) or not found:
                raise FileNotFoundError(f"{path}: missing (the checkpoint holds the data states {found})")
            raise ValueError(f"{path}: missing; this checkpoint holds the data states {found}. Resume with as many "
                             "processes as wrote it")
        return json.loads(path.read_text())


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    state: dict[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    """Restores the calling process's state."""


@contextlib.contextmanager
def _quiet_read_only_warnings():
    """Orbax warns that a read-only manager is read-only ("Given directory is read only", "setting
    save_interval_steps=0") each time one opens: what was asked for, yet it reads like a fault to users."""
    def expected(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or message.startswith("Given directory is read only"))

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(expected)
    try:
        yield
    finally:
        absl_logger.removeFilter(expected)


class TrainCheckpoints:
    """Training checkpoints under `workdir/checkpoints/<step>/` with items `state`, `data` and `meta`.

    `data` holds each process's data-iterator state (`ProcessJsonHandler`). Saves are asynchronous and atomic
    (Orbax writes to a temporary directory and renames), so a run killed at any moment resumes from the last
    complete step.
    """

    def __init__(self, workdir: str | Path, *, every: int = 0, keep: int = 1, epoch_every: int = 0,
                 keep_epochs: int = 0, async_save: bool = True, read_only: bool = False):
        """Saves every `every` steps, keeping the latest `keep`; with `epoch_every` (an epoch's steps) also at each
        epoch end, keeping the latest `keep_epochs` of those besides (the original's "save every epoch, keep 5").

        `read_only` for reading someone else's workdir (stage 2's init, sampling, export): nothing is created,
        cleaned up or deleted there, and a directory without `checkpoints/` is an error naming it."""
        self.directory = local_path(workdir, "workdir").absolute() / "checkpoints"
        self.every, self.epoch_every = every, epoch_every if keep_epochs else 0
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: missing; {self.directory.parent} is not a training workdir")
        keeping: dict[str, Any] = {"max_to_keep": None if read_only else keep}
        if self.epoch_every and not read_only:
            keeping = {"preservation_policy": preservation.AnyPreservationPolicy([
                preservation.LatestN(keep),
                preservation.EveryNSteps(self.epoch_every, max_to_keep=keep_epochs)])}
        quiet = _quiet_read_only_warnings() if read_only else contextlib.nullcontext()
        with quiet:
            options = ocp.CheckpointManagerOptions(**keeping, enable_async_checkpointing=async_save and not read_only,
                                                   create=not read_only, read_only=read_only)
            # Items are named by the Composite args of each save and restore (item_names is deprecated).
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return any(n > 0 and step % n == 0 for n in (self.every, self.epoch_every))

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Save asynchronously; `meta` gets the checksums of `state`'s arrays, which every restore compares."""
        meta = {**meta, "checksums": array_checksums.tree_checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ProcessJsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        if not self._manager.save(step, args=args, force=True):
            raise RuntimeError(f"{self.directory}: Orbax declined to write the checkpoint of step {step}")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ProcessJsonRestore(),
                                  meta=ocp.args.JsonRestore())
        restored = self._read(step, args)
        self._check_values(step, restored)
        return restored.state, restored.data, _without_checksums(restored.meta)

    def restore_subtree(self, step: int, target: Any) -> Any:
        """Restore only the part of `state` that `target` names (e.g. the model without optimizer moments)."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        restored = self._read(step, ocp.args.Composite(state=args, meta=ocp.args.JsonRestore()))
        self._check_values(step, restored)
        return restored.state

    def _check_values(self, step: int, restored: Any) -> None:
        """Compare the restored arrays with the checksums saved beside them (checkpoints written before
        2026-11-29 have none)."""
        if changed := _changed_arrays(restored.state, restored.meta.get("checksums", {}), self.directory / str(step)):
            raise self._damaged(step, f"{_differ(changed)}: the files were changed or damaged on disk")

    def read_meta(self, step: int) -> dict[str, Any]:
        """The `meta` that `save` was given."""
        return _without_checksums(self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        """Orbax's restore, with a checkpoint whose files are damaged (truncated, corrupted, deleted) as one error
        that names the step's directory and the way on. Anything else (no permission, no memory, shapes that do
        not match the request, another process count) passes through: moving that step aside would not help."""
        try:
            return self._manager.restore(step, args=args)
        except Exception as e:
            if (reason := _damage(e)) is None:
                raise
            raise self._damaged(step, f"damaged or incomplete, cannot be read ({reason})") from e

    def _damaged(self, step: int, what: str) -> DamagedCheckpointError:
        """The error for a step whose files are damaged: what is wrong, and how to go on without it."""
        earlier = [s for s in self.all_steps() if s < step]
        way_on = (f"resume from step {earlier[-1]}" if earlier else "start again")
        return DamagedCheckpointError(f"{self.directory / str(step)}: {what}; move it aside "
                                      f"(mv {self.directory / str(step)} {self.directory}/damaged-{step}) to {way_on}")

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
