"""The language-model training task: state, loss normalisation, the pure train/eval step and its metrics.

Batches are `{"input_ids": int32 (B, L), "loss_weights": float32 (B, L)}` with weight[t] = 1 where token t is a
supervised target (response, `\\n\\n`, `### End`; SPEC §8). Position t's logits predict token t+1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmcxr_jax import parallel, trainer
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, lm_head, table_rows

LOSS_MODES = ("global", "original")
BATCH_AXES = {"input_ids": ("batch", "length"), "loss_weights": ("batch", "length")}


class LMTrainState(nnx.Module):
    """Everything a step changes: the model and its AdamW state (moments carry the params' logical axes)."""

    def __init__(self, model: GPTNeoX, tx: optax.GradientTransformation):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


def sequence_scales(loss_weights: jax.Array, mode: str, group_size: int) -> jax.Array:
    """Per-sequence factors s_b with loss = Σ_b s_b · (summed token loss of b); independent of mesh and micro-batching.

    `global`: 1 / (weighted tokens in the whole batch). `original`: LLM-CXR's mean of per-micro-batch means over
    consecutive groups of `group_size` sequences (2 per device × 8 ranks in the original run).
    """
    counts = loss_weights[:, 1:].sum(axis=1)
    if mode == "global":
        return jnp.full(counts.shape, 1.0, jnp.float32) / jnp.maximum(counts.sum(), 1.0)
    if mode == "original":
        groups = counts.reshape(-1, group_size)
        per_group = jnp.maximum(groups.sum(axis=1, keepdims=True), 1.0)
        return (1.0 / (per_group * groups.shape[0]) * jnp.ones_like(groups)).reshape(-1)
    raise ValueError(f"train.loss_mode {mode!r} is unknown; expected one of {LOSS_MODES}")


def token_statistics(logits: jax.Array, input_ids: jax.Array, loss_weights: jax.Array,
                     image_offset: int) -> dict[str, jax.Array]:
    """Per-sequence summed loss and per-batch accuracy counts, split into text and image targets."""
    return target_statistics(logits[:, :-1], input_ids[:, 1:], loss_weights[:, 1:], image_offset)


def target_statistics(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                      image_offset: int) -> dict[str, jax.Array]:
    """The statistics of `token_statistics` for logits already aligned with their targets."""
    logits, weights = logits.astype(jnp.float32), weights.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
    is_image = (targets >= image_offset).astype(jnp.float32)
    return {
        "seq_loss": (ce * weights).sum(axis=1),
        "tokens": weights.sum(),
        "text_correct": (correct * (1 - is_image)).sum(),
        "text_tokens": (weights * (1 - is_image)).sum(),
        "image_correct": (correct * is_image).sum(),
        "image_tokens": (weights * is_image).sum(),
    }


def chunked_statistics(model: GPTNeoX, input_ids: jax.Array, loss_weights: jax.Array, image_offset: int,
                       chunk: int, scales: jax.Array | None = None) -> dict[str, jax.Array]:
    """`token_statistics(model(ids), ...)` without materialising (batch, length, vocab) fp32 logits, plus
    `loss` = Σ_b scales_b · seq_loss_b (scales default 1), the value to differentiate.

    The LM head and cross-entropy run over `chunk` positions at a time (`_chunked_head_loss`): the gradient of
    `loss` is formed chunk by chunk in the forward pass, so no chunk's logits are kept or recomputed.
    """
    B, T = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    h = model.hidden_states(input_ids, positions, None)[:, :-1]
    targets, weights = input_ids[:, 1:], loss_weights[:, 1:].astype(jnp.float32)
    n = -(-(T - 1) // chunk)
    pad = n * chunk - (T - 1)

    def chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    scales = jnp.ones((B,), jnp.float32) if scales is None else scales.astype(jnp.float32)
    loss, stats = _chunked_head_loss(chunks(h), model.head_kernel(), chunks(targets), chunks(weights), scales,
                                     image_offset, model.config.vocab_size)
    return {"loss": loss, **stats}


def _zero_statistics(batch: int) -> dict[str, jax.Array]:
    return {"seq_loss": jnp.zeros((batch,), jnp.float32), **{k: jnp.zeros((), jnp.float32) for k in STAT_KEYS}}


def _table_logits(h: jax.Array, kernel: jax.Array, vocab_size: int) -> jax.Array:
    """`lm_head` over the whole embedding table, the padding's columns (past `vocab_size`) at -inf.

    Masked rather than sliced off, the logits keep the table's width, which divides evenly over a tensor axis.
    """
    logits = lm_head(h, kernel)
    if logits.shape[-1] == vocab_size:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked_head_loss(h: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, scales: jax.Array,
                       image_offset: int, vocab_size: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(Σ_b scales_b · seq_loss_b, statistics) of chunks (n, B, chunk, ...) of hidden states, targets, weights.

    A fused linear cross-entropy: differentiated, its forward pass also forms d loss / d h and d loss / d kernel
    chunk by chunk (softmax − one-hot, scaled, through the two head matmuls in the compute dtype, as `lm_head`'s
    VJP does), and the backward pass only scales them by the loss's cotangent. Checkpointing each chunk instead
    would run the head's forward matmul a second time. The statistics carry no gradient.
    """
    def body(total, xs):
        hc, tc, wc = xs
        logits = _table_logits(hc, kernel, vocab_size)
        return jax.tree.map(jnp.add, total, target_statistics(logits, tc, wc, image_offset)), None

    stats = jax.lax.scan(body, _zero_statistics(scales.shape[0]), (h, targets, weights))[0]
    return (stats["seq_loss"] * scales).sum(), stats


def _chunked_head_loss_fwd(h, kernel, targets, weights, scales, image_offset, vocab_size):
    # Sharded over devices, the kernel is gathered once for every chunk, and each batch shard sums its own rows'
    # part of the kernel's gradient over the chunks (a leading `shards` axis), reduced across devices once after
    # the loop. Left to sharding propagation, XLA:GPU gathered the kernel and reduce-scattered its fp32 gradient
    # in every chunk (NOTES.md).
    compute_kernel = parallel.constrain(kernel.astype(h.dtype), (None, "vocab"))
    _, batch, chunk, _ = h.shape
    shards = parallel.shard_count("batch", batch)

    def per_shard(x):  # (batch, chunk, ...) -> (shards, batch / shards, chunk, ...)
        return x.reshape(shards, batch // shards, *x.shape[1:])

    def body(carry, xs):
        total, kernel_grad = carry
        hc, tc, wc = xs
        logits = _table_logits(hc, compute_kernel, vocab_size)
        total = jax.tree.map(jnp.add, total, target_statistics(logits, tc, wc, image_offset))
        row_weights = (wc * scales[:, None])[..., None]
        logits_grad = (jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(tc, logits.shape[-1])) * row_weights
        g = logits_grad.astype(h.dtype)
        h_grad = jnp.einsum("btv,ev->bte", g, compute_kernel, preferred_element_type=jnp.float32)
        shard_grads = jnp.einsum("sbte,sbtv->sev", per_shard(hc), per_shard(g), preferred_element_type=jnp.float32)
        kernel_grad = parallel.constrain(kernel_grad + shard_grads, ("batch", None, "vocab"))
        return (total, kernel_grad), h_grad.astype(h.dtype)

    shard_zeros = parallel.constrain(jnp.zeros((shards, *kernel.shape), jnp.float32), ("batch", None, "vocab"))
    (stats, kernel_grad), h_grad = jax.lax.scan(body, (_zero_statistics(scales.shape[0]), shard_zeros),
                                                (h, targets, weights))
    loss = (stats["seq_loss"] * scales).sum()
    return (loss, stats), (h_grad, kernel_grad.sum(0).astype(kernel.dtype))


def _chunked_head_loss_bwd(image_offset, vocab_size, residuals, cotangents):
    h_grad, kernel_grad = residuals
    loss_cotangent = cotangents[0]  # the statistics' cotangents are ignored: they carry no gradient
    return ((h_grad * loss_cotangent).astype(h_grad.dtype), (kernel_grad * loss_cotangent).astype(kernel_grad.dtype),
            None, None, None)


_chunked_head_loss.defvjp(_chunked_head_loss_fwd, _chunked_head_loss_bwd)


STAT_KEYS = ("tokens", "text_correct", "text_tokens", "image_correct", "image_tokens")


@dataclasses.dataclass(frozen=True)
class LMStepConfig:
    loss_mode: str = "global"
    loss_group_size: int = 2
    micro_batches: int = 1
    image_offset: int = 50281
    loss_chunk: int = 0  # > 0: chunked LM head + cross-entropy (positions per chunk)


def model_statistics(model: GPTNeoX, ids: jax.Array, weights: jax.Array, cfg: LMStepConfig,
                     scales: jax.Array | None = None) -> dict[str, jax.Array]:
    """The statistics of `token_statistics` and `loss` = Σ_b scales_b · seq_loss_b (scales default 1)."""
    if cfg.loss_chunk and cfg.loss_chunk < ids.shape[1] - 1:
        return chunked_statistics(model, ids, weights, cfg.image_offset, cfg.loss_chunk, scales)
    stats = token_statistics(model(ids), ids, weights, cfg.image_offset)
    s = jnp.ones_like(stats["seq_loss"]) if scales is None else scales
    return {"loss": (stats["seq_loss"] * s).sum(), **stats}


def train_step(state: LMTrainState, batch: dict[str, jax.Array], cfg: LMStepConfig,
               schedule: optax.Schedule) -> dict[str, jax.Array]:
    """One optimizer update over `cfg.micro_batches` accumulated micro-batches; mutates `state`, returns metrics."""
    scales = sequence_scales(batch["loss_weights"], cfg.loss_mode, cfg.loss_group_size)
    graphdef, params, rest = nnx.split(state.model, nnx.Param, ...)

    def loss_fn(p, ids, weights, s):
        stats = model_statistics(nnx.merge(graphdef, p, rest), ids, weights, cfg, s)
        stats.pop("seq_loss")
        return stats.pop("loss"), stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if cfg.micro_batches == 1:
        (loss, stats), grads = grad_fn(params, batch["input_ids"], batch["loss_weights"], scales)
    else:
        k = cfg.micro_batches
        xs = tuple(trainer.split_micro_batches(x, k) for x in (batch["input_ids"], batch["loss_weights"], scales))

        def accumulate(carry, mb):
            (loss_mb, stats_mb), grads_mb = grad_fn(params, *mb)
            return jax.tree.map(jnp.add, carry, (loss_mb, stats_mb, grads_mb)), None

        zero_stats = {k_: jnp.zeros((), jnp.float32) for k_ in STAT_KEYS}
        zeros = (jnp.zeros((), jnp.float32), zero_stats, jax.tree.map(jnp.zeros_like, params))
        (loss, stats, grads), _ = jax.lax.scan(accumulate, zeros, xs)
    lr = schedule(state.optimizer.step[...])
    state.optimizer.update(state.model, grads)
    return {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr, **stats}


def eval_step(state: LMTrainState, batch: dict[str, jax.Array], cfg: LMStepConfig) -> dict[str, jax.Array]:
    """Sums over the batch (so evaluation over many batches is a plain sum); rows with zero weight count nothing."""
    stats = model_statistics(state.model, batch["input_ids"], batch["loss_weights"], cfg)
    stats.pop("loss")
    return {"loss_sum": stats.pop("seq_loss").sum(), **stats}


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Host-side ratios from summed statistics (accuracies are NaN-free: 0 when a kind of target is absent)."""
    out = {k: float(v) for k, v in sums.items() if k in ("loss", "grad_norm", "lr")}
    if "loss_sum" in sums:
        out["loss"] = float(sums["loss_sum"]) / max(float(sums["tokens"]), 1.0)
    for kind in ("text", "image"):
        out[f"{kind}_accuracy"] = float(sums[f"{kind}_correct"]) / max(float(sums[f"{kind}_tokens"]), 1.0)
    out["tokens"] = float(sums["tokens"])
    return out


def flops_per_token(cfg: GPTNeoXConfig, seq_len: int) -> float:
    """Training FLOPs per token as BENCHMARKS.md counts them: 6·N + 12·L·d·S, N = non-embedding weights + LM head."""
    E, L, M = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    per_layer = 4 * E * E + 2 * E * M  # qkv (3E²) + dense (E²) + two MLP matrices
    n = L * per_layer + E * cfg.vocab_size
    return 6.0 * n + 12.0 * L * E * seq_len


def model_config_from(config: Any) -> GPTNeoXConfig:
    """`config.model` (a ConfigDict of GPTNeoXConfig fields) → GPTNeoXConfig, naming unknown fields."""
    return trainer.dataclass_from_section(GPTNeoXConfig, config.model, "config.model")


def build_task(config: Any, *, mesh: jax.sharding.Mesh, rules: Any, total_steps: int,
               metadata: dict[str, Any]) -> Any:
    """The LM as a task of the generic loop: fresh, from an HF directory (stage 1) or a stage-1 workdir (stage 2)."""
    from llmcxr_jax import checkpoint, convert, optim
    from llmcxr_jax.model import extend_vocab

    model_cfg = model_config_from(config)
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    step_cfg = LMStepConfig(loss_mode=config.train.loss_mode, loss_group_size=config.train.loss_group_size,
                            micro_batches=config.train.micro_batches, image_offset=metadata["image_offset"],
                            loss_chunk=config.train.loss_chunk)
    metadata = {**metadata, "model_config": dataclasses.asdict(model_cfg)}

    def create_state() -> LMTrainState:
        return LMTrainState(GPTNeoX(model_cfg, rngs=nnx.Rngs(config.seed)), tx)

    def from_model(model: GPTNeoX, shardings: Any) -> Any:
        graphdef, params = nnx.split(model)
        build = lambda p: nnx.state(LMTrainState(nnx.merge(graphdef, p), tx))  # noqa: E731
        return jax.jit(build, out_shardings=shardings)(params)

    initial_state = None
    runtime = {k: getattr(model_cfg, k) for k in ("dtype", "param_dtype", "attention_impl", "remat_policy",
                                                  "scan_layers")}
    if config.init.hf_dir:
        def initial_state(shardings):
            trainer.announce(f"stage {config.stage} starts from the Hugging Face weights in {config.init.hf_dir}")
            model = convert.load_hf_model(config.init.hf_dir, mesh=mesh, rules=rules, **runtime,
                                          vocab_multiple=model_cfg.vocab_multiple)
            if model.config.vocab_size < model_cfg.vocab_size:
                model = extend_vocab(model, model_cfg.vocab_size, nnx.Rngs(config.seed))
            if differing := model_differences(dataclasses.asdict(model.config), dataclasses.asdict(model_cfg)):
                raise ValueError(f"init.hf_dir {config.init.hf_dir}: config.json differs from config.model in "
                                 f"{differing}")
            return from_model(model, shardings)
    elif config.init.workdir:
        def initial_state(shardings):  # a training workdir (its latest step) or a converted checkpoint
            meta, source, step = checkpoint.latest_metadata(config.init.workdir, config.init.get("step") or None)
            check_compatible(meta, metadata, f"init.workdir {source}")
            planned = meta.get("total_steps")
            if not config.init.get("step") and step is not None and planned is not None and step < planned:
                raise ValueError(f"init.workdir {config.init.workdir} stopped at step {step} of {planned}: finish "
                                 "that run first (rerun its command; it resumes), or start from this step "
                                 f"deliberately with --config.init.step={step}")
            trainer.announce(f"stage {config.stage} starts from {source}")
            model = checkpoint.load_model(config.init.workdir, step=step, mesh=mesh, rules=rules, **runtime)
            return from_model(model, shardings)

    def throughput(window: dict[str, float], seconds: float) -> dict[str, float]:
        tokens_per_s = window["tokens_total"] / max(seconds, 1e-9)
        out = {"tokens_per_s": tokens_per_s}
        peak = config.train.peak_flops_per_device
        if peak:
            flops = flops_per_token(model_cfg, int(window["seq_len"] / max(window["steps"], 1)))
            out["mfu"] = tokens_per_s * flops / (peak * jax.device_count())
        return out

    def step(state: LMTrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        metrics = train_step(state, batch, step_cfg, schedule)
        ids = batch["input_ids"]
        return {**metrics, "tokens_total": jnp.asarray(ids.size, jnp.float32),
                "seq_len": jnp.asarray(ids.shape[1], jnp.float32), "steps": jnp.ones((), jnp.float32)}

    return trainer.Task(
        create_state=create_state, train_step=step, batch_axes=BATCH_AXES, summarize=summarize,
        eval_step=lambda s, b: eval_step(s, b, step_cfg), initial_state=initial_state, throughput=throughput,
        metadata=metadata,
        check_restored_metadata=lambda m: check_resumable(m, metadata),
    )


def check_resumable(found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another stage (its optimizer, step and data state are that stage's) or
    with weights this run cannot take."""
    source = "the workdir's latest checkpoint (resuming)"
    if "stage" in found and "stage" in expected and found["stage"] != expected["stage"]:
        raise ValueError(f"{source} was written by stage {found['stage']}, this run is stage {expected['stage']}: "
                         f"give stage {expected['stage']} a workdir of its own (stage 2 starts from stage 1's with "
                         "init.workdir)")
    check_compatible(found, expected, source)


COMPATIBILITY_KEYS = ("token_layout", "vqgan_fingerprint", "vqgan_grid")


def check_compatible(found: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse weights trained with another vocabulary, token layout or VQ-GAN, naming what differs."""
    from llmcxr_jax import checkpoint

    checkpoint.require_language_model(found, source)
    found_vocab = found["model_config"].get("vocab_size")
    want_vocab = expected["model_config"]["vocab_size"]
    if found_vocab != want_vocab:
        hint = (": an unextended text model such as dolly-v2-3b starts stage 1 from its HF directory "
                "(init.hf_dir), which extends the vocabulary" if found_vocab < want_vocab else "")
        raise ValueError(f"{source}: vocabulary size {found_vocab} differs from this run's {want_vocab}{hint}")
    found_multiple = found["model_config"].get("vocab_multiple", 1)  # absent: written before padding existed
    found_rows = table_rows(found_vocab, found_multiple)
    want_rows = table_rows(want_vocab, expected["model_config"]["vocab_multiple"])
    if found_rows != want_rows:
        raise ValueError(f"{source}: its embedding tables have {found_rows} rows (vocab_multiple={found_multiple}), "
                         f"this run's {want_rows}; set --config.model.vocab_multiple={found_multiple}")
    if differing := model_differences(found["model_config"], expected["model_config"]):
        raise ValueError(f"{source}: its model differs from config.model in {differing}")
    for key in COMPATIBILITY_KEYS:
        if key in expected and found.get(key) != expected[key]:
            raise ValueError(f"{source}: {key} is {found.get(key)!r}, this run expects {expected[key]!r}")


def model_differences(found: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The architecture fields (GPTNeoXConfig.HF_FIELDS but the initializer's scale) in which weights of config
    `found` do not fit config `want`, as 'name (found vs want)'; fields `found` does not record are not compared."""
    return [f"{name} ({found[name]} vs {want[name]})" for name in GPTNeoXConfig.HF_FIELDS
            if name != "initializer_range" and name in found and found[name] != want[name]]
