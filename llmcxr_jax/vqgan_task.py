"""The VQ-GAN as a task of the shared training loop: state, the two-optimizer step, metrics, init and export.

One step per batch, as taming's VQModel ran under pytorch-lightning 1.0.8 with two optimizers: the generator
(encoder, quantizer, decoder) steps on the autoencoder loss, then the discriminator steps on a fresh forward pass
of the updated generator. Both are Adam(β 0.5, 0.9) at lr = base_lr × global batch (taming's main.py scaling;
`train.micro_batches` is its accumulate_grad_batches). The losses are `vqgan_flax.losses`. Batches are
`{"images": float32 (B, H, W, 3)}` in [-1, 1]. Parameters are replicated (the largest model has 72 M); the batch
is split over (data, fsdp).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llmcxr_jax import parallel, trainer
from vqgan_flax import checkpoint as vq_checkpoint
from vqgan_flax import discriminator as disc_lib
from vqgan_flax import losses
from vqgan_flax.config import VQGANConfig
from vqgan_flax.discriminator import PatchDiscriminator
from vqgan_flax.lpips import LPIPS
from vqgan_flax.model import VQGAN

BATCH_AXES = {"images": ("batch", None, None, None)}
# Summed over a logging window (or over evaluation batches) and divided by `steps` for the log.
MEAN_METRICS = ("nll_loss", "l1_loss", "p_loss", "quant_loss", "g_loss", "d_weight", "disc_factor", "psnr",
                "disc_loss", "logits_real", "logits_fake", "disc_grad_norm", "perplexity", "codes_used", "dead_codes")


class CodeUsage(nnx.Variable):
    """Per code, the number of steps done when it was last chosen; not trained, kept for the dead-code count."""


class VQGANTrainState(nnx.Module):
    """Everything a step changes: generator, discriminator (+ BatchNorm statistics), two Adam states, code usage.

    LPIPS (frozen VGG16 + heads, or None when the perceptual weight is 0) travels with the state so that it is
    sharded, checkpointed and restored like everything else; no optimizer sees it.
    """

    def __init__(self, model: VQGAN, discriminator: PatchDiscriminator, lpips: LPIPS | None,
                 gen_tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation):
        self.model = model
        self.discriminator = discriminator
        self.lpips = lpips
        self.gen_optimizer = nnx.Optimizer(model, gen_tx, wrt=nnx.Param)
        self.disc_optimizer = nnx.Optimizer(discriminator, disc_tx, wrt=nnx.Param)
        self.last_used = CodeUsage(jnp.zeros((model.config.n_embed,), jnp.int32))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: losses.LossConfig
    lr: float
    seed: int = 0
    micro_batches: int = 1  # Lightning's accumulate_grad_batches: both optimizers step once per k micro-batches
    dead_after: int = 1000  # a code unused for this many steps counts as dead
    restart_dead: bool = False  # move dead codes onto encoder outputs of the batch (not in taming)


def train_step(state: VQGANTrainState, batch: dict[str, jax.Array], cfg: StepConfig) -> dict[str, jax.Array]:
    """Generator step, then discriminator step on a fresh forward pass; mutates `state`, returns metrics.

    With `loss.disc_factor == 0` (no GAN, ever) there is no discriminator step: taming's would see zero
    gradients, leaving D's weights as they are; only its BatchNorm running statistics, which no train-mode
    pass reads, would have moved.

    With `micro_batches` k > 1 the batch is split as for the LM and taken in Lightning 1.0.8's order: each of
    the first k-1 micro-batches adds generator, then discriminator gradients (D's running statistics move, no
    weight does); the last adds its generator gradients, the generator steps on the mean, then D sees the
    updated generator on that micro-batch and steps on its mean. Metrics are means over micro-batches.
    """
    step = state.gen_optimizer.step[...]  # optimizer steps done = Lightning's global_step
    factor = losses.disc_factor(step, cfg.loss)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), step)  # LPIPS head dropout; same on every mesh
    k = cfg.micro_batches
    micro = trainer.split_micro_batches(batch["images"], k)
    micro_rngs = jax.random.split(rng, k) if k > 1 else rng[None]
    if k > 1:  # first: their passes move D's running statistics before the last micro-batch's do
        earlier = accumulate_micro_batches(state, micro[:-1], micro_rngs[:-1], factor, cfg.loss)
    images = micro[-1]
    grads, metrics, codes = losses.generator_grads(state.model, state.discriminator, state.lpips, images, factor,
                                                   cfg.loss, micro_rngs[-1])
    gan = cfg.loss.disc_factor != 0
    if k > 1:
        grads, metrics = _with_earlier(earlier["grads"], earlier["metrics"], grads, metrics, k)
        codes = jnp.concatenate([earlier["codes"].reshape(-1, *codes.shape[1:]), codes])
    state.gen_optimizer.update(state.model, grads)
    d_metrics = {}
    if gan or cfg.restart_dead:
        latents = state.model.encode_latents(images)  # the updated generator's (taming's D step runs it anew)
    if gan:
        reconstructions = state.model.decode_latents(state.model.quantize(latents).z_q)
        d_grads, d_metrics = losses.discriminator_grads(state.discriminator, images, reconstructions, factor)
        if k > 1:
            d_grads, d_metrics = _with_earlier(earlier["d_grads"], earlier["d_metrics"], d_grads, d_metrics, k)
        state.disc_optimizer.update(state.discriminator, d_grads)
        d_metrics["disc_grad_norm"] = optax.tree.norm(d_grads)

    done = step.astype(jnp.int32) + 1
    n_embed = state.model.config.n_embed
    perplexity, used = losses.codebook_usage(codes, n_embed)
    chosen = jnp.bincount(codes.ravel(), length=n_embed) > 0
    state.last_used[...] = jnp.where(chosen, done, state.last_used[...])
    dead_mask = done - state.last_used[...] >= cfg.dead_after
    if cfg.restart_dead:
        restart_dead_codes(state, latents, dead_mask, done, jax.random.fold_in(rng, 1))
    dead = jnp.sum(dead_mask).astype(jnp.float32)
    return {**metrics, **d_metrics, "grad_norm": optax.tree.norm(grads), "lr": jnp.float32(cfg.lr),
            "perplexity": perplexity, "codes_used": used, "dead_codes": dead, "steps": jnp.ones((), jnp.float32)}


def accumulate_micro_batches(state: VQGANTrainState, micro: jax.Array, rngs: jax.Array, factor: jax.Array,
                             cfg: losses.LossConfig) -> dict[str, Any]:
    """Lightning's accumulating batches, scanned: per micro-batch the generator's gradients (D judging its
    reconstructions in train mode), then D's on a fresh forward pass of the same generator. Only D's running
    statistics change (written back to `state`); returns gradient sums and per-micro-batch metrics and codes."""
    d_graph, d_params, d_stats = nnx.split(state.discriminator, nnx.Param, nnx.BatchStat)
    gan = cfg.disc_factor != 0

    def one(carry, xs):
        stats, sums = carry
        images, rng = xs
        disc = nnx.merge(d_graph, d_params, stats, copy=True)
        grads, metrics, codes = losses.generator_grads(state.model, disc, state.lpips, images, factor, cfg, rng)
        sums = {**sums, "grads": jax.tree.map(jnp.add, sums["grads"], grads)}
        outputs = {"metrics": metrics, "codes": codes}
        if gan:
            d_grads, outputs["d_metrics"] = losses.discriminator_grads(disc, images, state.model(images)[0], factor)
            sums["d_grads"] = jax.tree.map(jnp.add, sums["d_grads"], d_grads)
        return (nnx.state(disc, nnx.BatchStat), sums), outputs

    zeros = {"grads": jax.tree.map(jnp.zeros_like, nnx.state(state.model, nnx.Param))}
    if gan:
        zeros["d_grads"] = jax.tree.map(jnp.zeros_like, d_params)
    (d_stats, sums), outputs = jax.lax.scan(one, (d_stats, zeros), (micro, rngs))
    nnx.update(state.discriminator, d_stats)
    return {**sums, **outputs}


def _with_earlier(earlier_sum: Any, earlier_each: Any, grads: Any, metrics: Any, k: int) -> tuple[Any, Any]:
    """Means over all k micro-batches of the last one's gradients and metrics and the earlier ones' (gradients
    summed, metrics stacked by `accumulate_micro_batches`)."""
    return (jax.tree.map(lambda total, last: (total + last) / k, earlier_sum, grads),
            jax.tree.map(lambda each, last: (each.sum(0) + last) / k, earlier_each, metrics))


def restart_dead_codes(state: VQGANTrainState, latents: jax.Array, dead_mask: jax.Array, done: jax.Array,
                       rng: jax.Array) -> None:
    """Each dead code jumps to a random pre-quantisation latent of the batch and counts as used now.

    taming's codebook loss only moves chosen codes, so a code that loses every nearest-neighbour contest stays
    dead for good; small VQ-GANs end up using a few dozen of their codes. Restarting them near the data (as
    Jukebox and SoundStream do) gives them a second chance at the cost of nothing the loss sees.
    """
    flat = latents.reshape(-1, latents.shape[-1])
    picks = flat[jax.random.randint(rng, dead_mask.shape, 0, flat.shape[0])]
    embedding = state.model.quantize.embedding
    embedding[...] = jnp.where(dead_mask[:, None], picks.astype(embedding.dtype), embedding[...])
    state.last_used[...] = jnp.where(dead_mask, done, state.last_used[...])


def eval_step(state: VQGANTrainState, batch: dict[str, jax.Array], cfg: StepConfig) -> dict[str, jax.Array]:
    """Reconstruction quality and code usage of one batch (no GAN terms, no dropout); sums over batches."""
    images = batch["images"]
    reconstructions, q = state.model(images)
    l1 = jnp.mean(jnp.abs(images - reconstructions))
    use_lpips = state.lpips is not None and cfg.loss.perceptual_weight > 0
    p = jnp.mean(state.lpips(images, reconstructions)) if use_lpips else jnp.float32(0)
    q_loss = losses.codebook_loss(q, cfg.loss.beta, cfg.loss.legacy_beta)
    perplexity, used = losses.codebook_usage(q.indices, state.model.config.n_embed)
    nll = l1 + cfg.loss.perceptual_weight * p
    return {"loss_sum": nll + cfg.loss.codebook_weight * q_loss, "nll_loss": nll, "l1_loss": l1, "p_loss": p,
            "quant_loss": q_loss, "psnr": losses.psnr(images, reconstructions), "perplexity": perplexity,
            "codes_used": used, "steps": jnp.ones((), jnp.float32)}


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Per-step means of a training window (loss, grad_norm, lr arrive averaged) or of evaluation batches."""
    steps = max(float(sums.get("steps", 1.0)), 1.0)
    out = {k: float(sums[k]) for k in ("loss", "grad_norm", "lr") if k in sums}
    if "loss_sum" in sums:
        out["loss"] = float(sums["loss_sum"]) / steps
    out.update({k: float(sums[k]) / steps for k in MEAN_METRICS if k in sums})
    return out


# --------------------------------------------------------------------------------------------- building the task


def vqgan_config_from(config: Any) -> VQGANConfig:
    """`config.model` (VQGANConfig fields) -> VQGANConfig, naming unknown or missing fields."""
    try:
        return VQGANConfig.from_dict(dict(config.model), source="config.model")
    except ValueError as err:
        raise ValueError(f"{err} (fields: {[f.name for f in dataclasses.fields(VQGANConfig)]})") from None


def loss_config_from(config: Any) -> losses.LossConfig:
    return trainer.dataclass_from_section(losses.LossConfig, config.loss, "config.loss")


def learning_rate(config: Any) -> float:
    """taming's main.py: base_lr × (GPUs × batch per GPU = global batch) when scale_lr, else base_lr."""
    return config.optim.base_lr * (config.train.global_batch_size if config.optim.scale_lr else 1)


def initial_generator_params(config: VQGANConfig, seed: int) -> dict[str, np.ndarray]:
    """taming's VQModel init, drawn on the host (an XLA init program compiles slowly): torch's Conv2d defaults,
    weight and bias U(±1/√fan_in); GroupNorm 1 and 0; codebook U(±1/n_embed)."""
    rng = np.random.default_rng(seed)
    shapes = vq_checkpoint.param_shapes(config)
    norms = {name.rsplit(".", 1)[0] for name in shapes if name.endswith(".scale")}
    params = {}
    for name, shape in shapes.items():
        module, leaf = name.rsplit(".", 1)
        if name == "quantize.embedding":
            value = rng.uniform(-1 / config.n_embed, 1 / config.n_embed, shape)
        elif module in norms:
            value = np.ones(shape) if leaf == "scale" else np.zeros(shape)
        else:
            bound = 1 / np.sqrt(np.prod(shapes[f"{module}.kernel"][:-1]))
            value = rng.uniform(-bound, bound, shape)
        params[name] = value.astype(np.float32)
    return params


def starting_weights(config: Any, vq_cfg: VQGANConfig, loss_cfg: losses.LossConfig,
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], LPIPS | None]:
    """(generator params, discriminator arrays, LPIPS) of a fresh run: from `init.vqgan_dir` when set
    (a converted taming checkpoint or an export: its loss.safetensors gives D and LPIPS when present), else
    taming's random init. LPIPS only when the perceptual weight is > 0."""
    source = config.init.vqgan_dir
    tensors = losses.read_loss_tensors(source) if source else {}
    if source:
        found = vq_checkpoint.read_config(source)
        if found != vq_cfg:
            differing = [k for k, v in vq_cfg.to_dict().items() if found.to_dict()[k] != v]
            raise ValueError(f"init.vqgan_dir {source}: its config.json differs from config.model in {differing}")
        generator = vq_checkpoint.params_of(vq_checkpoint.load(source))
    else:
        generator = initial_generator_params(vq_cfg, config.seed)
    if any(k.startswith(losses.DISCRIMINATOR_PREFIX) for k in tensors):
        disc = losses.flat_arrays(losses.discriminator_from_tensors(tensors, loss_cfg, f"{source}/loss.safetensors"))
    else:
        disc = disc_lib.init_params(loss_cfg.disc_in_channels, loss_cfg.disc_ndf, loss_cfg.disc_num_layers,
                                    config.seed + 1)
    lpips = None
    if loss_cfg.perceptual_weight > 0:
        lpips = losses.load_lpips(vqgan_dir=config.lpips.vqgan_dir or source, vgg16_path=config.lpips.vgg16_path,
                                  heads_path=config.lpips.heads_path)
    return generator, disc, lpips


def preview_picture(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Originals (top row) over reconstructions (bottom row), both in [-1, 1], as one uint8 (2H, N·W, 3) picture."""
    pixels = np.round((np.clip(np.stack([images, reconstructions]), -1, 1) + 1) * 127.5).astype(np.uint8)
    rows, n, h, w, c = pixels.shape
    return pixels.transpose(0, 2, 1, 3, 4).reshape(rows * h, n * w, c)


_reconstruct = nnx.jit(lambda model, images: model(images)[0])


def build_task(config: Any, preview: np.ndarray | None = None) -> trainer.Task:
    """The VQ-GAN task; `preview` (N, H, W, 3) images in [-1, 1] are shown reconstructed in TensorBoard."""
    vq_cfg, loss_cfg = vqgan_config_from(config), loss_config_from(config)
    if vq_cfg.dropout:
        raise ValueError(f"config.model.dropout={vq_cfg.dropout}: training supports dropout 0 only (LLM-CXR's value)")
    lr = learning_rate(config)
    tx = optax.adam(lr, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps)
    step_cfg = StepConfig(loss=loss_cfg, lr=lr, seed=config.seed, micro_batches=config.train.micro_batches,
                          dead_after=config.train.dead_code_steps, restart_dead=config.train.restart_dead_codes)
    use_lpips = loss_cfg.perceptual_weight > 0
    metadata = {"task": "vqgan", "vqgan_config": vq_cfg.to_dict(), "loss_config": dataclasses.asdict(loss_cfg)}

    def create_state() -> VQGANTrainState:
        rngs = nnx.Rngs(config.seed)
        disc = loss_cfg.discriminator(rngs)
        return VQGANTrainState(VQGAN(vq_cfg, rngs=rngs), disc, LPIPS(rngs=rngs) if use_lpips else None, tx, tx)

    def initial_state(shardings: Any) -> Any:
        generator, disc, lpips = starting_weights(config, vq_cfg, loss_cfg)
        abstract = nnx.eval_shape(create_state)
        lpips_arrays = losses.flat_arrays(lpips) if lpips is not None else None

        def build(gen_arrays, disc_arrays, lpips_arrays):
            model = vq_checkpoint.build(vq_cfg, gen_arrays)
            d = losses.fill(abstract.discriminator, disc_arrays, "discriminator")
            lp = losses.fill(abstract.lpips, lpips_arrays, "lpips") if use_lpips else None
            return nnx.state(VQGANTrainState(model, d, lp, tx, tx))

        return jax.jit(build, out_shardings=shardings)(generator, disc, lpips_arrays)

    def check_restored_metadata(found: dict[str, Any]) -> None:
        for key in ("vqgan_config", "loss_config"):
            if found.get(key) != metadata[key]:
                raise ValueError(f"the checkpoint's {key} {found.get(key)} differs from this run's {metadata[key]}")

    def throughput(window: dict[str, float], seconds: float) -> dict[str, float]:
        steps_per_s = window["steps"] / max(seconds, 1e-9)
        return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * config.train.global_batch_size}

    images_fn = None
    if preview is not None:
        def images_fn(state: VQGANTrainState) -> dict[str, np.ndarray]:
            return {"reconstructions": preview_picture(preview, np.asarray(_reconstruct(state.model,
                                                                                       jnp.asarray(preview))))}

    return trainer.Task(
        create_state=create_state, train_step=lambda s, b: train_step(s, b, step_cfg),
        batch_axes=BATCH_AXES, summarize=summarize, eval_step=lambda s, b: eval_step(s, b, step_cfg),
        initial_state=initial_state, throughput=throughput, metadata=metadata,
        check_restored_metadata=check_restored_metadata, images=images_fn)


# ------------------------------------------------------------------------------------------------------- export


def export(model: VQGAN, discriminator: PatchDiscriminator, lpips: LPIPS | None, directory: str | Path,
           extra_meta: dict[str, Any] | None = None) -> str:
    """Write the generator as a VQ-GAN directory that `vqgan_flax.load` reads; returns its fingerprint.

    loss.safetensors beside it holds the discriminator (with running statistics) and LPIPS in taming's names,
    as `vqgan_flax.convert` writes them, so a later fine-tuning run can start from the export.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)  # loss tensors first: meta.json, written last, completes it
    losses.write_loss_tensors(directory, losses.to_taming_tensors(discriminator, lpips))
    return vq_checkpoint.write(directory, model.config, vq_checkpoint.params_of(model), extra_meta)


def _restore_target(module: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract state, Orbax target on the first local device) of an abstract module."""
    graphdef, state = nnx.split(module)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return graphdef, state, parallel.abstract_arrays(nnx.to_pure_dict(state), device)


def export_workdir(workdir: str | Path, directory: str | Path, step: int | None = None) -> str | None:
    """Export training checkpoint `step` (default: the latest) of `workdir` with `export`.

    In a multi-process run every process must call it: opening and reading the checkpoint waits at Orbax barriers
    for all processes. Process 0 alone writes the export and returns its fingerprint; the others return None.
    """
    from llmcxr_jax.checkpoint import workdir_step

    with workdir_step(workdir, step) as (ckpts, step):
        meta = ckpts.read_meta(step)
        if meta.get("task") != "vqgan":
            raise ValueError(f"{workdir} step {step}: not a VQ-GAN training run (task {meta.get('task')!r})")
        vq_cfg = VQGANConfig.from_dict(meta["vqgan_config"], source=f"{workdir} step {step} meta")
        loss_cfg = losses.LossConfig(**meta["loss_config"])
        parts = {"model": lambda: VQGAN(vq_cfg, rngs=nnx.Rngs(0)),
                 "discriminator": lambda: loss_cfg.discriminator(nnx.Rngs(0))}
        if loss_cfg.perceptual_weight > 0:
            parts["lpips"] = lambda: LPIPS(rngs=nnx.Rngs(0))
        targets = {name: _restore_target(nnx.eval_shape(make)) for name, make in parts.items()}
        restored = ckpts.restore_subtree(step, {name: t[2] for name, t in targets.items()})
    if jax.process_index() != 0:
        return None
    modules = {}
    for name, (graphdef, state, _) in targets.items():
        nnx.replace_by_pure_dict(state, restored[name])
        modules[name] = nnx.merge(graphdef, state)
    return export(modules["model"], modules["discriminator"], modules.get("lpips"), directory,
                  {"source": f"llmcxr_jax.train_vqgan workdir {Path(workdir).name}", "step": int(step)})
