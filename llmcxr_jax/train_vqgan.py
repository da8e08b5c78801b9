"""Train the VQ-GAN: `python -m llmcxr_jax.train_vqgan --config configs/vqgan.py --workdir DIR [--config.key=value]`.

Same loop, checkpoints, resume and SIGTERM handling as the LM stages (`llmcxr_jax.trainer`). When the last step is
done the model is exported as a VQ-GAN directory (`config.export_dir`, default DIR/export) that
`vqgan_flax.load` and `python -m vqgan_flax.encode --vqgan` read; `vqgan_task.export_workdir` exports any
checkpoint later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags

from llmcxr_jax import config_files, parallel, train, trainer, vqgan_task
from llmcxr_jax.data import image_builder
from llmcxr_jax.data.cxr_phantoms_builder import TEST_OFFSET  # eval phantoms: disjoint from training's
flags.adopt_module_key_flags(train)  # --config, --workdir, --dry_run, --topology: so --help lists them


def check_config(config: Any, mesh: jax.sharding.Mesh) -> None:
    """Errors a user can cause, caught before anything is built."""
    trainer.check_train_settings(config.train, mesh)
    if config.train.num_steps <= 0:
        raise ValueError("train.num_steps must be > 0 (VQ-GAN training runs for a number of steps)")
    if not config.optim.base_lr > 0:
        raise ValueError(f"optim.base_lr={config.optim.base_lr} must be > 0")
    for key, zero in (("eval_batches", "all"), ("preview_images", "none")):  # -1: all but 8 images, or a crash
        if config.data[key] < 0:
            raise ValueError(f"data.{key}={config.data[key]} must be >= 0 (0 = {zero})")


def image_sources(config: Any) -> tuple[Any, Any]:
    """(train, eval) random-access record sources with a uint8 `image`."""
    size, data = config.model.resolution, config.data
    if data.source == "phantoms":
        return (image_builder.phantom_records(config.seed, data.num_images, size),
                image_builder.phantom_records(config.seed, data.num_eval_images, size, start=TEST_OFFSET))
    if data.source != "tfds":
        raise ValueError(f"data.source {data.source!r} is unknown; expected 'tfds' or 'phantoms'")
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(data.builder, data_dir=data.data_dir or None)
        train_source = builder.as_data_source(split=data.train_split)
    except Exception as e:  # TFDS raises several types for a dataset that was never prepared
        raise train.dataset_missing(repr(data.builder), data.data_dir, e,
                                    "python -m llmcxr_jax.data.build images, or phantoms") from None
    if "image" not in builder.info.features:  # e.g. a MIMIC LM dataset, which holds codes
        raise ValueError(f"data.builder {data.builder!r} has no 'image' feature (it has "
                         f"{sorted(builder.info.features)}); VQ-GAN training reads cxr_images/... or cxr_phantoms/...")
    kept = builder.info.metadata.get("counts", {}).get("kept", {})
    if data.eval_split not in builder.info.splits and kept.get(data.eval_split) == 0:
        # CxrImages writes no empty split: a folder of fewer than ~1/validation_fraction images has no validation
        print(f"data: {data.builder!r} has no {data.eval_split!r} images (its build put none there); training "
              "without evaluation", flush=True)
        return train_source, []
    try:
        return train_source, builder.as_data_source(split=data.eval_split)
    except Exception as e:
        raise ValueError(f"data.eval_split {data.eval_split!r}: {e}") from None


def run(config: Any, workdir: str | None, mesh: jax.sharding.Mesh | None = None, dry: bool = False,
        topology: str = "") -> str | None:
    """Train, then export; returns the export's fingerprint (None when stopped early, e.g. by SIGTERM, and on every
    process but 0, which alone writes the export).

    `mesh` defaults to `config.mesh.shape` over all devices. `dry`: compile one step and report memory only, for
    the `topology` when one is named (H100s or a TPU pod, ahead of time: none needed here).
    """
    parallel.initialize(config.distributed)
    parallel.enable_compilation_cache()
    if topology:
        mesh = train.topology_mesh(topology, config.mesh.shape)
    mesh = mesh or parallel.make_mesh(config.mesh.shape)
    check_config(config, mesh)
    if dry:
        size, batch = config.model.resolution, config.train.global_batch_size
        task = vqgan_task.build_task(config)
        train.dry_run(task, {"images": ((batch, size, size, 3), np.float32)}, f"{batch} images of {size}²", mesh,
                      parallel.DEFAULT_RULES)
        return None
    train_source, eval_source = image_sources(config)
    size, batch = config.model.resolution, config.train.global_batch_size
    train_iter = image_builder.make_image_iterator(train_source, global_batch_size=batch, resolution=size,
                                                   seed=config.seed)
    eval_iter_fn = None
    if config.train.eval_every and 0 < len(eval_source) < batch:  # evaluation takes full batches only
        print(f"data: the {len(eval_source)} evaluation images are fewer than one batch of {batch}; training "
              "without evaluation", flush=True)
    if config.train.eval_every and len(eval_source) >= batch:
        def eval_iter_fn():
            return image_builder.make_eval_iterator(eval_source, global_batch_size=batch, resolution=size,
                                                    max_batches=config.data.eval_batches)
    preview_source = eval_source if len(eval_source) else train_source
    n = min(config.data.preview_images, len(preview_source))
    to_input = image_builder.ToModelInput(size)
    preview = np.stack([to_input(preview_source[i])["images"] for i in range(n)]) if n else None
    task = vqgan_task.build_task(config, preview=preview)
    t = config.train
    state = trainer.train(task, trainer.loop_config(t, t.num_steps), mesh=mesh, rules=parallel.DEFAULT_RULES, workdir=workdir,
                          train_iter=train_iter, eval_iter_fn=eval_iter_fn)
    if int(state["gen_optimizer"]["step"].get_value()) != t.num_steps:
        return None
    out = config.export_dir or str(Path(workdir) / "export")
    fingerprint = vqgan_task.export_workdir(workdir, out)  # on every process; process 0 writes
    if fingerprint is not None:
        print(f"exported the VQ-GAN of step {t.num_steps} to {out} (fingerprint {fingerprint})", flush=True)
    return fingerprint


def main(argv: list[str]) -> None:
    train.run_from_flags(argv, run, "configs/vqgan.py:demo", ("loss", "lpips", "export_dir"))


if __name__ == "__main__":
    app.run(main, flags_parser=config_files.parse_flags)
