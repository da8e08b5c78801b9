"""taming's PatchGAN discriminator (NLayerDiscriminator, `loss.discriminator.main.*`) with torch BatchNorm semantics.

Layout for n_layers=3, ndf=64 (taming indices in brackets): conv4×4/s2 3→64 with bias [0], LeakyReLU(0.2);
conv4×4/s2 64→128 [2], BN [3], LReLU; conv4×4/s2 128→256 [5], BN [6], LReLU; conv4×4/s1 256→512 [8], BN [9],
LReLU; conv4×4/s1 512→1 with bias [11]. Padding 1 everywhere. NHWC here.

Batch norm normalises with the biased variance of the batch and keeps running statistics updated with momentum
0.1 and the unbiased variance, as torch does. The batch statistics are a plain mean over (B, H, W): under `jit` with
a batch sharded over devices that mean is over the global batch, so every device normalises alike (what torch's
SyncBatchNorm does; plain DDP BatchNorm would use per-GPU statistics).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MOMENTUM = 0.1
EPSILON = 1e-5
SLOPE = 0.2


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis; running statistics are `nnx.BatchStat`."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if train:
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
            count = x.size // x.shape[-1]
            self.mean[...] = (1 - MOMENTUM) * self.mean[...] + MOMENTUM * jax.lax.stop_gradient(mean)
            unbiased = jax.lax.stop_gradient(var) * (count / max(count - 1, 1))
            self.var[...] = (1 - MOMENTUM) * self.var[...] + MOMENTUM * unbiased
        else:
            mean, var = self.mean[...], self.var[...]
        return (x - mean) * jax.lax.rsqrt(var + EPSILON) * self.scale[...] + self.bias[...]


def layer_widths(in_channels: int, ndf: int, n_layers: int) -> list[tuple[int, int, int]]:
    """(cin, cout, stride) of every conv, first to last."""
    widths, mult = [(in_channels, ndf, 2)], 1
    for n in range(1, n_layers + 1):
        previous, mult = mult, min(2**n, 8)
        widths.append((ndf * previous, ndf * mult, 2 if n < n_layers else 1))
    widths.append((ndf * mult, 1, 1))
    return widths


class PatchDiscriminator(nnx.Module):
    """Logits per overlapping patch: (B, H, W, C) -> (B, H', W', 1).

    The constructor's init (conv kernels N(0, 0.02), zero biases, BN weight 1) gives shapes and a usable start;
    `init_params` is taming's exact `weights_init`, drawn on the host, which training uses.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, *, rngs: nnx.Rngs):
        widths = layer_widths(in_channels, ndf, n_layers)
        last = len(widths) - 1
        self.convs = nnx.List([
            nnx.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=i in (0, last),
                     kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
            for i, (cin, cout, stride) in enumerate(widths)])
        self.norms = nnx.List([BatchNorm(cout) for _, cout, _ in widths[1:-1]])

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """`train`: normalise with (and update the running statistics from) this batch; else use the running ones."""
        h = jax.nn.leaky_relu(self.convs[0](x), SLOPE)
        for conv, norm in zip(self.convs[1:-1], self.norms):
            h = jax.nn.leaky_relu(norm(conv(h), train), SLOPE)
        return self.convs[-1](h)


def taming_index(name: str) -> int:
    """Position in taming's `main` Sequential of our `convs.i` / `norms.i` (activations take positions too)."""
    group, number = name.split(".")[:2]
    i = int(number)
    if group == "norms":  # right after conv i + 1
        return 3 + 3 * i
    if i == 0:
        return 0
    return 2 + 3 * (i - 1)  # conv, BN, LReLU per middle layer; the last conv follows the last LReLU


_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def taming_key(name: str) -> str:
    """Our variable name (`convs.1.kernel`, `norms.0.mean`) -> its key under `loss.discriminator.`."""
    return f"main.{taming_index(name)}.{_LEAVES[name.rsplit('.', 1)[1]]}"


def init_params(in_channels: int, ndf: int, n_layers: int, seed: int) -> dict[str, np.ndarray]:
    """taming's `weights_init`, drawn on the host: conv weights N(0, 0.02), BN weights N(1, 0.02), BN biases 0.

    Conv biases (first and last conv) keep torch's default U(±1/√fan_in); running statistics start at 0 and 1.
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for i, (cin, cout, _) in enumerate(layer_widths(in_channels, ndf, n_layers)):
        params[f"convs.{i}.kernel"] = rng.normal(0.0, 0.02, (4, 4, cin, cout))
        if i in (0, n_layers + 1):
            bound = 1 / np.sqrt(16 * cin)
            params[f"convs.{i}.bias"] = rng.uniform(-bound, bound, (cout,))
        if 0 < i <= n_layers:
            j = i - 1
            params[f"norms.{j}.scale"] = rng.normal(1.0, 0.02, (cout,))
            params[f"norms.{j}.bias"] = np.zeros((cout,))
            params[f"norms.{j}.mean"] = np.zeros((cout,))
            params[f"norms.{j}.var"] = np.ones((cout,))
    return {k: v.astype(np.float32) for k, v in params.items()}
