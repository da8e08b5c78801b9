"""The generic training loop: a task brings its state, pure step and metrics; the loop brings everything else.

Everything else is: the mesh and state shardings (from the state's logical axes), a jitted step with explicit
in/out shardings and donated state, Orbax checkpoints with the data-iterator state (exact resume, also after
SIGKILL), SIGTERM handling, evaluation cadence, progress bar, TensorBoard (process 0 only) and a stop with a
clear message on a non-finite loss. The LM stages are the first task; the VQ-GAN is the second.
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmcxr_jax import checkpoint, parallel


class DataIterator(Protocol):
    """Yields process-local numpy batches; its state round-trips through JSON (Grain iterators do)."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


def data_log_values(train_iter: DataIterator) -> dict[str, float]:
    """What an iterator reports about its data (the LM pipeline: the fraction dropped for length), if anything."""
    log_values = getattr(train_iter, "log_values", None)
    return log_values() if log_values is not None else {}


@dataclasses.dataclass
class Task:
    """What a task supplies. `create_state` must be deterministic: it runs under `eval_shape` and `jit`.

    `initial_state`, when given, builds the starting state of a fresh run from outside (an HF directory, a
    previous stage) directly onto the shardings it receives. `summarize` turns summed metrics into the numbers
    that are logged; `throughput` turns (metrics, seconds) into rates such as tokens/s and MFU. `images` returns
    pictures of the current state (name -> (H, W, 3) uint8) for TensorBoard; it runs on every process, since it
    may compute on global arrays, and process 0 writes them.
    """

    create_state: Callable[[], nnx.Module]
    train_step: Callable[[nnx.Module, dict[str, jax.Array]], dict[str, jax.Array]]
    batch_axes: dict[str, tuple[str | None, ...]]
    summarize: Callable[[dict[str, Any]], dict[str, float]]
    eval_step: Callable[[nnx.Module, dict[str, jax.Array]], dict[str, jax.Array]] | None = None
    initial_state: Callable[[Any], Any] | None = None
    throughput: Callable[[dict[str, float], float], dict[str, float]] | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    check_restored_metadata: Callable[[dict[str, Any]], None] | None = None
    images: Callable[[nnx.Module], dict[str, np.ndarray]] | None = None


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    total_steps: int
    log_every: int = 50
    eval_every: int = 0
    image_every: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 5
    epoch_steps: int = 0  # > 0 with keep_epoch_checkpoints: also save at every epoch end
    keep_epoch_checkpoints: int = 0
    async_checkpoints: bool = True
    progress: bool = True


T = TypeVar("T")


def dataclass_from_section(cls: type[T], section: Any, name: str) -> T:
    """A config section (ConfigDict) of `cls`'s fields → `cls`, naming fields it does not have."""
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(section) - known):
        raise ValueError(f"{name} has unknown fields {unknown}; known: {sorted(known)}")
    return cls(**dict(section))


def loop_config(train_config: Any, total_steps: int, epoch_steps: int = 0) -> LoopConfig:
    """The loop settings of a config's `train` block (keys named as LoopConfig's fields)."""
    t = train_config
    return LoopConfig(total_steps=total_steps, log_every=t.log_every, eval_every=t.eval_every,
                      image_every=t.get("image_every", 0), checkpoint_every=t.checkpoint_every,
                      keep_checkpoints=t.keep_checkpoints, epoch_steps=epoch_steps,
                      keep_epoch_checkpoints=t.get("epoch_checkpoints", 0), async_checkpoints=t.async_checkpoints,
                      progress=t.progress)


def check_train_settings(train_config: Any, mesh: Mesh) -> None:
    """The `train.*` batch and loop settings both trainers share; before anything is built or written."""
    t = train_config
    for key in ("global_batch_size", "micro_batches"):
        if t[key] < 1:
            raise ValueError(f"train.{key}={t[key]} must be at least 1")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    gbs, mbs = t.global_batch_size, t.micro_batches
    if gbs % mbs:
        raise ValueError(f"train.global_batch_size={gbs} is not divisible by train.micro_batches={mbs}")
    if (gbs // mbs) % shards:
        raise ValueError(f"a micro-batch of {gbs // mbs} does not divide over the {shards} data×fsdp shards of mesh "
                         f"{dict(mesh.shape)}; change train.global_batch_size or mesh.shape")
    if gbs % jax.process_count():
        raise ValueError(f"train.global_batch_size={gbs} is not divisible by {jax.process_count()} processes")
    for key in ("log_every", "eval_every", "image_every", "checkpoint_every", "epoch_checkpoints"):
        if t.get(key, 0) < 0:
            raise ValueError(f"train.{key}={t[key]} must be >= 0 (0 = never)")
    if t.keep_checkpoints < 1:  # Orbax's max_to_keep=0 deletes every checkpoint, the final one too
        raise ValueError(f"train.keep_checkpoints={t.keep_checkpoints} must be at least 1")


class NonFiniteLossError(RuntimeError):
    pass


class _Preemption:
    """Turns SIGTERM, and a first Ctrl-C, into a stop the loop checks between steps (then a final checkpoint and
    a clean exit); a Ctrl-C while such a stop is pending raises KeyboardInterrupt (no checkpoint of that step;
    a save already in flight is still waited for).

    Every step and the final save are collective, so all processes must stop at the same step, yet each sees only
    its own signal. With several processes `stop_now` therefore ORs the flags on the devices and returns the vote
    cast one step earlier: by then the loop has waited for that step's metrics anyway, so voting adds no
    host-device sync. A single process reads its flag directly.

    Once `jax.distributed` is initialised, JAX's own preemption notifier catches SIGTERM until this handler is
    installed (start-up, restoring a checkpoint): such a signal did not stop the run at all. `stop_now` also
    asks JAX's preemption sync point, which every process reaches at the same step after such a notice.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, mesh: Mesh) -> None:
        self.requested: str | None = None  # the signal's name
        self._previous: dict[int, Any] = {}
        self._vote = _any_process(mesh) if jax.process_count() > 1 else None
        self._ballot: jax.Array | None = None
        self.noticed_early = False  # stopped by a SIGTERM that JAX's notifier caught before this handler

    def stop_now(self, step: int) -> bool:
        """Whether to stop after `step`, the step just dispatched; the same answer on every process."""
        if self._vote is None:
            stop = self.requested is not None
        else:
            ballot, self._ballot = self._ballot, self._vote(self.requested is not None)
            stop = ballot is not None and bool(ballot)
        if _preemption_sync_point(step) and not stop:
            self.noticed_early = True
            return True
        return stop

    def __enter__(self) -> _Preemption:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. inside some test runners): no handler, nothing breaks
            self._previous = {}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested is not None:  # a stop is on its way (Ctrl-C or SIGTERM): abort without its checkpoint
                raise KeyboardInterrupt
            print("\nCtrl-C: saving a checkpoint after this step (press Ctrl-C again to abort without one)",
                  flush=True)
        self.requested = self.requested or ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _preemption_sync_point(step: int) -> bool:
    """JAX's answer for `step` after a preemption notice (False without `jax.distributed` or its service)."""
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service off: then no notifier takes SIGTERM from us either
        return False


def _any_process(mesh: Mesh) -> Callable[[bool], jax.Array]:
    """flag -> a replicated bool, True when any process passed True; dispatched, not waited for."""
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    reduce = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def vote(flag: bool) -> jax.Array:
        shards = [jax.device_put(np.full((1,), flag), d) for d in sharding.addressable_devices]
        return reduce(jax.make_array_from_single_device_arrays((mesh.size,), sharding, shards))

    return vote


class _Logger:
    """TensorBoard scalars and a progress bar, both only on process 0."""

    def __init__(self, workdir: Path, total_steps: int, start_step: int, progress: bool):
        self.active = jax.process_index() == 0
        self._writer = None
        self._bar = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(workdir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        for key, value in values.items():
            self._writer.add_scalar(f"{prefix}/{key}", value, step)
        self._writer.flush()
        shown = {k: f"{v:.4g}" for k, v in values.items()
                 if k in ("loss", "tokens_per_s", "mfu", "lr") or (k == "dropped_fraction" and v > 0)}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        else:
            print(f"[{prefix}] step {step}: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def images(self, step: int, prefix: str, values: dict[str, np.ndarray]) -> None:
        if not self.active:
            return
        for key, value in values.items():
            self._writer.add_image(f"{prefix}/{key}", value, step, dataformats="HWC")
        self._writer.flush()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        if self.active:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def state_shardings(task: Task, mesh: Mesh, rules: parallel.Rules) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract state, shardings) without allocating anything."""
    graphdef, abstract = nnx.split(nnx.eval_shape(task.create_state))
    return graphdef, abstract, parallel.state_shardings(abstract, mesh, rules)


def batch_shardings(task: Task, mesh: Mesh, rules: parallel.Rules) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, parallel.logical_to_spec(axes, None, mesh, rules))
            for k, axes in task.batch_axes.items()}


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) → (k, B/k, ...), interleaved (micro-batch i = rows i::k) so each keeps the batch sharding."""
    if x.shape[0] % k:
        raise ValueError(f"global batch {x.shape[0]} is not divisible by train.micro_batches={k}")
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Process-local numpy rows → global arrays (each process holds its slice of the batch axis)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def compile_train_step(task: Task, graphdef: nnx.GraphDef, shardings: Any, batch_sh: dict[str, NamedSharding],
                       ) -> Callable[..., Any]:
    """(state, batch) -> (state, metrics), jitted with explicit shardings; the state is donated."""
    def step(state, batch):
        module = nnx.merge(graphdef, state)
        metrics = task.train_step(module, batch)
        return nnx.state(module), metrics

    return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)


_REMATERIALIZED = re.compile(r"^\s*(?:ROOT )?%[\w.-]+\.remat\d* = ", re.M)


def rematerialized_kernels(hlo_text: str) -> int:
    """How many instructions of a compiled module XLA duplicated to fit the device's memory (its
    rematerialization pass names the copies `*.remat`, `*.remat2`, ...): matmuls and fusions the step runs more
    than once, a slowdown its FLOP count does not show."""
    return len(_REMATERIALIZED.findall(hlo_text))


def compile_eval_step(task: Task, graphdef: nnx.GraphDef, shardings: Any, batch_sh: dict[str, NamedSharding],
                      ) -> Callable[..., Any]:
    """(state, batch) -> summed metrics, jitted; the state is only read."""
    def step(state, batch):
        return task.eval_step(nnx.merge(graphdef, state), batch)

    return jax.jit(step, in_shardings=(shardings, batch_sh))


def _fetch(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _add(total: dict[str, float] | None, new: dict[str, float]) -> dict[str, float]:
    return dict(new) if total is None else {k: total[k] + new[k] for k in total}


def train(task: Task, loop: LoopConfig, *, mesh: Mesh, rules: parallel.Rules, workdir: str | Path,
          train_iter: DataIterator, eval_iter_fn: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None,
          ) -> Any:
    """Train until `loop.total_steps`, resuming from the latest checkpoint in `workdir`; returns the final state."""
    workdir = checkpoint.local_path(workdir, "workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    graphdef, abstract, shardings = state_shardings(task, mesh, rules)
    batch_sh = batch_shardings(task, mesh, rules)
    ckpts = checkpoint.TrainCheckpoints(workdir, every=loop.checkpoint_every, keep=loop.keep_checkpoints,
                                        epoch_every=loop.epoch_steps, keep_epochs=loop.keep_epoch_checkpoints,
                                        async_save=loop.async_checkpoints)
    try:  # closed on every path: a refused resume must not leave Orbax's threads running
        with jax.set_mesh(mesh), parallel.use_rules(rules):
            start = ckpts.latest_step()
            if start is not None:
                if task.check_restored_metadata is not None:  # before any array: a clear error, not a shape one
                    task.check_restored_metadata(ckpts.read_meta(start))
                target = parallel.abstract_arrays(nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
                pure, data_state, _ = ckpts.restore(start, target)
                state = abstract
                nnx.replace_by_pure_dict(state, pure)
                train_iter.set_state(data_state)
                done = start >= loop.total_steps
                announce(f"{workdir}: nothing to train, step {start} of {loop.total_steps} is done" if done
                         else f"{workdir}: resuming at step {start} of {loop.total_steps}")
            elif task.initial_state is not None:
                start, state = 0, task.initial_state(shardings)
            else:
                announce(f"{workdir}: starting from freshly initialised weights")
                start, state = 0, jax.jit(lambda: nnx.state(task.create_state()), out_shardings=shardings)()
            step_fn = compile_train_step(task, graphdef, shardings, batch_sh)
            eval_fn = compile_eval_step(task, graphdef, shardings, batch_sh) if task.eval_step else None
            image_fn = (lambda s: task.images(nnx.merge(graphdef, s))) if task.images else None
            logger = _Logger(workdir, loop.total_steps, start, loop.progress)
            try:
                return _run(task, loop, state, start, train_iter, step_fn, eval_fn, eval_iter_fn, batch_sh,
                            ckpts, logger, image_fn, mesh)
            finally:
                logger.close()
    finally:
        ckpts.close()


def announce(message: str) -> None:
    """A line for the user, from the first process only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _run(task, loop, state, step, train_iter, step_fn, eval_fn, eval_iter_fn, batch_sh, ckpts, logger, image_fn,
         mesh):
    """The loop body. Metrics of step t are read after step t+1 is dispatched, so the host never idles the device.

    Throughput windows leave out compiles (the step compiled for each new batch shape) and the time spent saving,
    evaluating and drawing images, so tokens/s and MFU are training's.
    """
    window: dict[str, float] | None = None
    window_start, window_steps, aside = time.perf_counter(), 0, 0.0
    executables: dict[tuple, Any] = {}  # the step compiled for each batch shape
    pending = None
    with _Preemption(mesh) as preemption:
        while step < loop.total_steps:
            batch_state = train_iter.get_state()  # names the batch in error messages
            batch = to_global(next(train_iter), batch_sh)
            shapes = tuple(sorted((k, v.shape) for k, v in batch.items()))
            if shapes not in executables:
                compiling = time.perf_counter()
                executables[shapes] = _compile_for(step_fn, state, batch, shapes, logger)
                aside += time.perf_counter() - compiling
            state, metrics = executables[shapes](state, batch)
            step += 1
            if pending is not None:
                window = _add(window, _check_finite(*pending))
            pending = (metrics, step, batch_state)
            window_steps += 1
            logger.advance()
            last = step == loop.total_steps
            log_now = bool(loop.log_every) and (step % loop.log_every == 0 or last)
            stop = preemption.stop_now(step)  # once: a signal arriving later in this step is handled at the next
            save_now = ckpts.should_save(step) or last or stop
            if log_now or save_now:
                window = _add(window, _check_finite(*pending))
                pending = None
            if log_now:
                seconds = time.perf_counter() - window_start - aside
                means = {k: v / window_steps if k in ("loss", "grad_norm", "lr") else v for k, v in window.items()}
                values = task.summarize(means)
                if task.throughput is not None:
                    values.update(task.throughput(window, seconds))
                values.update(data_log_values(train_iter))
                logger.scalars(step, "train", values)
                window, window_start, window_steps, aside = None, time.perf_counter(), 0, 0.0
            eval_now = eval_fn is not None and eval_iter_fn is not None and loop.eval_every and (
                step % loop.eval_every == 0 or last)
            image_now = image_fn is not None and loop.image_every and (step % loop.image_every == 0 or last)
            side_work = save_now or eval_now or image_now
            if side_work:
                jax.block_until_ready(state)  # the step itself still counts as training
                set_aside = time.perf_counter()
            if save_now:
                if not bool(_all_finite(state)):  # the loss and gradients came from the weights before the update
                    raise NonFiniteLossError(
                        f"the weights after step {step} are not finite (the batch drawn at data-iterator state "
                        f"{batch_state}); training stopped; the last good checkpoint is kept and none was written "
                        "for this step")
                ckpts.save(step, nnx.to_pure_dict(state), train_iter.get_state(),
                           {**task.metadata, "total_steps": loop.total_steps})
            if eval_now:
                sums = None
                for eval_batch in eval_iter_fn():
                    sums = _add(sums, _fetch(eval_fn(state, to_global(eval_batch, batch_sh))))
                if sums is not None:
                    logger.scalars(step, "eval", task.summarize(sums))
            if image_now:
                logger.images(step, "train", image_fn(state))
            if side_work:
                aside += time.perf_counter() - set_aside
            if stop:
                cause = ("SIGTERM to some process during start-up" if preemption.noticed_early
                         else preemption.requested or "SIGTERM/Ctrl-C on another process")
                logger.message(f"{cause}: saved a checkpoint at step {step}; exiting cleanly")
                break
    return state


def _compile_for(step_fn: Any, state: Any, batch: dict[str, jax.Array], shapes: tuple, logger: _Logger) -> Any:
    """The step compiled for this batch's shapes, with a note when XLA had to recompute kernels to fit it."""
    executable = step_fn.lower(state, batch).compile()
    copies = rematerialized_kernels(executable.as_text())
    if copies:
        logger.message(f"note: for batches of {dict(shapes)}, XLA recomputes {copies} kernels of the step (matmuls "
                       "among them) to fit each device's memory, which slows every step; a smaller batch per device "
                       "or less optimizer state avoids it (--dry_run compiles and reports without training)")
    return executable


@jax.jit
def _all_finite(state: Any) -> jax.Array:
    """Whether every float array of the state is finite; run before each save only."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def _check_finite(metrics: dict[str, jax.Array], step: int, batch_state: dict[str, Any]) -> dict[str, float]:
    """The step's metrics, checked before its state is saved: a finite loss with non-finite gradients (computed
    from the weights before the update) would otherwise save a checkpoint of NaN weights."""
    values = _fetch(metrics)
    checked = {k: v for k, v in values.items() if k == "loss" or k.endswith("grad_norm")}
    bad = [f"{k} is {v}" for k, v in checked.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(
            f"{', '.join(bad)} at step {step} (the batch drawn at data-iterator state {batch_state}); "
            "training stopped; the last good checkpoint is kept and none was written for this step")
    return values
