"""The taming VQModel generator (Encoder, quant_conv, VectorQuantizer, post_quant_conv, Decoder) in Flax NNX.

Parameter paths mirror taming's state-dict keys (`encoder.down.0.block.1.conv1.kernel` for
`encoder.down.0.block.1.conv1.weight`), which keeps the converter's table to a handful of rules.
Layout is NHWC; parameters are fp32, the compute dtype is a constructor argument.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from vqgan_flax.config import VQGANConfig
from vqgan_flax.layers import AttnBlock, Downsample, Dtype, ResnetBlock, Upsample, conv, group_norm, swish
from vqgan_flax.quantizer import QuantizerOutput, VectorQuantizer


class Level(nnx.Module):
    """One resolution: `num_blocks` ResnetBlocks, each followed by an AttnBlock at attention resolutions."""

    def __init__(self, cin: int, cout: int, num_blocks: int, with_attn: bool, config: VQGANConfig, dtype: Dtype,
                 rngs: nnx.Rngs):
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, config.dropout, dtype, rngs)
                               for i in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(cout, dtype, rngs) for _ in range(num_blocks)] if with_attn else [])

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        for i, block in enumerate(self.block):
            x = block(x, rngs)
            if self.attn:
                x = self.attn[i](x)
        return x


class EncoderLevel(Level):
    def __init__(self, cin: int, cout: int, with_attn: bool, downsample: bool, config: VQGANConfig, dtype: Dtype,
                 rngs: nnx.Rngs):
        super().__init__(cin, cout, config.num_res_blocks, with_attn, config, dtype, rngs)
        self.downsample = Downsample(cout, dtype, rngs) if downsample else None

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = super().__call__(x, rngs)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(Level):
    def __init__(self, cin: int, cout: int, with_attn: bool, upsample: bool, config: VQGANConfig, dtype: Dtype,
                 rngs: nnx.Rngs):
        super().__init__(cin, cout, config.num_res_blocks + 1, with_attn, config, dtype, rngs)
        self.upsample = Upsample(cout, dtype, rngs) if upsample else None

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = super().__call__(x, rngs)
        return x if self.upsample is None else self.upsample(x)


class Mid(nnx.Module):
    def __init__(self, channels: int, config: VQGANConfig, dtype: Dtype, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, config.dropout, dtype, rngs)
        self.attn_1 = AttnBlock(channels, dtype, rngs)
        self.block_2 = ResnetBlock(channels, channels, config.dropout, dtype, rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x, rngs)), rngs)


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) -> latents (B, H/f, W/f, z_channels)."""

    def __init__(self, config: VQGANConfig, dtype: Dtype, rngs: nnx.Rngs):
        self.conv_in = conv(config.in_channels, config.ch, 3, dtype, rngs)
        levels, cin, res = [], config.ch, config.resolution
        for i, mult in enumerate(config.ch_mult):
            last = i == len(config.ch_mult) - 1
            cout = config.ch * mult
            levels.append(EncoderLevel(cin, cout, res in config.attn_resolutions, not last, config, dtype, rngs))
            cin, res = cout, res if last else res // 2
        self.down = nnx.List(levels)
        self.mid = Mid(cin, config, dtype, rngs)
        self.norm_out = group_norm(cin, dtype, rngs)
        self.conv_out = conv(cin, config.z_channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, rngs)
        return self.conv_out(swish(self.norm_out(self.mid(h, rngs))))


class Decoder(nnx.Module):
    """Latents (B, h, w, z_channels) -> image (B, h·f, w·f, out_ch); no output activation (taming has none)."""

    def __init__(self, config: VQGANConfig, dtype: Dtype, rngs: nnx.Rngs):
        cin = config.ch * config.ch_mult[-1]
        res = config.grid[0]
        self.conv_in = conv(config.z_channels, cin, 3, dtype, rngs)
        self.mid = Mid(cin, config, dtype, rngs)
        levels: dict[int, DecoderLevel] = {}
        for i in reversed(range(len(config.ch_mult))):
            cout = config.ch * config.ch_mult[i]
            levels[i] = DecoderLevel(cin, cout, res in config.attn_resolutions, i != 0, config, dtype, rngs)
            cin, res = cout, res * 2 if i != 0 else res
        self.up = nnx.List([levels[i] for i in range(len(config.ch_mult))])  # taming's order: up.0 is the finest
        self.norm_out = group_norm(cin, dtype, rngs)
        self.conv_out = conv(cin, config.out_ch, 3, dtype, rngs)

    def __call__(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.mid(self.conv_in(z), rngs)
        for level in reversed(self.up):
            h = level(h, rngs)
        return self.conv_out(swish(self.norm_out(h)))


class VQGAN(nnx.Module):
    """taming's VQModel generator. `encode` images in [-1, 1] to int32 codes, `decode` codes back to images.

    `rngs` on the calls only feeds dropout (rate `config.dropout`, 0 for LLM-CXR); inference never needs it.
    """

    def __init__(self, config: VQGANConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, dtype, rngs)
        self.quant_conv = conv(config.z_channels, config.embed_dim, 1, dtype, rngs)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, rngs=rngs)
        self.post_quant_conv = conv(config.embed_dim, config.z_channels, 1, dtype, rngs)
        self.decoder = Decoder(config, dtype, rngs)

    def encode_latents(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Pre-quantisation latents z = quant_conv(encoder(x)), (B, h, w, embed_dim) in fp32."""
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise ValueError(f"images must be (B, H, W, {self.config.in_channels}) NHWC, got {images.shape}")
        return self.quant_conv(self.encoder(images, rngs)).astype(jnp.float32)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, C) in [-1, 1] -> int32 codes (B, H/f, W/f) in raster order."""
        with self._inference_precision():
            return self.quantize.indices(self.encode_latents(images))

    def decode_latents(self, z_q: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Quantised latents (B, h, w, embed_dim) -> images (B, H, W, out_ch), fp32, not clipped."""
        return self.decoder(self.post_quant_conv(z_q), rngs).astype(jnp.float32)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes (B, h, w) -> images (B, H, W, out_ch). Codes outside [0, n_embed) are clamped; validate first."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w), got {codes.shape}")
        with self._inference_precision():
            return self.decode_latents(self.quantize.lookup(codes))

    def _inference_precision(self) -> contextlib.AbstractContextManager:
        """Full fp32 convolutions and matmuls for an fp32 model's encode and decode. XLA:GPU's default precision
        runs fp32 as TF32 on Ampere and newer GPUs, which the original (CUDA 10.2) never did and which flips
        near-tie codebook choices (SPEC §12, §15.3 expect the original's codes). Training keeps the default; bf16
        models are not affected."""
        full = jnp.dtype(self.dtype) == jnp.float32
        return jax.default_matmul_precision("highest") if full else contextlib.nullcontext()

    def __call__(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, QuantizerOutput]:
        """Training forward pass: reconstruction (through the straight-through estimator) and quantizer terms."""
        quantized = self.quantize(self.encode_latents(images, rngs))
        return self.decode_latents(quantized.z_q, rngs), quantized

