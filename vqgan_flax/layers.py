"""Building blocks of taming's diffusionmodules/model.py, in NHWC with taming's exact semantics.

Attribute names equal taming's submodule names so that parameter paths mirror its state-dict keys.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


def group_norm(channels: int, dtype: Dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """taming's Normalize: GroupNorm(32 groups, eps 1e-6, affine); two-pass variance as in torch."""
    return nnx.GroupNorm(channels, num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=dtype, rngs=rngs)


# torch's default Conv2d kernel init, kaiming_uniform(a=√5) = U(±1/√fan_in) (biases start at zero here)
_TORCH_CONV_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def conv(cin: int, cout: int, kernel: int, dtype: Dtype, rngs: nnx.Rngs, *, stride: int = 1,
         valid: bool = False) -> nnx.Conv:
    """A torch-style Conv2d: explicit symmetric padding of kernel//2, or none when `valid`."""
    pad = "VALID" if valid else ((kernel // 2, kernel // 2),) * 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=pad, dtype=dtype,
                    kernel_init=_TORCH_CONV_INIT, rngs=rngs)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nnx.Module):
    """norm1 → swish → conv1 → norm2 → swish → dropout → conv2, plus the (1×1-projected) input."""

    def __init__(self, cin: int, cout: int, dropout: float, dtype: Dtype, rngs: nnx.Rngs):
        self.norm1 = group_norm(cin, dtype, rngs)
        self.conv1 = conv(cin, cout, 3, dtype, rngs)
        self.norm2 = group_norm(cout, dtype, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = conv(cout, cout, 3, dtype, rngs)
        self.nin_shortcut = conv(cin, cout, 1, dtype, rngs) if cin != cout else None

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h)), rngs=rngs))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all H·W positions, 1×1 convs for q, k, v and the output."""

    def __init__(self, channels: int, dtype: Dtype, rngs: nnx.Rngs):
        self.norm = group_norm(channels, dtype, rngs)
        self.q = conv(channels, channels, 1, dtype, rngs)
        self.k = conv(channels, channels, 1, dtype, rngs)
        self.v = conv(channels, channels, 1, dtype, rngs)
        self.proj_out = conv(channels, channels, 1, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, h * w, 1, c) for proj in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k, v)  # scale C^-0.5, softmax over keys
        return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
    """Zero-pad right and bottom by one pixel, then a 3×3 stride-2 conv without padding (taming's asymmetric pad)."""

    def __init__(self, channels: int, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype, rngs, stride=2, valid=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour ×2 (each pixel repeated 2×2), then a 3×3 conv."""

    def __init__(self, channels: int, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
