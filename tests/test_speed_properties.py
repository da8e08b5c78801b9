"""Speed-relevant properties checkable on CPU: chunked cross-entropy, no full-vocabulary fp32 logits in the
compiled step, donated state, bf16 matmuls forward and backward, image-only logits when decoding codes.
(The fused cuDNN attention call is checked by bench/ on a GPU.)"""

import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax import aot, lm_task, parallel, sampling, train, trainer
from llmcxr_jax import model as model_module
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, lm_head
from train_helpers import load_config, mesh_of, tiny_task

CFG = GPTNeoXConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _batch(B, T, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T)).astype(np.int32)
    weights = (rng.random((B, T)) < 0.7).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(weights)


def test_chunked_statistics_and_gradients_equal_the_full_ones():
    model = GPTNeoX(CFG, rngs=nnx.Rngs(0))
    ids, weights = _batch(3, 37, CFG.vocab_size)  # 36 targets: not a multiple of the chunk
    graphdef, params = nnx.split(model)

    scales = jnp.asarray([0.5, 2.0, 1.25])  # per-sequence loss factors, as sequence_scales gives

    def stats(p, chunk):
        cfg = lm_task.LMStepConfig(image_offset=100, loss_chunk=chunk)
        return lm_task.model_statistics(nnx.merge(graphdef, p), ids, weights, cfg, scales)

    full, chunked = stats(params, 0), stats(params, 8)
    for key in full:
        np.testing.assert_allclose(np.asarray(chunked[key]), np.asarray(full[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    # the fused linear cross-entropy's gradients (formed in its forward pass) against autodiff of the full logits
    grad = lambda chunk: jax.grad(lambda p: 3.0 * stats(p, chunk)["loss"])(params)  # noqa: E731
    chunked_grad = grad(8)
    for a, b in zip(jax.tree.leaves(grad(0)), jax.tree.leaves(chunked_grad)):  # fp32 sums in another order: an
        scale = max(1.0, float(np.abs(a).max()))  # entry near zero is off by rounding of the leaf's largest terms
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * scale)
    # the tables' 8 padding rows (120 ids, 128 rows) get no gradient, so they stay zero under AdamW
    head_grad = np.asarray(chunked_grad["embed_out"][...])
    assert not head_grad[:, 120:].any() and head_grad[:, :120].any()


def _compiled_step_text(chunk: int, vocab: int, B: int, T: int, dtype: str = "float32", compile: bool = True,
                        debug_info: bool = False, mesh_shape: tuple[int, int, int] = (1, 1, 1),
                        topology: str = "", vocab_multiple: int = 128, **model) -> str:
    """The train step of configs/stage1.py:tiny (with `model`'s changes), compiled for this host's devices or for
    `topology`'s (h100:8)."""
    config = load_config("stage1")
    config.model.update(vocab_size=vocab, dtype=dtype, vocab_multiple=vocab_multiple, **model)
    config.train.update(loss_chunk=chunk, global_batch_size=B)
    mesh = parallel.make_mesh(mesh_shape, devices=aot.topology_devices(topology)) if topology else mesh_of(mesh_shape)
    shapes = {"input_ids": ((B, T), jnp.int32), "loss_weights": ((B, T), jnp.float32)}
    lowered = train.lower_step(tiny_task(config, mesh, 1), shapes, mesh, parallel.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        return lowered.compile().as_text() if compile else lowered.as_text(debug_info=debug_info)


def _full_logit_buffers(text: str, B: int, T: int, vocab: int) -> list[str]:
    return re.findall(rf"f32\[{B},{T - 1},{vocab}\]|f32\[{B},{T},{vocab}\]", text)


def test_compiled_step_never_holds_full_vocabulary_logits_when_chunked():
    B, T, V = 4, 64, 4096
    assert _full_logit_buffers(_compiled_step_text(0, V, B, T), B, T, V)  # the check sees them when they exist
    assert not _full_logit_buffers(_compiled_step_text(16, V, B, T), B, T, V)


def test_the_chunked_lm_head_is_not_recomputed_in_the_backward_pass():
    """The fused linear cross-entropy forms the head's gradients in its forward scan: the compiled step runs the
    head's forward matmul once per chunk, none of it under remat (checkpointing each chunk ran it twice)."""
    text = _compiled_step_text(16, 4096, 4, 64)
    assert re.search(r"op_name=\"[^\"]*bte,ev->btv", text)  # the head's forward matmul is there
    assert not re.search(r"op_name=\"[^\"]*rematted_computation[^\"]*bte,ev->btv", text)


@pytest.mark.parametrize("topology, reduction", [("", "all-reduce"), ("h100:8", "reduce-scatter")],
                         ids=["cpu", "h100"])
def test_the_fsdp_sharded_lm_head_is_gathered_and_its_gradient_reduced_once_per_step(topology, reduction):
    """On 8 fsdp devices the head's kernel is all-gathered once (cast to bf16 once, shared by every chunk's
    matmuls) and its gradient summed on each device over the chunks, then reduce-scattered once: outside the
    chunk loop. Left to sharding propagation, XLA:GPU did both in every chunk (the H100 program, compiled here)."""
    V = 4096
    with jax.default_matmul_precision("default"):
        text = _compiled_step_text(16, V, 16, 64, dtype="bfloat16", mesh_shape=(1, 8, 1), topology=topology)
    found, computation = [], None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%\S+ .*\{$", line)
        if header:
            computation = "entry" if header.group(1) else "other"
        collective = re.search(r"= (.*) (all-gather|reduce-scatter|all-reduce)(?:-start)?\(", line)
        if collective and f",{V}]" in collective.group(1):
            found.append((collective.group(2), computation))
    assert sorted(found) == [("all-gather", "entry"), (reduction, "entry")], found  # XLA:CPU: an all-reduce


def test_the_lm_head_splits_its_columns_over_a_tensor_axis():
    """On (1, 1, 8) each device computes the logits of its eighth of the padded table: 4,001 ids (divisible by no
    tensor axis, as LLM-CXR's 51,305) take 4,096 rows, 512 a device. Unpadded, every device ran the whole head.
    No collective moves a table: the embedding lookup gathers locally and all-reduces the activations."""
    def compiled(vocab_multiple: int) -> tuple[set[str], list[str]]:
        text = _compiled_step_text(16, 4001, 8, 64, mesh_shape=(1, 1, 8), vocab_multiple=vocab_multiple)
        head_columns = set(re.findall(r"= f32\[128,(\d+)\]\S* dot\(", text))  # 8 sequences x 16 positions
        collectives = re.findall(r"= (\S+) (?:all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(", text)
        return head_columns, collectives

    assert "4001" in compiled(1)[0]  # the check sees an unsplit head
    head_columns, collectives = compiled(128)
    assert "512" in head_columns and not head_columns & {"4001", "4096"}, head_columns  # (64: the input's gradient)
    assert collectives and not [c for c in collectives if re.search(r"\b(4096|4001)\b", c)], collectives


def _collective_elements(text: str) -> Counter:
    """Elements each kind of collective carries in compiled HLO text, summed over its instructions."""
    moved = Counter()
    for shapes, kind in re.findall(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                                   r"(?:-start)?\(", text):
        moved[kind] += sum(math.prod(map(int, filter(None, dims.split(","))))
                           for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", shapes))
    return moved


@pytest.mark.parametrize("topology", ["", "h100:8"], ids=["cpu", "h100"])
def test_a_tensor_axis_splits_each_layer_as_megatron_does(topology):
    """On (1, 1, 8) each layer's heads and MLP columns stay on their devices: a layer adds four all-reduces of the
    (tokens, hidden) activations to the step (its attention and MLP outputs, forward and backward) and moves no
    weight or gradient. Measured as the difference between 3 and 2 unrolled layers, so that the embedding's and
    the loss's collectives cancel; XLA:GPU combines the all-reduces into flat buffers, hence element counts."""
    B, T, hidden = 8, 48, 128

    def moved(layers: int) -> Counter:
        with jax.default_matmul_precision("default"):
            return _collective_elements(_compiled_step_text(
                8, 4001, B, T, dtype="bfloat16", mesh_shape=(1, 1, 8), topology=topology, hidden_size=hidden,
                num_attention_heads=8, intermediate_size=768, num_hidden_layers=layers, scan_layers=False))

    two, three = moved(2), moved(3)
    per_layer = {kind: three[kind] - two[kind] for kind in two | three if three[kind] != two[kind]}
    assert per_layer == {"all-reduce": 4 * B * T * hidden}, per_layer


def _dot_sources(text: str) -> list[tuple[str, str]]:
    """(operand types, the chain of source locations) of every dot_general in StableHLO text with debug info."""
    locs = dict(re.findall(r"^(#loc\d+) = (.*)$", text, re.M))

    def chain(loc: str, depth: int = 0) -> str:
        value = locs.get(loc, loc)
        inner = re.findall(r"#loc\d+", value)
        return value + (" <- " + chain(inner[0], depth + 1) if inner and depth < 8 else "")

    dots = re.findall(r"stablehlo\.dot_general.*? : (\(.*?\)) -> .*loc\((#loc\d+)\)\s*$", text, re.M)
    return [(types, chain(loc)) for types, loc in dots]


def test_bf16_compute_asks_for_bf16_matmuls_forward_and_backward():
    """Every matmul of the step, the LM head's backward included, takes bf16 operands in the program we hand
    XLA (StableHLO; XLA:CPU upcasts bf16 dots itself, a GPU runs them in bf16). The head's backward in fp32
    cost about a tenth of the 2.8B step on an H200. The one exception is the backward of jax's XLA attention
    (fp32 scores' gradient), which GPUs do not run: they take the cuDNN kernel (attention_impl="cudnn")."""
    config_text = _compiled_step_text(16, 256, 4, 32, dtype="bfloat16", compile=False, debug_info=True)
    dots = _dot_sources(config_text)
    not_bf16 = [(types, where) for types, where in dots if not re.fullmatch(
        r"\(tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>\)", types)]
    assert len(dots) > 10
    assert all('"_attention"' in where for _, where in not_bf16), not_bf16
    assert len(not_bf16) <= 2  # the scores' gradient against q and k


def test_bias_gradients_accumulate_in_fp32_in_the_h100_program(monkeypatch):
    """The bf16 step's bias gradients sum their rows in fp32 (torch does too). Differentiated as `x + bias`,
    XLA:GPU's program summed them in bf16 (XLA:CPU computes bf16 in fp32, so only the GPU program shows it)."""
    def bf16_reduces() -> list[str]:
        with jax.default_matmul_precision("default"):
            text = _compiled_step_text(16, 256, 8, 32, dtype="bfloat16", topology="h100:1")
        return re.findall(r"= bf16\[[0-9,]*\]\S* reduce\(", text)

    assert not bf16_reduces()
    monkeypatch.setattr(model_module, "add_bias", lambda x, bias: x + bias)
    assert bf16_reduces()  # the check sees them when they are there


def test_add_bias_gradient_is_the_fp32_row_sum():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 32, 6)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=(6,)), jnp.bfloat16)
    upstream = jnp.asarray(rng.normal(size=(64, 32, 6)), jnp.bfloat16)
    out, vjp = jax.vjp(model_module.add_bias, x, bias)
    x_grad, bias_grad = vjp(upstream)
    assert (out == x + bias).all() and (x_grad == upstream).all() and bias_grad.dtype == jnp.bfloat16
    expected = np.asarray(upstream, np.float32).sum((0, 1)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(bias_grad), expected)


def test_lm_head_gradients_equal_autodiff_in_fp32_and_stay_close_in_bf16():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 40)) * 0.2, jnp.float32)
    upstream = jnp.asarray(rng.normal(size=(2, 5, 40)), jnp.float32)

    def plain(h, k):
        return jnp.einsum("bte,ev->btv", h, k.astype(h.dtype), preferred_element_type=jnp.float32)

    def grads(fn, h):
        return jax.grad(lambda h, k: (fn(h, k) * upstream).sum(), argnums=(0, 1))(h, kernel)

    np.testing.assert_allclose(np.asarray(lm_head(h, kernel)), np.asarray(plain(h, kernel)), rtol=0, atol=0)
    for ours, ref in zip(grads(lm_head, h), grads(plain, h)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
    h_grad, kernel_grad = grads(lm_head, h.astype(jnp.bfloat16))
    assert h_grad.dtype == jnp.bfloat16 and kernel_grad.dtype == jnp.float32
    for ours, ref in zip((h_grad, kernel_grad), grads(plain, h)):
        ours, ref = np.asarray(ours, np.float32), np.asarray(ref)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 2e-2


def test_train_step_donates_the_state():
    config = load_config("stage1")
    mesh = mesh_of((1, 1, 1))
    task = tiny_task(config, mesh, 1)
    graphdef, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    batch_sh = trainer.batch_shardings(task, mesh, parallel.DEFAULT_RULES)
    state = jax.jit(lambda: nnx.state(task.create_state()), out_shardings=shardings)()
    before = jax.tree.leaves(state)
    ids, weights = _batch(config.train.global_batch_size, 16, config.model.vocab_size)
    with jax.set_mesh(mesh):
        step = trainer.compile_train_step(task, graphdef, shardings, batch_sh)
        step(state, {"input_ids": ids, "loss_weights": weights})
    assert all(x.is_deleted() for x in before)  # the old parameters and moments were reused in place


def _decode_dot_shapes(allowed: tuple[int, int] | None) -> list[str]:
    """Output shapes of the matmuls inside the compiled decode loop of a 3,000-id model, batch 2."""
    cfg = GPTNeoXConfig(vocab_size=3000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    graphdef, state = nnx.split(GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    spec = sampling.DecodeSpec(max_new_tokens=4, allowed=allowed)

    def decode(state, ids, keys):
        return sampling.decode(nnx.merge(graphdef, state), ids, jnp.ones(ids.shape, bool), keys, spec)

    text = jax.jit(decode).lower(state, jnp.ones((2, 6), jnp.int32),
                                 sampling.row_keys(jnp.uint32(0), jnp.arange(2))).as_text()
    return re.findall(r"stablehlo\.dot_general.*-> tensor<([0-9x]+)xf32>", text)


def test_image_decoding_computes_logits_for_the_allowed_ids_only():
    """Report→CXR decodes only image codes: the LM head reads 1,024 of its 51k columns and top-p ranks 1,024."""
    assert "2x1x3072" in _decode_dot_shapes(None)  # the check sees the full head (its padded table) when it is there
    shapes = _decode_dot_shapes((1000, 1256))
    assert "2x1x256" in shapes and not any(s.endswith("x3072") for s in shapes), shapes


@pytest.mark.parametrize("policy,forwards", [("dots_no_batch", 1), ("dots", 1), ("full", 2), ("none", 1)])
def test_remat_keeps_the_fused_attention_forward(monkeypatch, policy, forwards):
    """The bf16 step lowered for CUDA from the CPU, cuDNN's version checks answered as an H100's would be: per
    layer, the dot remat policies run cuDNN's fused attention forward once (its outputs are kept for the
    backward), `full` recomputes it (the check sees a second forward when there is one)."""
    import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention  # jax internals: stubbed checks only

    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn_attention, "is_cuda_compute_capability_equal", lambda capability: False)
    cfg = CFG.replace(hidden_size=128, num_attention_heads=2, intermediate_size=256, dtype="bfloat16",
                      attention_impl="cudnn", remat_policy=policy)
    graphdef, params = nnx.split(GPTNeoX(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jnp.ones((2, 128), jnp.int32)
    grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(ids).sum()))
    text = grad.trace(params).lower(lowering_platforms=("cuda",)).as_text()
    calls = Counter(re.findall(r"custom_call @([^(]+)\(", text))
    assert calls["__cudnn$fmhaSoftmax"] == forwards and calls["__cudnn$fmhaSoftmaxBackward"] == 1, calls
