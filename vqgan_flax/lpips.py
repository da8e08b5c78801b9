"""LPIPS (VGG16 variant) as taming-transformers computes it (taming/modules/losses/lpips.py), in NHWC.

VGG16's conv stack up to relu5_3, five learned 1×1 heads without bias. The weights are frozen and come from files
(see `vqgan_flax.losses.load_lpips`); this module only knows the layout and the arithmetic. Parameter names map
to both checkpoint formats through `taming_key` and `torchvision_key`; the lpips package's `vgg.pth` names
its heads as taming does (`lin0.model.1.weight`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Output channels of VGG16's convs, grouped by the slices whose last ReLU LPIPS reads (relu1_2 ... relu5_3).
STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _feature_indices() -> tuple[tuple[int, int], ...]:
    """(slice number 1..5, index in torchvision's `vgg16().features`) of each conv, in order.

    torchvision: conv, ReLU per conv; a MaxPool2d opens stages 2..5. taming's slices split `features` right
    after each stage's last ReLU, so a pool belongs to the slice that follows it.
    """
    out, index = [], 0
    for stage, convs in enumerate(STAGES):
        index += stage > 0  # the pool
        for _ in convs:
            out.append((stage + 1, index))
            index += 2  # conv, ReLU
    return tuple(out)


FEATURE_INDICES = _feature_indices()  # 13 convs at features.0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28


def taming_key(name: str) -> str:
    """Our parameter name -> its key under taming's `loss.perceptual_loss.` prefix."""
    group, number, leaf = name.split(".")
    if group == "lins":
        return f"lin{number}.model.1.weight"
    slice_number, index = FEATURE_INDICES[int(number)]
    return f"net.slice{slice_number}.{index}.{'weight' if leaf == 'kernel' else 'bias'}"


def torchvision_key(name: str) -> str:
    """Our conv parameter name -> its key in a torchvision `vgg16()` state dict."""
    _, number, leaf = name.split(".")
    return f"features.{FEATURE_INDICES[int(number)][1]}.{'weight' if leaf == 'kernel' else 'bias'}"


def _safe_norm(x: jax.Array) -> jax.Array:
    """‖x‖ over channels; its gradient is 0 (not NaN, as sqrt'(0)·0 would give) where all channels are 0."""
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _max_pool(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
    """Learned perceptual distance between images in [-1, 1] (B, H, W, 3) -> (B,), as taming's `LPIPS`."""

    def __init__(self, *, rngs: nnx.Rngs):
        convs, cin = [], 3
        for stage in STAGES:
            for cout in stage:
                convs.append(nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs))
                cin = cout
        self.convs = nnx.List(convs)
        self.lins = nnx.List([nnx.Conv(stage[-1], 1, (1, 1), use_bias=False, rngs=rngs) for stage in STAGES])

    def features(self, x: jax.Array) -> list[jax.Array]:
        """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the scaled input."""
        h = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        out, convs = [], iter(self.convs)
        for stage, widths in enumerate(STAGES):
            if stage:
                h = _max_pool(h)
            for _ in widths:
                h = jax.nn.relu(next(convs)(h))
            out.append(h)
        return out

    def __call__(self, x: jax.Array, y: jax.Array, *, dropout_rate: float = 0.0,
                 rng: jax.Array | None = None) -> jax.Array:
        """Σ_layers spatial mean of head(‖φ(x)‖-normalised − ‖φ(y)‖-normalised)².

        `dropout_rate` > 0 drops elements of the squared difference before each head (taming's heads hold
        `Dropout(0.5)`, active whenever Lightning has the model in train mode); it needs `rng`.
        """
        if dropout_rate > 0 and rng is None:
            raise ValueError("LPIPS dropout_rate > 0 needs an rng key")
        both = self.features(jnp.concatenate([x, y]))  # one pass over 2B images
        keys = jax.random.split(rng, len(STAGES)) if dropout_rate > 0 else [None] * len(STAGES)
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for feats, lin, key in zip(both, self.lins, keys):
            fx, fy = jnp.split(feats, 2)
            diff = (fx / (_safe_norm(fx) + 1e-10) - fy / (_safe_norm(fy) + 1e-10)) ** 2
            if key is not None:
                keep = jax.random.bernoulli(key, 1.0 - dropout_rate, diff.shape)
                diff = jnp.where(keep, diff / (1.0 - dropout_rate), 0.0)
            total = total + jnp.mean(lin(diff), axis=(1, 2, 3))
        return total
