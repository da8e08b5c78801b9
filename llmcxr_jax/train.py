"""Train LLM-CXR: `python -m llmcxr_jax.train --config configs/stage1.py --workdir DIR [--config.key=value ...]`.

`--dry_run` builds the state abstractly, compiles one step for the current mesh (or, with `--topology h100:8`
or `v5p:2x2x2`, for GPUs or a TPU pod that are not there; the global batch must divide over them) and prints
per-device memory, without training.
A restarted run resumes from the latest checkpoint in `--workdir` by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llmcxr_jax import aot, checkpoint, config_files, lm_task, model, parallel, trainer
from llmcxr_jax.lm_checkpoint import finished_steps
from vqgan_flax.atomic import check_output_dir

if TYPE_CHECKING:
    from llmcxr_jax.tokenizer import LlmCxrTokenizer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file: configs/stage1.py or configs/stage2.py for "
                                "llmcxr_jax.train, configs/vqgan.py for llmcxr_jax.train_vqgan; a variant after "
                                "a colon (configs/stage1.py:tiny, :demo)", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and logs go here")
flags.DEFINE_bool("dry_run", False, "compile one step and print per-device memory; no training")
flags.DEFINE_string("topology", "", "with --dry_run: compile for devices that are not there: H100s (h100:8, "
                    "h100:2x8; the gpu-aot extra) or a TPU topology such as v5p:2x2x2 (libtpu)")


def check_config(config: Any, mesh: jax.sharding.Mesh) -> None:
    """Errors a user can cause, caught before anything is compiled."""
    if config.model.attention_impl == "cudnn" and mesh.devices.flat[0].platform != "gpu":
        raise ValueError(f"model.attention_impl='cudnn' needs GPUs, not {mesh.devices.flat[0].platform}; use 'auto' "
                         "(cuDNN where it applies) or 'xla'")
    trainer.check_train_settings(config.train, mesh)
    key = "seq_len" if config.data.source == "synthetic" else "max_length"
    if config.data[key] > config.model.max_position_embeddings:
        raise ValueError(f"data.{key}={config.data[key]} exceeds model.max_position_embeddings="
                         f"{config.model.max_position_embeddings}: the model has no positions that far")
    group = config.train.loss_group_size
    if group < 1:
        raise ValueError(f"train.loss_group_size={group} must be at least 1")
    if config.train.loss_mode == "original" and config.train.global_batch_size % group:
        # the groups are of the whole batch (lm_task.sequence_scales), so micro-batches may split them
        raise ValueError(f"train.loss_mode='original' averages over groups of train.loss_group_size={group} "
                         f"sequences; train.global_batch_size={config.train.global_batch_size} is no multiple of it")
    if config.train.num_steps < 0:  # else read as 0: the epochs would decide
        raise ValueError(f"train.num_steps={config.train.num_steps} must be >= 0 (0 = train.num_epochs decide)")
    if config.train.loss_chunk < 0:
        raise ValueError(f"train.loss_chunk={config.train.loss_chunk} must be >= 0 (0 = the whole sequence at once)")
    if config.init.hf_dir and config.init.workdir:
        raise ValueError("set only one of init.hf_dir (stage 1) and init.workdir (stage 2)")


def check_workdir_apart(config: Any, workdir: str) -> None:
    """A run writing where it starts from would resume that run's checkpoints as its own (stage 2 in stage 1's
    workdir) or put checkpoints among the Hugging Face weights."""
    for key in ("workdir", "hf_dir"):
        source = config.init[key]
        if source and Path(source).resolve() == Path(workdir).resolve():
            raise ValueError(f"--workdir {workdir} is init.{key}: give stage {config.stage} a workdir of its own")


def token_metadata(config: Any) -> dict[str, Any]:
    """Token layout and VQ-GAN identity that checkpoints record and later stages and the sampler check."""
    if config.data.source == "synthetic":
        return {"image_offset": config.model.vocab_size, "token_layout": {"synthetic": config.model.vocab_size}}
    tokenizer = load_tokenizer(config)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} but the tokenizer has {tokenizer.vocab_size} "
                         f"ids ({tokenizer.text_vocab_size} text + {config.vqgan.num_codes} image codes)")
    return {"image_offset": tokenizer.image_offset, "token_layout": dataclasses.asdict(tokenizer.layout),
            "vqgan_grid": [config.vqgan.grid, config.vqgan.grid]}


def load_tokenizer(config: Any) -> LlmCxrTokenizer:
    """The run's tokenizer (`config.tokenizer`, else the packaged LLM-CXR one) with its image codes."""
    from llmcxr_jax.tokenizer import LlmCxrTokenizer

    return LlmCxrTokenizer.from_pretrained(config.tokenizer or None, num_image_codes=config.vqgan.num_codes)


def dataset_missing(what: str, data_dir: str, err: Exception, how_to_build: str) -> FileNotFoundError:
    """TFDS's error for a dataset it cannot open, shortened: for an unknown name it lists its whole catalogue."""
    where = f"data_dir {data_dir!r}" + ("" if not data_dir or Path(data_dir).is_dir() else " (no such directory)")
    first = next(iter(str(err).strip().splitlines()), type(err).__name__)
    return FileNotFoundError(f"data: cannot open {what} in {where}: {first} Build it first ({how_to_build}).")


def tfds_sources(config: Any, split: str) -> tuple[dict[str, Any], str]:
    """Random-access sources by kind for one split, and the VQ-GAN fingerprint their codes were made with."""
    import tensorflow_datasets as tfds

    from llmcxr_jax.data.mimic_codes import require_vqgan

    names = {"mimic": config.data.mimic_builder, "vqa": config.data.vqa_builder, "dolly": config.data.dolly_builder}
    sources, fingerprint = {}, ""
    for kind, name in names.items():
        if not name:
            continue
        try:
            builder = tfds.builder(name, data_dir=config.data.data_dir or None)
            sources[kind] = builder.as_data_source(split=split)
        except Exception as e:  # TFDS raises several types for a dataset that was never prepared
            raise dataset_missing(f"{name!r} ({split})", config.data.data_dir, e,
                                  "see README, 'Preparing data'") from None
        if kind in ("mimic", "vqa"):
            recorded = builder.info.metadata["vqgan"]
            grid = (config.vqgan.grid, config.vqgan.grid)
            # Against the config's fingerprint, else the previous builder's: MIMIC and VQA codes must agree.
            require_vqgan(recorded, name, fingerprint=config.vqgan.fingerprint or fingerprint or None, grid=grid)
            fingerprint = recorded["fingerprint"]
    if not sources:
        raise ValueError("data: no sources; set data.mimic_builder, data.vqa_builder and/or data.dolly_builder")
    return sources, fingerprint


def _weights(config: Any, kinds: list[str]) -> dict[str, float]:
    image_group = "+".join(k for k in ("mimic", "vqa") if k in kinds)
    settings = {image_group: "image_weight"} if image_group else {}
    if "dolly" in kinds:
        settings["dolly"] = "dolly_weight"
    for group, key in settings.items():
        if not config.data[key] > 0:  # the mixer would name only its groups
            raise ValueError(f"data.{key}={config.data[key]} must be > 0 while {group} data is used (leave a "
                             "source out with its data.*_builder='')")
    return {group: config.data[key] for group, key in settings.items()}


def report_dropout(config: Any) -> float:
    """`data.report_dropout`; 0 (the original) for config files written before it existed."""
    return float(config.data.get("report_dropout", 0.0))


def make_train_data(config: Any) -> tuple[trainer.DataIterator, int | None, str]:
    """The training iterator, the number of steps in one epoch when known, and the codes' VQ-GAN fingerprint."""
    if config.data.source == "synthetic":
        from llmcxr_jax.data.synthetic import SyntheticBatches

        it = SyntheticBatches(global_batch_size=config.train.global_batch_size, seq_len=config.data.seq_len,
                              vocab_size=config.model.vocab_size, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
        return it, None, ""
    if config.data.source != "tfds":
        raise ValueError(f"data.source {config.data.source!r} is unknown; expected 'tfds' or 'synthetic'")
    from llmcxr_jax.data.pipeline import make_lm_iterator

    sources, fingerprint = tfds_sources(config, "train")
    it = make_lm_iterator(sources, load_tokenizer(config), global_batch_size=config.train.global_batch_size,
                          seed=config.seed, weights=_weights(config, list(sources)), lengths=config.data.lengths,
                          max_length=config.data.max_length, report_dropout=report_dropout(config))
    return it, it.batches_per_epoch, fingerprint


def make_eval_data(config: Any, batch_keys: Any) -> Callable[[], Any] | None:
    """A function returning a fresh one-pass validation iterator (only the arrays the step takes), or None."""
    if config.data.source != "tfds" or not config.train.eval_every:
        return None
    from llmcxr_jax.data.pipeline import make_eval_iterator

    sources, _ = tfds_sources(config, "validation")
    tokenizer = load_tokenizer(config)

    def fresh():
        it = make_eval_iterator(sources, tokenizer, global_batch_size=config.train.global_batch_size,
                                seed=config.seed, weights=_weights(config, list(sources)),
                                lengths=config.data.lengths, max_length=config.data.max_length)
        return ({k: batch[k] for k in batch_keys} for batch in it)

    return fresh


def total_steps(config: Any, steps_per_epoch: int | None) -> int:
    if config.train.num_steps > 0:
        return config.train.num_steps
    if steps_per_epoch is None:
        raise ValueError("train.num_steps must be set when the data source has no epoch length")
    if config.train.num_epochs < 1:  # would train nothing and exit 0, leaving no checkpoint for stage 2
        raise ValueError(f"train.num_steps={config.train.num_steps} and train.num_epochs={config.train.num_epochs}: "
                         "nothing to train; set num_steps > 0 or num_epochs >= 1")
    return config.train.num_epochs * steps_per_epoch


def dry_run_length(config: Any) -> int:
    """Synthetic data's `data.seq_len`; else the longest of `data.lengths`, to which the run's longest batches
    are padded: its peak memory."""
    return config.data.seq_len if config.data.source == "synthetic" else max(config.data.lengths)


def lm_batch_shapes(config: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    shape = (config.train.global_batch_size, dry_run_length(config))
    return {"input_ids": (shape, np.int32), "loss_weights": (shape, np.float32)}


def lower_step(task: trainer.Task, batch_shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: jax.sharding.Mesh,
               rules: parallel.Rules) -> jax.stages.Lowered:
    """One train step lowered from abstract state and batch (nothing is allocated); `batch_shapes` maps each
    batch key to (global shape, dtype)."""
    graphdef, abstract, shardings = trainer.state_shardings(task, mesh, rules)
    batch_sh = trainer.batch_shardings(task, mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh[k]) for k, (shape, dtype) in batch_shapes.items()}
    with jax.set_mesh(mesh), parallel.use_rules(rules):
        return trainer.compile_train_step(task, graphdef, shardings, batch_sh).lower(
            parallel.abstract_arrays(abstract, shardings), batch)


def compile_step(task: trainer.Task, batch_shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: jax.sharding.Mesh,
                 rules: parallel.Rules) -> jax.stages.Compiled:
    """`lower_step`, compiled."""
    with jax.set_mesh(mesh), parallel.use_rules(rules):
        return lower_step(task, batch_shapes, mesh, rules).compile()


LM_REMAT_ADVICE = ("optim.mu_dtype=bfloat16, more train.micro_batches (or a smaller train.global_batch_size) and "
                   "model.remat_policy=full each need less; dry-run them, alone or together")


def dry_run(task: trainer.Task, batch_shapes: dict[str, tuple[tuple[int, ...], Any]], what: str,
            mesh: jax.sharding.Mesh, rules: parallel.Rules,
            remat_advice: str = "a smaller train.global_batch_size avoids it") -> dict[str, int]:
    """Lower and compile one train step from abstract inputs; print and return per-device memory in bytes and
    the number of kernels XLA rematerialized (with `remat_advice` when there are any).

    `batch_shapes` maps each batch key to (global shape, dtype); `what` describes one step's batch.
    """
    compiled = compile_step(task, batch_shapes, mesh, rules)
    abstract = trainer.state_shardings(task, mesh, rules)[1]
    mem = compiled.memory_analysis()
    report = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
              "temporaries": mem.temp_size_in_bytes, "generated_code": mem.generated_code_size_in_bytes}
    state_bytes = parallel.total_bytes(abstract)
    platform = mesh.devices.flat[0].platform
    print(f"dry run: one step of {what} compiled for {mesh.devices.size} {platform} devices, "
          f"mesh {dict(mesh.shape)}")
    print(f"  parameters + optimizer state: {state_bytes / 2**30:.2f} GiB in total")
    for key, value in report.items():
        print(f"  per device {key:>15}: {value / 2**30:8.3f} GiB")
    if platform == "cpu":
        print("  note: memory on (fake) CPU devices is XLA's plan for this mesh, not a guarantee for a GPU")
    report["rematerialized"] = trainer.rematerialized_kernels(compiled.as_text())
    if report["rematerialized"]:
        print(f"  note: XLA recomputes {report['rematerialized']} kernels (matmuls among them) to fit each device's "
              f"memory, which slows the step; {remat_advice}")
    return report


def topology_mesh(topology: str, shape: tuple[int, ...]) -> jax.sharding.Mesh:
    """A mesh of devices that need not exist (`aot.topology_devices`: H100s or a TPU topology)."""
    return parallel.make_mesh(shape, devices=aot.topology_devices(topology))


def run(config: Any, workdir: str, *, dry: bool = False, topology: str = "") -> Any:
    parallel.initialize(config.distributed)
    parallel.enable_compilation_cache()
    mesh = topology_mesh(topology, config.mesh.shape) if topology else parallel.make_mesh(config.mesh.shape)
    rules = parallel.DEFAULT_RULES
    check_config(config, mesh)
    if dry:  # shapes only: no dataset needs to exist, and any step count shapes the schedule
        train_iter, steps, fingerprint = None, max(config.train.num_steps, 1), config.vqgan.fingerprint
    else:
        if not (config.init.hf_dir or config.init.workdir or config.init.from_scratch):  # shapes need no weights
            raise ValueError(f"stage {config.stage} needs weights to start from: init.hf_dir (stage 1: dolly-v2-3b) "
                             "or init.workdir (stage 2: stage 1's workdir); init.from_scratch=True trains random "
                             "weights")
        check_workdir_apart(config, workdir)
        train_iter, steps_per_epoch, fingerprint = make_train_data(config)
        steps = total_steps(config, steps_per_epoch)
    # report_dropout: whether classifier-free guidance's unconditional prompt was trained (for whoever samples)
    metadata = {"stage": config.stage, **token_metadata(config), "vqgan_fingerprint": fingerprint,
                "report_dropout": report_dropout(config)}
    task = lm_task.build_task(config, mesh=mesh, rules=rules, total_steps=steps, metadata=metadata)
    if dry:
        what = f"{config.train.global_batch_size}×{dry_run_length(config)} tokens"
        if config.data.source != "synthetic":
            what += " (the longest of data.lengths)"
        fused = aot.is_gpu_topology(topology) and model.uses_cudnn_attention(config.model.attention_impl,
                                                                             config.model.dtype, "gpu")
        try:
            with aot.cudnn_shaped_attention() if fused else contextlib.nullcontext():
                report = dry_run(task, lm_batch_shapes(config), what, mesh, rules, LM_REMAT_ADVICE)
        except jax.errors.JaxRuntimeError as e:
            if not (fused and aot.OPAQUE_KERNEL in str(e)):
                raise
            raise ValueError(f"--topology {topology}: this jaxlib's CUDA plugin has no {aot.OPAQUE_KERNEL}, which "
                             "stands in for cuDNN's attention when compiling without a GPU; dry-run with "
                             "--config.model.attention_impl=xla (XLA's attention: an upper bound on memory)") from None
        if fused:
            print("  note: cuDNN's fused attention (which needs a GPU to compile) was compiled as opaque kernels of "
                  "its shapes; its workspace is not counted")
        return report
    if config.data.source != "synthetic":
        tokenizer, local_workdir = load_tokenizer(config), checkpoint.local_path(workdir, "--workdir")
        if config.init.workdir:
            tokenizer.require_same_as_saved(config.init.workdir, "init.workdir")
        if finished_steps(local_workdir):  # weights trained there: their tokenizer is kept
            tokenizer.require_same_as_saved(local_workdir, "--workdir")
        if jax.process_index() == 0:  # atomic rewrites of what every process checked: the same tokenizer
            tokenizer.save(local_workdir)  # the sampler reads it from there
    loop = trainer.loop_config(config.train, steps, epoch_steps=steps_per_epoch or 0)
    return trainer.train(task, loop, mesh=mesh, rules=rules, workdir=workdir, train_iter=train_iter,
                         eval_iter_fn=make_eval_data(config, task.batch_axes))


def run_from_flags(argv: list[str], run_fn: Callable[..., Any], example_config: str,
                   config_fields: tuple[str, ...]) -> None:
    """The trainer CLIs' main: check the flags, then `run_fn(config, workdir, dry=, topology=)` with the errors a
    user can cause as one line; the config is checked by `config_files.check_for_trainer`."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS["config"].present:
        raise app.UsageError(f"--config is required, e.g. --config {example_config}")
    if not FLAGS.dry_run and not FLAGS.workdir:
        raise app.UsageError("--workdir is required (checkpoints and logs go there)")
    if FLAGS.topology and not FLAGS.dry_run:
        raise app.UsageError("--topology only makes sense with --dry_run")
    if FLAGS.workdir:
        try:
            check_output_dir(FLAGS.workdir, "--workdir")
        except NotADirectoryError as err:
            raise app.UsageError(str(err)) from None
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO; our progress bar says enough
    try:
        config = config_files.config_from_flags()
        config_files.check_for_trainer(config, FLAGS["config"].config_filename, example_config, config_fields)
        run_fn(config, FLAGS.workdir, dry=FLAGS.dry_run, topology=FLAGS.topology)
    except (ValueError, FileNotFoundError, trainer.NonFiniteLossError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: no traceback; the checkpoints saved before are intact
        print("\ninterrupted; rerun the same command to resume from the latest checkpoint", file=sys.stderr)
        sys.exit(130)


def main(argv: list[str]) -> None:
    run_from_flags(argv, run, "configs/stage1.py", ("stage", "tokenizer", "vqgan"))


if __name__ == "__main__":
    app.run(main, flags_parser=config_files.parse_flags)
