"""taming's VQ-GAN training loss (VQLPIPSWithDiscriminator, SPEC §13): the formulas, both gradient steps, weights.

Generator step (taming's optimizer_idx 0):
    nll  = mean|x − x̂| + perceptual_weight · mean LPIPS(x, x̂)
    g    = −mean D(x̂)                   (D in train mode: batch statistics, running statistics updated)
    λ    = clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) · disc_weight,  W = decoder.conv_out.kernel, detached
    loss = nll + λ · f · g + codebook_weight · q_loss,   f = disc_factor, 0 while step < disc_start
Discriminator step (optimizer_idx 1, on a fresh forward of the updated generator):
    loss = f · ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))),  D(x) and D(x̂) as two train-mode passes

`λ` needs the two gradients only at the last layer. They come from the same `jax.vjp` as the full gradient; under
`jit` XLA drops the backward pass below conv_out for them, so a step costs one generator backward, as in taming.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from vqgan_flax import discriminator as disc_lib
from vqgan_flax import lpips as lpips_lib
from vqgan_flax.atomic import write_atomic
from vqgan_flax.checkpoint import CheckpointError, check_params
from vqgan_flax.convert import LOSS_FILE
from vqgan_flax.discriminator import PatchDiscriminator
from vqgan_flax.lpips import LPIPS
from vqgan_flax.model import VQGAN
from vqgan_flax.quantizer import QuantizerOutput
from vqgan_flax.torch_checkpoint import read_state_dict

PERCEPTUAL_PREFIX = "loss.perceptual_loss."
DISCRIMINATOR_PREFIX = "loss.discriminator."


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """taming's `lossconfig.params` (custom_vqgan.yaml values) plus the quantizer's beta placement."""

    disc_start: int = 10000
    disc_weight: float = 0.8
    disc_factor: float = 1.0
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0
    # taming's LPIPS heads hold Dropout(0.5); Lightning's model.train() switches it on during training.
    perceptual_dropout: float = 0.5
    disc_num_layers: int = 3
    disc_ndf: int = 64
    disc_in_channels: int = 3
    beta: float = 0.25
    legacy_beta: bool = True  # taming 0.0.1: beta scales the codebook term (SPEC "Legacy beta quirk")

    def discriminator(self, rngs: nnx.Rngs) -> PatchDiscriminator:
        """The PatchGAN these settings describe."""
        return PatchDiscriminator(self.disc_in_channels, self.disc_ndf, self.disc_num_layers, rngs=rngs)


# ---------------------------------------------------------------------------------------------------- formulas


def codebook_loss(q: QuantizerOutput, beta: float, legacy: bool) -> jax.Array:
    """Legacy: commitment + β·codebook (taming 0.0.1, LLM-CXR); else β·commitment + codebook (VQ-VAE paper)."""
    if legacy:
        return q.commitment_loss + beta * q.codebook_loss
    return beta * q.commitment_loss + q.codebook_loss


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """taming's calculate_adaptive_weight from the two last-layer gradients; no gradient flows through it."""
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4)) * disc_weight


def disc_factor(step: jax.Array, cfg: LossConfig) -> jax.Array:
    """taming's adopt_weight: `disc_factor` from global step `disc_start` on (0-based, counted in batches)."""
    return jnp.where(step >= cfg.disc_start, cfg.disc_factor, 0.0).astype(jnp.float32)


def psnr(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
    """Mean over the batch of per-image PSNR in dB, both mapped from [-1, 1] to [0, 1] (reconstructions clipped)."""
    a = (images + 1) / 2
    b = (jnp.clip(reconstructions, -1, 1) + 1) / 2
    mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, images.ndim)))
    return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))


def codebook_usage(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    """(perplexity as taming's quantizer logs it, number of distinct codes) of a batch of codes."""
    counts = jnp.bincount(indices.ravel(), length=n_embed).astype(jnp.float32)
    p = counts / jnp.sum(counts)
    return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10))), jnp.sum(counts > 0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------- steps


def generator_grads(model: VQGAN, discriminator: PatchDiscriminator, lpips: LPIPS | None, images: jax.Array,
                    factor: jax.Array, cfg: LossConfig, rng: jax.Array | None = None,
                    ) -> tuple[nnx.State, dict[str, jax.Array], jax.Array]:
    """(gradients w.r.t. the model's params, metrics, codes) of the autoencoder loss.

    Updates the discriminator's running statistics in place, as taming's train-mode D(x̂) does. `rng` feeds the
    LPIPS head dropout (needed when `cfg.perceptual_dropout` > 0 and the perceptual term is on). With
    `cfg.disc_factor == 0` the GAN term is zero at every step: D is not run (taming runs it and logs g_loss and
    λ anyway; here they read 0), which leaves the gradients as they are and saves about a third of the step.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(p):
        reconstructions, q = nnx.merge(graphdef, p, rest)(images)
        return (reconstructions, codebook_loss(q, cfg.beta, cfg.legacy_beta)), q.indices

    (reconstructions, q_loss), backward, indices = jax.vjp(forward, params, has_aux=True)
    use_lpips = lpips is not None and cfg.perceptual_weight > 0

    def nll_fn(x_hat):
        l1 = jnp.mean(jnp.abs(images - x_hat))
        p = jnp.mean(lpips(images, x_hat, dropout_rate=cfg.perceptual_dropout, rng=rng)) if use_lpips else 0.0
        return l1 + cfg.perceptual_weight * p, (l1, p)

    (nll, (l1, p_loss)), nll_cot = jax.value_and_grad(nll_fn, has_aux=True)(reconstructions)
    metrics = {"nll_loss": nll, "l1_loss": l1, "p_loss": jnp.asarray(p_loss, jnp.float32), "quant_loss": q_loss,
               "disc_factor": factor, "psnr": psnr(images, reconstructions)}
    if cfg.disc_factor == 0:
        (grads,) = backward((nll_cot, jnp.full_like(q_loss, cfg.codebook_weight)))
        zero = jnp.zeros((), jnp.float32)
        return grads, {**metrics, "loss": nll + cfg.codebook_weight * q_loss, "g_loss": zero, "d_weight": zero}, indices
    d_graph, d_params, d_stats = nnx.split(discriminator, nnx.Param, nnx.BatchStat)

    def g_fn(x_hat):
        d = nnx.merge(d_graph, d_params, d_stats, copy=True)
        return -jnp.mean(d(x_hat, train=True)), nnx.state(d, nnx.BatchStat)

    (g_loss, new_stats), g_cot = jax.value_and_grad(g_fn, has_aux=True)(reconstructions)
    nnx.update(discriminator, new_stats)

    def last_layer(cotangent):
        return backward((cotangent, jnp.zeros_like(q_loss)))[0]["decoder"]["conv_out"]["kernel"][...]

    d_weight = adaptive_weight(last_layer(nll_cot), last_layer(g_cot), cfg.disc_weight)
    (grads,) = backward((nll_cot + d_weight * factor * g_cot, jnp.full_like(q_loss, cfg.codebook_weight)))
    loss = nll + d_weight * factor * g_loss + cfg.codebook_weight * q_loss
    return grads, {**metrics, "loss": loss, "g_loss": g_loss, "d_weight": d_weight}, indices


def discriminator_grads(discriminator: PatchDiscriminator, images: jax.Array, reconstructions: jax.Array,
                        factor: jax.Array) -> tuple[nnx.State, dict[str, jax.Array]]:
    """(gradients w.r.t. D's params, metrics) of the hinge loss; updates D's running statistics (real, then fake)."""
    graphdef, params, stats = nnx.split(discriminator, nnx.Param, nnx.BatchStat)
    fake_input = jax.lax.stop_gradient(reconstructions)

    def loss_fn(p):
        d = nnx.merge(graphdef, p, stats, copy=True)
        real, fake = d(images, train=True), d(fake_input, train=True)
        return factor * hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake), nnx.state(d, nnx.BatchStat))

    (loss, (real, fake, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    nnx.update(discriminator, new_stats)
    return grads, {"disc_loss": loss, "logits_real": real, "logits_fake": fake}


# ---------------------------------------------------------------------------------------------------- weights


class LossWeightsError(ValueError):
    """LPIPS or discriminator weights are missing, or do not fit."""


def _name(path: tuple) -> str:
    return ".".join(map(str, path))


def flat_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    """Dotted name -> host copy of every variable (params and statistics) of `module`."""
    return {_name(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(module))}


def shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Dotted name -> shape of every variable of `module` (concrete or from `nnx.eval_shape`)."""
    return {_name(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(module))}


def fill(abstract: nnx.Module, arrays: Mapping[str, np.ndarray], source: str) -> nnx.Module:
    """A concrete copy of `abstract` (from `nnx.eval_shape`) holding exactly `arrays`, checked by name and shape."""
    try:
        check_params(arrays, shapes(abstract), source)
    except ValueError as err:
        raise LossWeightsError(str(err)) from err
    graphdef, state = nnx.split(abstract)
    pairs = [(p, v.replace(jnp.asarray(arrays[_name(p)], jnp.float32))) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(pairs))


def _conv_to_ours(name: str, value: np.ndarray) -> np.ndarray:
    """torch OIHW conv weights -> HWIO kernels; everything else unchanged."""
    return np.asarray(value).transpose(2, 3, 1, 0) if name.endswith(".kernel") else np.asarray(value)


def _conv_to_torch(name: str, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1) if name.endswith(".kernel") else value)


def _pick(tensors: Mapping[str, np.ndarray], keys: Mapping[str, str], source: str, fix: str) -> dict[str, np.ndarray]:
    """Our name -> converted tensor for each of `keys` (our name -> source key); every missing key is named."""
    missing = sorted(key for key in keys.values() if key not in tensors)
    if missing:
        raise LossWeightsError(f"{source}: missing {len(missing)} tensors, e.g. {missing[:4]}. {fix}")
    return {name: _conv_to_ours(name, tensors[key]) for name, key in keys.items()}


def _abstract_lpips() -> LPIPS:
    return nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))


def lpips_from_tensors(tensors: Mapping[str, np.ndarray], source: str) -> LPIPS:
    """LPIPS from taming's `loss.perceptual_loss.*` tensors (a converted checkpoint's loss.safetensors)."""
    abstract = _abstract_lpips()
    keys = {name: PERCEPTUAL_PREFIX + lpips_lib.taming_key(name) for name in shapes(abstract)}
    arrays = _pick(tensors, keys, source, "Convert a taming checkpoint whose loss includes LPIPS, or give "
                   "torchvision VGG16 weights and the lpips heads file instead.")
    return fill(abstract, arrays, source)


def lpips_from_torch_files(vgg16_path: str | Path, heads_path: str | Path) -> LPIPS:
    """LPIPS from a torchvision VGG16 state dict (`features.N.weight`) and the lpips package's `vgg.pth` heads.

    Both are read with torch.load(weights_only=True) (or a restricted reader); nothing is downloaded.
    """
    vgg, heads = read_state_dict(vgg16_path), read_state_dict(heads_path)
    abstract = _abstract_lpips()
    names = list(shapes(abstract))
    convs = _pick(vgg, {n: lpips_lib.torchvision_key(n) for n in names if n.startswith("convs.")}, str(vgg16_path),
                  "Expected torchvision's vgg16() state dict (vgg16-397923af.pth).")
    lins = _pick(heads, {n: lpips_lib.taming_key(n) for n in names if n.startswith("lins.")}, str(heads_path),
                 "Expected the lpips package's weights/v0.1/vgg.pth (keys lin0.model.1.weight ...).")
    return fill(abstract, {**convs, **lins}, f"{vgg16_path} + {heads_path}")


def read_loss_tensors(vqgan_dir: str | Path) -> dict[str, np.ndarray]:
    """The `loss.*` tensors a converted (or exported) VQ-GAN directory keeps; {} when it has none."""
    path = Path(vqgan_dir) / LOSS_FILE
    try:
        return safetensors.numpy.load_file(path) if path.is_file() else {}
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read the loss tensors: {err}") from err


def load_lpips(*, vqgan_dir: str | Path = "", vgg16_path: str | Path = "", heads_path: str | Path = "") -> LPIPS:
    """LPIPS from torchvision + lpips files when both are given, else from `vqgan_dir`/loss.safetensors."""
    if vgg16_path or heads_path:
        if not (vgg16_path and heads_path):
            raise LossWeightsError("LPIPS from torch files needs both a VGG16 state dict and the lpips heads file")
        return lpips_from_torch_files(vgg16_path, heads_path)
    tensors = read_loss_tensors(vqgan_dir) if vqgan_dir else {}
    if not any(k.startswith(PERCEPTUAL_PREFIX) for k in tensors):
        where = f"{Path(vqgan_dir) / LOSS_FILE} has no {PERCEPTUAL_PREFIX}* tensors" if vqgan_dir else "no source given"
        raise LossWeightsError(
            f"LPIPS weights are needed for perceptual_weight > 0 and none were found ({where}); nothing is downloaded. "
            "Give a converted taming checkpoint whose loss.safetensors holds loss.perceptual_loss.*, or a torchvision "
            "VGG16 state dict plus the lpips package's vgg.pth, or set perceptual_weight=0 to train without LPIPS.")
    return lpips_from_tensors(tensors, str(Path(vqgan_dir) / LOSS_FILE))


def discriminator_from_tensors(tensors: Mapping[str, np.ndarray], cfg: LossConfig, source: str) -> PatchDiscriminator:
    """The PatchGAN (weights and BatchNorm running statistics) from taming's `loss.discriminator.main.*` tensors."""
    abstract = nnx.eval_shape(lambda: cfg.discriminator(nnx.Rngs(0)))
    keys = {n: DISCRIMINATOR_PREFIX + disc_lib.taming_key(n) for n in shapes(abstract)}
    arrays = _pick(tensors, keys, source, f"Expected taming's NLayerDiscriminator with n_layers="
                   f"{cfg.disc_num_layers}, ndf={cfg.disc_ndf} (loss.disc_num_layers / loss.disc_ndf).")
    return fill(abstract, arrays, source)


def to_taming_tensors(discriminator: PatchDiscriminator, lpips: LPIPS | None) -> dict[str, np.ndarray]:
    """`loss.*` tensors in taming's names and layouts (the inverse of the two readers above)."""
    out = {DISCRIMINATOR_PREFIX + disc_lib.taming_key(n): _conv_to_torch(n, v)
           for n, v in flat_arrays(discriminator).items()}
    if lpips is not None:
        out.update({PERCEPTUAL_PREFIX + lpips_lib.taming_key(n): _conv_to_torch(n, v)
                    for n, v in flat_arrays(lpips).items()})
    return out


def write_loss_tensors(vqgan_dir: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    write_atomic(Path(vqgan_dir) / LOSS_FILE,
                 safetensors.numpy.save({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}))
