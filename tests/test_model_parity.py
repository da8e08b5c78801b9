"""GPT-NeoX in Flax against Hugging Face's PyTorch GPT-NeoX on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import hf_logits, save_hf, tiny_hf_model
from llmcxr_jax import parallel
from llmcxr_jax.convert import load_hf_model
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, LayerStack, extend_vocab, gelu, unstack_layers

VARIANTS = {
    "parallel_rot25_untied_h4": dict(use_parallel_residual=True, rotary_pct=0.25, tie_word_embeddings=False),
    "sequential_rot100_tied_h3": dict(use_parallel_residual=False, rotary_pct=1.0, tie_word_embeddings=True,
                                      hidden_size=48, num_attention_heads=3),
    "parallel_rot50_untied_h5": dict(use_parallel_residual=True, rotary_pct=0.5, hidden_size=40,
                                     num_attention_heads=5),
}


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    hf = tiny_hf_model(**VARIANTS[variant])
    ours = load_hf_model(save_hf(hf, tmp_path / "hf"))
    ids = _ids(2, 17, hf.config.vocab_size)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=0)


def _greedy(model: GPTNeoX, prompt: np.ndarray, steps: int) -> np.ndarray:
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + steps)
    extend = nnx.jit(lambda m, ids, c: m.extend(ids, c))
    logits, cache = extend(model, jnp.asarray(prompt), cache)
    out = []
    for _ in range(steps):
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None]
        out.append(np.asarray(token))
        logits, cache = extend(model, token, cache)
    return np.concatenate(out, axis=1)


def test_greedy_continuation_equals_transformers_generate(tmp_path):
    hf = tiny_hf_model(seed=3)
    ours = load_hf_model(save_hf(hf, tmp_path / "hf"))
    prompt = _ids(1, 9, hf.config.vocab_size, seed=5)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0).numpy()[:, prompt.shape[1]:]
    np.testing.assert_array_equal(_greedy(ours, prompt, 32), ref)


@pytest.mark.parametrize("variant", ["parallel_rot25_untied_h4", "sequential_rot100_tied_h3"])
def test_unstacked_layers_match_transformers(tmp_path, variant):
    """The decoding layout (one weight buffer per layer, unrolled loop): same logits and greedy tokens as HF."""
    hf = tiny_hf_model(**VARIANTS[variant])
    ours = unstack_layers(load_hf_model(save_hf(hf, tmp_path / "hf")))
    assert not isinstance(ours.layers, LayerStack) and len(ours.layers.blocks) == hf.config.num_hidden_layers
    ids = _ids(2, 17, hf.config.vocab_size)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=0)
    prompt = _ids(1, 9, hf.config.vocab_size, seed=5)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          pad_token_id=0).numpy()[:, prompt.shape[1]:]
    np.testing.assert_array_equal(_greedy(ours, prompt, 16), ref)


def test_unrolled_layer_loop_matches_transformers_and_the_scan(tmp_path):
    """scan_layers=False (the demo's training forward): HF's logits, and the scan's gradients."""
    hf = tiny_hf_model(**VARIANTS["parallel_rot25_untied_h4"])
    path = save_hf(hf, tmp_path / "hf")
    looped, scanned = (load_hf_model(path, scan_layers=scan) for scan in (False, True))
    ids = jnp.asarray(_ids(2, 17, hf.config.vocab_size))
    np.testing.assert_allclose(np.asarray(looped(ids)), hf_logits(hf, ids), atol=1e-4, rtol=0)

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jax.nn.log_softmax(nnx.merge(graphdef, p)(ids)).mean()  # noqa: E731
        return jax.jit(jax.grad(loss))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads(looped), grads(scanned))
    lowered = {m.config.scan_layers: jax.jit(lambda m: m(ids)).lower(m).as_text() for m in (looped, scanned)}
    assert "stablehlo.while" in lowered[True] and "stablehlo.while" not in lowered[False]  # no stacked buffers
    with pytest.raises(ValueError, match="scan_layers=False takes remat_policy='none'"):
        looped.config.replace(remat_policy="dots")  # remat would save nothing inside the loop


def test_kv_cache_decoding_equals_full_forward_left_padded():
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(1))
    seqs = [_ids(1, 11, 64, seed=1)[0], _ids(1, 6, 64, seed=2)[0]]
    width = max(len(s) for s in seqs)
    prompt = np.zeros((2, width), np.int64)
    valid = np.zeros((2, width), bool)
    for b, s in enumerate(seqs):
        prompt[b, width - len(s):], valid[b, width - len(s):] = s, True
    decode = _ids(2, 4, 64, seed=3)
    cache = model.init_cache(2, width + decode.shape[1])
    logits, cache = model.extend(jnp.asarray(prompt), cache, jnp.asarray(valid))
    steps = [logits[:, -1]]
    for t in range(decode.shape[1]):
        logits, cache = model.extend(jnp.asarray(decode[:, t:t + 1]), cache)
        steps.append(logits[:, -1])
    for b, s in enumerate(seqs):
        full = np.asarray(model(jnp.asarray(np.concatenate([s, decode[b]])[None])))[0]
        expected = full[len(s) - 1:]
        got = np.stack([np.asarray(x[b]) for x in steps])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # The full forward with an explicit mask gives the same prefill logits on the left-padded batch.
    masked = np.asarray(model(jnp.asarray(prompt), attention_mask=jnp.asarray(valid)))
    for b, s in enumerate(seqs):
        alone = np.asarray(model(jnp.asarray(s[None])))[0]
        np.testing.assert_allclose(masked[b, width - len(s):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_and_its_gradient_equal_torch(dtype):
    """torch's exact GELU (what HF GPT-NeoX's "gelu" runs), in fp32 and in bf16 (computed in fp32, then rounded)."""
    x = np.concatenate([np.linspace(-12, 12, 2001), np.random.default_rng(0).normal(0, 3, 2000)]).astype(np.float32)
    g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    tx = torch.tensor(x).to(getattr(torch, dtype)).requires_grad_()
    torch.nn.functional.gelu(tx).backward(torch.tensor(g).to(tx.dtype))
    jx, jg = jnp.asarray(x, dtype), jnp.asarray(g, dtype)
    y, vjp = jax.vjp(gelu, jx)
    ulp = 1e-6 if dtype == "float32" else 2 ** -7  # bf16: at most one rounding step apart
    for ours, theirs in ((y, torch.nn.functional.gelu(tx)), (vjp(jg)[0], tx.grad)):
        ours, theirs = np.asarray(ours, np.float32), theirs.detach().float().numpy()
        np.testing.assert_allclose(ours, theirs, rtol=ulp, atol=1e-6)


def test_bf16_forward_is_as_close_to_fp32_as_hugging_faces_bf16(tmp_path):
    """bf16 weights and compute err from fp32 by rounding; ours may not err much more than HF's own bf16 model
    (a softmax or LayerNorm statistic left in bf16 would)."""
    hf = tiny_hf_model(seed=4)
    path = save_hf(hf, tmp_path / "hf")
    ids = _ids(2, 16, hf.config.vocab_size)
    fp32 = hf_logits(hf, ids)
    model = load_hf_model(path, dtype="bfloat16")
    assert model.layers.qkv_kernel[...].dtype == jnp.bfloat16
    ours = np.asarray(model(jnp.asarray(ids)), np.float32)
    theirs = hf_logits(hf.to(torch.bfloat16), ids)
    ours_error, their_error = np.abs(ours - fp32).max(), np.abs(theirs - fp32).max()
    assert 0 < ours_error <= 2 * their_error, (ours_error, their_error)
    assert (ours.argmax(-1) == fp32.argmax(-1)).mean() >= 0.95


def test_sharded_forward_equals_unsharded():
    assert jax.device_count() == 8
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(2))
    ids = jnp.asarray(_ids(8, 12, 64))
    expected = np.asarray(model(ids))
    mesh = parallel.make_mesh((1, 8, 1))
    with jax.set_mesh(mesh):
        parallel.shard_model(model, mesh)
        assert model.layers.up_kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
        batch = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        got = nnx.jit(lambda m, x: m(x))(model, batch)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_vocab_extension_matches_resize_token_embeddings(tmp_path):
    hf = tiny_hf_model(seed=6)
    ours = load_hf_model(save_hf(hf, tmp_path / "hf"))
    old_vocab = hf.config.vocab_size
    hf.resize_token_embeddings(old_vocab + 25, mean_resizing=False)
    extend_vocab(ours, old_vocab + 25, nnx.Rngs(0))
    hf_in = hf.gpt_neox.embed_in.weight.detach().numpy()
    hf_out = hf.get_output_embeddings().weight.detach().numpy()
    rows = ours.config.table_rows  # our tables are padded with zero rows (vocab_multiple)
    assert rows % 128 == 0 and hf_in.shape[0] < rows < hf_in.shape[0] + 128
    assert ours.embed_in[...].shape == (rows, hf_in.shape[1]) and ours.embed_out[...].T.shape == (rows, hf_in.shape[1])
    np.testing.assert_array_equal(np.asarray(ours.embed_in[...])[:old_vocab], hf_in[:old_vocab])
    np.testing.assert_array_equal(np.asarray(ours.embed_out[...]).T[:old_vocab], hf_out[:old_vocab])
    assert not np.asarray(ours.embed_in[...])[hf_in.shape[0]:].any()
    assert not np.asarray(ours.embed_out[...])[:, hf_in.shape[0]:].any()
    new_rows = np.asarray(ours.embed_in[...])[old_vocab:hf_in.shape[0]]
    assert 0.01 < new_rows.std() < 0.03 and abs(new_rows.mean()) < 0.01
    assert ours.config.vocab_size == old_vocab + 25
    ids = jnp.asarray(_ids(1, 8, old_vocab, seed=9))  # new rows are random on both sides
    np.testing.assert_allclose(np.asarray(ours(ids))[..., :old_vocab], hf_logits(hf, np.asarray(ids))[..., :old_vocab],
                               atol=1e-4, rtol=0)


def test_logits_refuse_an_id_range_past_the_vocabulary():
    """Past vocab_size lie the tables' zero padding rows, whose ids a sampler must never see."""
    cfg = GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    h = jnp.ones((1, 1, 32))
    assert model.logits(h).shape == (1, 1, 100) and model.logits(h, (90, 100)).shape == (1, 1, 10)
    with pytest.raises(ValueError, match=r"vocab_range \(90, 101\) is not a range of ids in \[0, 100\)"):
        model.logits(h, (90, 101))


def test_dolly_v2_3b_parameter_count_matches_transformers():
    from transformers import GPTNeoXConfig as HFConfig, GPTNeoXForCausalLM

    dolly = dict(vocab_size=50280, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                 intermediate_size=10240, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(HFConfig(**dolly))
        hf_before = sum(p.numel() for p in hf.parameters())
        hf.resize_token_embeddings(51305, mean_resizing=False)
        hf_after = sum(p.numel() for p in hf.parameters())
    cfg = GPTNeoXConfig(**dolly, vocab_multiple=1)

    def count(c):
        return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: GPTNeoX(c, rngs=nnx.Rngs(0))),
                                                                nnx.Param)))

    assert count(cfg) == hf_before
    assert count(cfg.replace(vocab_size=51305)) == hf_after
    padded = cfg.replace(vocab_size=51305, vocab_multiple=128)  # the default: 23 zero rows in each table
    assert padded.table_rows == 51328 and count(padded) == hf_after + 2 * 23 * 2560
    assert 2.77e9 < hf_after < 2.79e9
