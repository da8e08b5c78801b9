"""taming-transformers==0.0.1's legacy VectorQuantizer (SPEC §11); its loss (with taming's beta placement) is
`vqgan_flax.losses.codebook_loss` of the two terms returned here."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class QuantizerOutput(NamedTuple):
    """What a training step needs from the quantizer: the two loss terms, which `losses.codebook_loss` weighs."""

    z_q: jax.Array  # straight-through latents, (B, h, w, D) fp32
    indices: jax.Array  # int32 (B, h, w), raster order
    commitment_loss: jax.Array  # mean((sg(z_q) - z)^2): pulls the encoder to the codebook
    codebook_loss: jax.Array  # mean((z_q - sg(z))^2): pulls the codebook to the encoder


class VectorQuantizer(nnx.Module):
    """Nearest-codebook-entry lookup; the codebook lives at `quantize.embedding` like taming's key."""

    def __init__(self, n_embed: int, embed_dim: int, *, rngs: nnx.Rngs):
        limit = 1.0 / n_embed  # taming's init: U(-1/n, 1/n)
        self.embedding = nnx.Param(jax.random.uniform(rngs.params(), (n_embed, embed_dim), jnp.float32, -limit, limit))

    def indices(self, z: jax.Array) -> jax.Array:
        """argmin over ‖z‖² + ‖e‖² − 2 z·e in fp32 (first index on ties), as taming computes it."""
        codebook = self.embedding[...].astype(jnp.float32)
        flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
        cross = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
        distances = jnp.sum(flat**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1) - 2 * cross
        return jnp.argmin(distances, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook rows for `indices` (B, h, w) -> (B, h, w, D). Out-of-range indices are clamped, not checked."""
        return jnp.take(self.embedding[...], indices, axis=0, mode="clip")

    def __call__(self, z: jax.Array) -> QuantizerOutput:
        z = z.astype(jnp.float32)
        indices = self.indices(z)
        z_q = self.lookup(indices)
        commitment = jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
        codebook = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
        straight_through = z + jax.lax.stop_gradient(z_q - z)
        return QuantizerOutput(straight_through, indices, commitment, codebook)
