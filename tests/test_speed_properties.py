"""Speed-relevant properties checkable on CPU: chunked cross-entropy, no full-vocabulary fp32 logits in the
compiled step, donated state, compute dtype. (The fused cuDNN attention call is checked by bench/ on a GPU.)"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax import lm_task, parallel, trainer
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig
from train_helpers import load_config, mesh_of, tiny_task

CFG = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _batch(B, T, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T)).astype(np.int32)
    weights = (rng.random((B, T)) < 0.7).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(weights)


def test_chunked_statistics_and_gradients_equal_the_full_ones():
    model = GPTNeoX(CFG, rngs=nnx.Rngs(0))
    ids, weights = _batch(3, 37, CFG.vocab_size)  # 36 targets: not a multiple of the chunk
    graphdef, params = nnx.split(model)

    def stats(p, chunk):
        cfg = lm_task.LMStepConfig(image_offset=100, loss_chunk=chunk)
        return lm_task.model_statistics(nnx.merge(graphdef, p), ids, weights, cfg)

    full, chunked = stats(params, 0), stats(params, 8)
    for key in full:
        np.testing.assert_allclose(np.asarray(chunked[key]), np.asarray(full[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    grad = lambda chunk: jax.grad(lambda p: stats(p, chunk)["seq_loss"].sum())(params)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(0)), jax.tree.leaves(grad(8))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def _compiled_step_text(chunk: int, vocab: int, B: int, T: int, dtype: str = "float32", compile: bool = True) -> str:
    config = load_config("stage1")
    config.model.update(vocab_size=vocab, dtype=dtype)
    config.train.update(loss_chunk=chunk, global_batch_size=B)
    mesh = mesh_of((1, 1, 1))
    task = tiny_task(config, mesh, 1)
    graphdef, abstract, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    batch_sh = trainer.batch_shardings(task, mesh, parallel.DEFAULT_RULES)
    batch = {"input_ids": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sh["input_ids"]),
             "loss_weights": jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=batch_sh["loss_weights"])}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with jax.set_mesh(mesh):
        lowered = trainer.compile_train_step(task, graphdef, shardings, batch_sh).lower(state, batch)
        return lowered.compile().as_text() if compile else lowered.as_text()


def _full_logit_buffers(text: str, B: int, T: int, vocab: int) -> list[str]:
    return re.findall(rf"f32\[{B},{T - 1},{vocab}\]|f32\[{B},{T},{vocab}\]", text)


def test_compiled_step_never_holds_full_vocabulary_logits_when_chunked():
    B, T, V = 4, 64, 4096
    assert _full_logit_buffers(_compiled_step_text(0, V, B, T), B, T, V)  # the check sees them when they exist
    assert not _full_logit_buffers(_compiled_step_text(16, V, B, T), B, T, V)


def test_bf16_compute_asks_for_bf16_matmuls():
    """In the program we hand XLA (StableHLO): XLA:CPU upcasts bf16 dots itself, a GPU runs them in bf16."""
    text = _compiled_step_text(16, 256, 4, 32, dtype="bfloat16", compile=False)
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    bf16 = [line for line in dots if re.search(r"\(tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>\)", line)]
    assert dots and len(bf16) >= 0.7 * len(dots), (len(bf16), len(dots))


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
