"""GPT-NeoX in Flax NNX with the exact semantics of Hugging Face's PyTorch GPT-NeoX (see SPEC.md §1).

Layers are stacked along a leading `layers` axis and applied with `jax.lax.scan`, so compile time stays flat for
32 layers (small models may train with an unrolled loop over the stack, `scan_layers=False`), and this one
parameter layout serves conversion, training, stage-2 seeding and sampling.
Every parameter carries `logical_axes` metadata; `llmcxr_jax.parallel` maps those names to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax import parallel
from vqgan_flax.json_object import positive_int, read_json_object

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


FUSED_ATTENTION_NAME = "fused_attention"  # checkpoint_name of values the remat policies keep as cuDNN's outputs


def _keeping_fused_attention(policy: Callable[..., bool]) -> Callable[..., bool]:
    """`policy`, plus the outputs of cuDNN's fused attention forward (its output and softmax statistics): the
    kernel is a custom call, not a dot, so a dot policy alone runs it again in the backward pass (twice per layer
    per step). Costs (batch, length, embed) in bf16 per layer, ~2.7 GiB at 2.8B, batch 16 × 1024. Values named
    FUSED_ATTENTION_NAME are kept too (`aot.cudnn_shaped_attention`'s stand-in for the kernel)."""
    def saveable(prim: Any, *args: Any, **params: Any) -> bool:
        return (prim.name.startswith("dot_product_attention_fwd") or params.get("name") == FUSED_ATTENTION_NAME
                or policy(prim, *args, **params))
    return saveable


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _keeping_fused_attention(jax.checkpoint_policies.dots_saveable),
    "dots_no_batch": _keeping_fused_attention(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def resolve_dtype(name: str) -> jnp.dtype:
    """Map a config dtype string to a jnp dtype, with an error that lists the accepted names."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def table_rows(vocab_size: int, vocab_multiple: int) -> int:
    """Rows of the embedding tables: `vocab_size` rounded up to a multiple of `vocab_multiple`."""
    return -(-vocab_size // vocab_multiple) * vocab_multiple


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    """HF GPT-NeoX fields (same names) plus runtime fields that never go into an HF `config.json`."""

    vocab_size: int = 50280
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 10240
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Runtime fields.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # see _attention
    remat_policy: str = "none"
    # The embedding tables hold `table_rows` = vocab_size rounded up to a multiple of this, the rows past
    # vocab_size zero and their logits excluded, so that the tables split evenly over a tensor axis (51,305 =
    # 5·31·331 divides by none). HF exports carry vocab_size rows.
    vocab_multiple: int = 128
    # Training's forward applies the stacked layers with a scan (compile time flat in depth) or, when False, with
    # an unrolled loop over their slices: for the demo's 4-layer LM on 2 CPU cores the loop skips zero-filling and
    # writing the scan's stacked residual buffers and its step is ~10% faster (NOTES.md). Only without remat:
    # inside the unrolled loop XLA merged the recomputation back and remat saved no memory.
    scan_layers: bool = True

    HF_FIELDS = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "rotary_pct", "rotary_emb_base", "max_position_embeddings", "layer_norm_eps",
        "use_parallel_residual", "tie_word_embeddings", "initializer_range",
    )

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "vocab_multiple")
        if bad := [f"{name}={getattr(self, name)!r}" for name in sizes if not positive_int(getattr(self, name))]:
            raise ValueError(f"{', '.join(bad)} must be positive ints")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
        if not self.scan_layers and self.remat_policy != "none":
            raise ValueError(f"scan_layers=False takes remat_policy='none' (got {self.remat_policy!r}): in the unrolled "
                             "loop XLA merges the recomputation back, so remat saves no memory; keep scan_layers=True "
                             "to use remat")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def table_rows(self) -> int:
        return table_rows(self.vocab_size, self.vocab_multiple)

    def replace(self, **changes: Any) -> GPTNeoXConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config", **runtime: Any) -> GPTNeoXConfig:
        """Read an HF config dict, in both the older (`rotary_pct`) and transformers 5 (`rope_parameters`) spellings."""
        model_type = hf.get("model_type")
        if model_type != "gpt_neox":
            raise ValueError(f"{source}: model_type is {model_type!r}, but only 'gpt_neox' (GPT-NeoX) is supported")
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported; GPT-NeoX/dolly use exact 'gelu'")
        if not hf.get("attention_bias", True):
            raise ValueError(f"{source}: attention_bias=false is not supported")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_type {rope['rope_type']!r} is not supported, only 'default'")
        fields = {k: hf[k] for k in cls.HF_FIELDS if k in hf}
        fields["rotary_pct"] = rope.get("partial_rotary_factor", hf.get("rotary_pct", cls.rotary_pct))
        fields["rotary_emb_base"] = rope.get("rope_theta", hf.get("rotary_emb_base", cls.rotary_emb_base))
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in fields]
        if missing:
            raise ValueError(f"{source}: missing required fields {missing}")
        try:
            return cls(**fields, **runtime)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_hf_file(cls, path: str | Path, **runtime: Any) -> GPTNeoXConfig:
        path = Path(path)
        if not path.is_file():
            hint = (" (it holds meta.json: a converted checkpoint, which init.workdir and --checkpoint take)"
                    if (path.parent / "meta.json").is_file() else "")
            raise FileNotFoundError(f"{path}: no config.json; an HF model directory needs one{hint}")
        return cls.from_hf(read_json_object(path, ValueError), source=str(path), **runtime)

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` dict that both transformers 4.x and 5.x read."""
        hf = {k: getattr(self, k) for k in self.HF_FIELDS}
        hf.update(
            model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_act="gelu",
            attention_bias=True, bos_token_id=0, eos_token_id=0, use_cache=True,
            rope_parameters={"rope_type": "default", "rope_theta": self.rotary_emb_base,
                             "partial_rotary_factor": self.rotary_pct},
        )
        return hf


class KVCache(NamedTuple):
    """Per-layer keys and values for decoding; all sequences of a batch write the same slot (left padding)."""

    k: jax.Array  # (layers, batch, heads, max_length, head_dim): positions × channels per head, as dots read it
    v: jax.Array
    valid: jax.Array  # (batch, max_length) bool: slot holds a real token
    next_position: jax.Array  # (batch,) int32: rotary position of each sequence's next token
    index: jax.Array  # () int32: next slot to write


def _param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


def _vocab_param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], axes: tuple[str, ...], rows: int,
                 dtype) -> nnx.Param:
    """`_param` of the vocabulary's `shape`, zero-padded to `rows` along its "vocab" axis (the draw does not
    depend on the padding)."""
    axis = axes.index("vocab")
    return nnx.Param(pad_vocab(_param(rngs, std, shape, axes, dtype)[...], rows, axis), logical_axes=axes)


def pad_vocab(table: Any, rows: int, vocab_axis: int) -> Any:
    """`table` (numpy or jax) with zeros appended along `vocab_axis` up to `rows` entries."""
    widths = [(0, 0)] * table.ndim
    widths[vocab_axis] = (0, rows - table.shape[vocab_axis])
    return (jnp if isinstance(table, jax.Array) else np).pad(table, widths)


def _const(value: float, shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


class LayerStack(nnx.Module):
    """The transformer blocks' weights, stacked on a leading `layers` axis."""

    def __init__(self, cfg: GPTNeoXConfig, rngs: nnx.Rngs):
        L, E, N, H, M = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim,
                         cfg.intermediate_size)
        std, dt = cfg.initializer_range, resolve_dtype(cfg.param_dtype)
        self.ln1_scale = _const(1.0, (L, E), ("layers", "norm"), dt)
        self.ln1_bias = _const(0.0, (L, E), ("layers", "norm"), dt)
        self.ln2_scale = _const(1.0, (L, E), ("layers", "norm"), dt)
        self.ln2_bias = _const(0.0, (L, E), ("layers", "norm"), dt)
        # Fused QKV kept in HF's per-head interleaving: (embed, heads, [q|k|v], head_dim).
        self.qkv_kernel = _param(rngs, std, (L, E, N, 3, H), ("layers", "embed", "heads", "qkv", "head_dim"), dt)
        self.qkv_bias = _const(0.0, (L, N, 3, H), ("layers", "heads", "qkv", "head_dim"), dt)
        self.out_kernel = _param(rngs, std, (L, N, H, E), ("layers", "heads", "head_dim", "embed"), dt)
        self.out_bias = _const(0.0, (L, E), ("layers", "norm"), dt)
        self.up_kernel = _param(rngs, std, (L, E, M), ("layers", "embed", "mlp"), dt)
        self.up_bias = _const(0.0, (L, M), ("layers", "mlp"), dt)
        self.down_kernel = _param(rngs, std, (L, M, E), ("layers", "mlp", "embed"), dt)
        self.down_bias = _const(0.0, (L, E), ("layers", "norm"), dt)

    def arrays(self) -> dict[str, jax.Array]:
        return _param_arrays(self)


def _param_arrays(module: nnx.Module) -> dict[str, jax.Array]:
    """The module's own parameters by attribute name (the per-layer dict `_block` takes)."""
    return {k: v[...] for k, v in vars(module).items() if isinstance(v, nnx.Param)}


class _LayerWeights(nnx.Module):
    """One block's weights (a slice of `LayerStack` in a buffer of its own)."""

    def __init__(self, params: dict[str, nnx.Param], layer: int):
        for name, param in params.items():
            axes = param.get_metadata().get("logical_axes")
            setattr(self, name, nnx.Param(param[...][layer], **({"logical_axes": axes[1:]} if axes else {})))

    def arrays(self) -> dict[str, jax.Array]:
        return _param_arrays(self)


class UnstackedLayers(nnx.Module):
    """`LayerStack`'s weights with one buffer per layer, applied by an unrolled loop (see `unstack_layers`)."""

    def __init__(self, stack: LayerStack, num_layers: int):
        params = {k: v for k, v in vars(stack).items() if isinstance(v, nnx.Param)}
        self.blocks = nnx.List([_LayerWeights(params, i) for i in range(num_layers)])


def unstack_layers(model: "GPTNeoX") -> "GPTNeoX":
    """Give each layer its own weight buffers (in place; returns `model`), for decoding on GPUs.

    A scan over stacked weights slices each layer out of the stack, and XLA:GPU copies that slice before its
    matmuls: decoding then moves every weight three times per token instead of once (NOTES.md, H200 numbers).
    Outside `jit` the slices become separate arrays, read in place; inside `jit` this is the unrolled loop.
    """
    if isinstance(model.layers, LayerStack):
        model.layers = UnstackedLayers(model.layers, model.config.num_hidden_layers)
    return model


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm computed in fp32 whatever the activation dtype, as torch does on GPU."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch computes it: 0.5·x·(1 + erf(x/√2)) in fp32 whatever the activation dtype.

    `jax.nn.gelu(approximate=False)` takes erfc of x·√½ rounded to x's dtype; XLA expands erfc into two
    polynomials, two divides and an exp, which made the 2.8B step's GELU passes compute-bound on an H100.
    """
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * math.sqrt(0.5)))).astype(x.dtype)


def rotary_tables(positions: jax.Array, rotary_dims: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of concat(θ, θ) in fp32, θ = position · base^(-2j/rotary_dims), shaped (batch, length, 1, dims)."""
    inv_freq = base ** (-jnp.arange(0, rotary_dims, 2, dtype=jnp.float32) / rotary_dims)
    theta = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([theta, theta], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """GPT-NeoX partial rotary: rotate_half on the first `dims` channels of each head, pass the rest through.

    Channels are cut with `jnp.split` (here and for q/k/v in `_block`): its gradient is one concatenate, where an
    indexed slice's is a zero pad of the whole width, and XLA:GPU summed those pads inside the qkv bias
    gradient's reduce at a seventh of the bandwidth (NOTES.md).
    """
    dims = cos.shape[-1]
    rot, rest = jnp.split(x, [dims], axis=-1)
    rot = rot.astype(jnp.float32)
    first, second = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return jnp.concatenate([(rot * cos + rotated * sin).astype(x.dtype), rest], axis=-1)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """HF's rule for left-padded batches: positions count real tokens, padding gets position 1 (never attended)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 1)


def uses_cudnn_attention(impl: str, dtype: Any, platform: str, masked: bool = False) -> bool:
    """Whether attention runs cuDNN's fused kernel: `cudnn`, or `auto` for unmasked (causal) bf16/fp16 attention
    on GPUs, i.e. training and full forwards (1.4x the 2.8B train step on an H200, NOTES.md); XLA elsewhere,
    masked decoding steps included."""
    if impl == "auto":
        return not masked and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and platform == "gpu"
    return impl == "cudnn"


def _attention(q, k, v, mask, impl):
    if impl == "auto":
        impl = "cudnn" if uses_cudnn_attention(impl, q.dtype, jax.default_backend(), mask is not None) else "xla"
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def _one_row_padded(x: jax.Array) -> jax.Array:
    """`x` (rows, ..., features) with a zero second row when it holds a single row; callers slice products back.

    XLA:GPU rewrites a one-row product whose operands total under 10M elements (a batch-1 decoding step's
    projections, image mode's 1,024-column LM head) as a multiply of the whole kernel followed by a separate
    column reduce, several times a matmul's memory traffic (NOTES.md, deviceless H100 compile).
    """
    return jnp.pad(x, [(0, 1)] + [(0, 0)] * (x.ndim - 1)) if math.prod(x.shape[:-1]) == 1 else x


def _matmul(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """(rows, k) @ (k, m), as a GEMM kernel even for one row."""
    return (_one_row_padded(rows) @ kernel)[:rows.shape[0]]


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
    """`x + bias` (bias over x's trailing axes) whose bias gradient sums the rows in fp32, as torch does.

    Differentiated as written, the sum is a reduce in the compute dtype: XLA:GPU's program for the bf16 step
    accumulated every bias gradient of the 2.8B model over its 8,192 rows in bf16 (NOTES.md).
    """
    return x + bias


def _add_bias_fwd(x: jax.Array, bias: jax.Array):
    return add_bias(x, bias), bias


def _add_bias_bwd(bias: jax.Array, grad: jax.Array):
    rows = tuple(range(grad.ndim - bias.ndim))
    return grad, grad.astype(jnp.float32).sum(rows).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _block(cfg: GPTNeoXConfig, x, p, cos, sin, mask, kv):
    """One GPT-NeoX layer. `kv` is None (no cache) or (k_all, v_all, layer, write_index) of the whole cache.

    Only this step's keys and values are written into the stacked cache (in place under jit); the layer's
    keys are read back from it, so decoding never copies the cache.
    """
    dt = resolve_dtype(cfg.dtype)
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"], cfg.layer_norm_eps)
    qkv_kernel = p["qkv_kernel"].reshape(h.shape[-1], -1).astype(dt)
    qkv = add_bias(_matmul(h.reshape(-1, h.shape[-1]), qkv_kernel), p["qkv_bias"].reshape(-1).astype(dt))
    qkv = qkv.reshape(*h.shape[:-1], *p["qkv_kernel"].shape[1:])
    q, k, v = (jnp.squeeze(t, 3) for t in jnp.split(qkv, 3, axis=3))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv is not None:
        k_all, v_all, layer, index = kv
        kv = tuple(jax.lax.dynamic_update_slice(all_, jnp.swapaxes(new, 1, 2).astype(all_.dtype)[None],
                                                (layer, 0, 0, index, 0)) for all_, new in ((k_all, k), (v_all, v)))
        # Views in the attention's (batch, length, heads, head_dim) order; XLA:GPU folds the swap into its dots.
        k, v = (jnp.swapaxes(jax.lax.dynamic_index_in_dim(all_, layer, 0, keepdims=False), 1, 2).astype(dt)
                for all_ in kv)
    attn = _attention(q, k, v, mask, cfg.attention_impl)
    out_kernel = p["out_kernel"].reshape(-1, x.shape[-1]).astype(dt)
    attn = add_bias(_matmul(attn.reshape(-1, out_kernel.shape[0]), out_kernel), p["out_bias"].astype(dt))
    attn = attn.reshape(x.shape)
    if not cfg.use_parallel_residual:  # sequential: the MLP reads the attention's output
        x = x + attn
    m_in = layer_norm(x, p["ln2_scale"], p["ln2_bias"], cfg.layer_norm_eps)
    # The MLP runs on (batch·length, embed) rows: XLA:CPU's backward of a 3-D dot fused with GELU was several
    # times slower than the 2-D form (NOTES.md, demo step); the reshapes are free bitcasts.
    rows = m_in.reshape(-1, m_in.shape[-1])
    m = gelu(add_bias(_matmul(rows, p["up_kernel"].astype(dt)), p["up_bias"].astype(dt)))
    m = add_bias(_matmul(m, p["down_kernel"].astype(dt)), p["down_bias"].astype(dt)).reshape(x.shape)
    out = x + attn + m if cfg.use_parallel_residual else x + m
    return parallel.constrain(out, ("batch", "length", "embed")), kv


class GPTNeoX(nnx.Module):
    """GPT-NeoX causal LM. `model(input_ids)` → logits (batch, length, vocab_size), fp32."""

    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt, std = resolve_dtype(config.param_dtype), config.initializer_range
        E, V, R = config.hidden_size, config.vocab_size, config.table_rows
        self.embed_in = _vocab_param(rngs, std, (V, E), ("vocab", "embed"), R, dt)
        self.layers = LayerStack(config, rngs)
        self.final_ln_scale = _const(1.0, (E,), ("norm",), dt)
        self.final_ln_bias = _const(0.0, (E,), ("norm",), dt)
        self.embed_out = (None if config.tie_word_embeddings
                          else _vocab_param(rngs, std, (E, V), ("embed", "vocab"), R, dt))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Full forward. Without `attention_mask` the mask is plain causal (right padding is harmless then)."""
        if attention_mask is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
            mask = None
        else:
            positions = positions_from_mask(attention_mask)
            valid = attention_mask.astype(bool)
            causal = jnp.tril(jnp.ones((input_ids.shape[1],) * 2, bool))
            mask = (causal[None] & valid[:, None, :])[:, None]
        return self.logits(self.hidden_states(input_ids, positions, mask))

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array | None,
                      cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Final-LayerNorm'd hidden states (and the updated cache layers when `cache` is given)."""
        cfg = self.config
        x = jnp.take(self.embed_in[...], input_ids, axis=0).astype(resolve_dtype(cfg.dtype))
        x = parallel.constrain(x, ("batch", "length", "embed"))
        cos, sin = rotary_tables(positions, cfg.rotary_dims, cfg.rotary_emb_base)
        if isinstance(self.layers, UnstackedLayers):
            new_kv = None if cache is None else (cache.k, cache.v)
            for layer, weights in enumerate(self.layers.blocks):
                x, new_kv = _block(cfg, x, weights.arrays(), cos, sin, mask,
                                   None if cache is None else (*new_kv, layer, cache.index))
        elif cache is None:
            layers = self.layers.arrays()

            def step(h, p):
                return _block(cfg, h, p, cos, sin, mask, None)[0], None
            policy = REMAT_POLICIES[cfg.remat_policy]
            if policy is not None:
                step = jax.checkpoint(step, policy=policy, prevent_cse=False)
            if cfg.scan_layers:
                x = jax.lax.scan(step, x, layers)[0]
            else:
                for i in range(cfg.num_hidden_layers):
                    x = step(x, {name: stacked[i] for name, stacked in layers.items()})[0]
            new_kv = None
        else:
            layers = self.layers.arrays()

            def step(carry, inputs):
                h, k_all, v_all = carry
                p, layer = inputs
                h, (k_all, v_all) = _block(cfg, h, p, cos, sin, mask, (k_all, v_all, layer, cache.index))
                return (h, k_all, v_all), None
            layer_ids = jnp.arange(cfg.num_hidden_layers)
            (x, *new_kv), _ = jax.lax.scan(step, (x, cache.k, cache.v), (layers, layer_ids))
        h = layer_norm(x, self.final_ln_scale[...], self.final_ln_bias[...], cfg.layer_norm_eps)
        return h if cache is None else (h, new_kv)

    def head_kernel(self) -> jax.Array:
        """The LM head as (embed, table_rows): untied `embed_out`, or `embed_in`ᵀ when tied."""
        return self.embed_in[...].T if self.embed_out is None else self.embed_out[...]

    def logits(self, h: jax.Array, vocab_range: tuple[int, int] | None = None) -> jax.Array:
        """fp32 logits over the whole vocabulary, or over the ids in `vocab_range = (start, stop)` only.

        The whole table's logits are computed and the padding's columns dropped after: slicing the kernel instead
        would copy it (or gather it, when split over devices) on every call.
        """
        kernel = self.head_kernel()
        if vocab_range is None:
            return lm_head(h, kernel)[..., :self.config.vocab_size]
        start, stop = vocab_range
        if not 0 <= start < stop <= self.config.vocab_size:  # past vocab_size lie the table's zero padding rows
            raise ValueError(f"vocab_range {vocab_range} is not a range of ids in [0, {self.config.vocab_size})")
        return lm_head(h, kernel[:, start:stop])

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache in the compute dtype for `max_length` positions per row."""
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_attention_heads, max_length, cfg.head_dim)
        dt = resolve_dtype(cfg.dtype)
        return KVCache(
            k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), valid=jnp.zeros((batch_size, max_length), bool),
            next_position=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32),
        )

    def extend(self, input_ids: jax.Array, cache: KVCache, token_valid: jax.Array | None = None,
               vocab_range: tuple[int, int] | None = None) -> tuple[jax.Array, KVCache]:
        """Append tokens (prefill or one decode step) to the cache; returns (logits, cache).

        `token_valid` (batch, length) marks real tokens (False for left padding); padded slots are never attended.
        `vocab_range` limits the logits to those ids (image codes only: 1024 of 51k columns of the LM head read).
        """
        B, T = input_ids.shape
        token_valid = jnp.ones((B, T), bool) if token_valid is None else token_valid.astype(bool)
        positions = cache.next_position[:, None] + jnp.cumsum(token_valid, axis=1) - 1
        positions = jnp.where(token_valid, positions, 1)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
        S = cache.valid.shape[1]
        slots = jnp.arange(S)
        query_slots = cache.index + jnp.arange(T)
        mask = (slots[None, :] <= query_slots[:, None])[None] & valid[:, None, :]
        h, (k, v) = self.hidden_states(input_ids, positions, mask[:, None], cache)
        new_cache = KVCache(
            k=k, v=v, valid=valid, next_position=cache.next_position + token_valid.sum(1).astype(jnp.int32),
            index=cache.index + T,
        )
        return self.logits(h, vocab_range), new_cache


@jax.custom_vjp
def lm_head(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """fp32 logits of activations `h` and the (embed, vocab) `kernel`, the matmul in `h`'s dtype.

    The backward matmuls run in `h`'s dtype too (the logits' gradient cast down, as torch autocast's bf16 logits
    do): differentiated as written, the fp32 gradient made XLA run both of them in fp32, about a tenth of
    the 2.8B step's time on an H200 (NOTES.md). The kernel's gradient keeps fp32 accumulation and its dtype.
    """
    padded = _one_row_padded(h)
    return jnp.einsum("bte,ev->btv", padded, kernel.astype(h.dtype), preferred_element_type=jnp.float32)[:h.shape[0]]


def _lm_head_fwd(h: jax.Array, kernel: jax.Array):
    return lm_head(h, kernel), (h, kernel)


def _lm_head_bwd(residuals, logits_grad: jax.Array):
    h, kernel = residuals
    g = logits_grad.astype(h.dtype)
    h_grad = jnp.einsum("btv,ev->bte", g, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    kernel_grad = jnp.einsum("bte,btv->ev", h, g, preferred_element_type=jnp.float32)
    return h_grad.astype(h.dtype), kernel_grad.astype(kernel.dtype)


lm_head.defvjp(_lm_head_fwd, _lm_head_bwd)


def extend_vocab(model: GPTNeoX, new_vocab_size: int, rngs: nnx.Rngs) -> GPTNeoX:
    """LLM-CXR's `resize_token_embeddings`: old rows kept, new rows of embed_in and embed_out drawn N(0, std)."""
    cfg = model.config
    if new_vocab_size < cfg.vocab_size:
        raise ValueError(f"new vocabulary size {new_vocab_size} is smaller than the model's {cfg.vocab_size}")
    grown_cfg = cfg.replace(vocab_size=new_vocab_size)

    def grown(table: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
        axis = axes.index("vocab")
        kept = jax.lax.slice_in_dim(table, 0, cfg.vocab_size, axis=axis)
        shape = list(kept.shape)
        shape[axis] = new_vocab_size - cfg.vocab_size
        drawn = _param(rngs, cfg.initializer_range, tuple(shape), axes, table.dtype)[...]
        return nnx.Param(pad_vocab(jnp.concatenate([kept, drawn], axis=axis), grown_cfg.table_rows, axis),
                         logical_axes=axes)

    model.embed_in = grown(model.embed_in[...], ("vocab", "embed"))
    if model.embed_out is not None:
        model.embed_out = grown(model.embed_out[...], ("embed", "vocab"))
    model.config = grown_cfg
    return model
