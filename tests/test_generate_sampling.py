"""The sampling loop and warpers against transformers: greedy `generate`, stop tokens, Top-k/Top-p warpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from llmcxr_jax import parallel
from llmcxr_jax.convert import load_hf_model
from llmcxr_jax.generate import Sampler
from llmcxr_jax.model import LayerStack
from llmcxr_jax.sampling import DecodeSpec, SamplingParams, select_tokens, top_k, warp_logits
from test_generate_common import hf_dir, small_tokenizer


def hf_warp(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The warpers `generate(do_sample=True)` builds, in its order and with its skip rules."""
    scores = torch.as_tensor(logits, dtype=torch.float32)
    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
              ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
    for warper in warpers:
        scores = warper(None, scores)
    return scores.numpy()


WARP_CASES = [(1.0, 0, 0.92), (0.7, 0, 0.5), (1.3, 20, 0.92), (1.0, 5, 1.0), (1.0, 0, 0.0), (0.5, 40, 0.3),
              (2.0, 0, 0.99)]


@pytest.mark.parametrize("scale", [0.5, 6.0], ids=["flat", "peaked"])
@pytest.mark.parametrize("temperature,top_k,top_p", WARP_CASES)
def test_warp_logits_equals_transformers_warpers(temperature, top_k, top_p, scale):
    logits = np.random.default_rng(int(10 * top_p + top_k)).standard_normal((8, 3000)).astype(np.float32) * scale
    expected = hf_warp(logits, temperature, top_k, top_p)
    kept = np.isfinite(expected)
    # Candidate sets smaller than, around and as large as the nucleus: the sorted fallback and the fast path agree.
    for candidates in (1, 16, 3000):
        got = np.asarray(warp_logits(jnp.asarray(logits), SamplingParams(temperature=temperature, top_k=top_k,
                                                                         top_p=top_p, candidates=candidates)))
        np.testing.assert_array_equal(np.isfinite(got), kept)
        np.testing.assert_allclose(got[kept], expected[kept], rtol=1e-6)
    assert 1 <= kept.sum(-1).min() and kept.sum(-1).max() <= 3000


def test_warp_cases_cover_both_top_p_paths():
    """The default top-p nucleus is wider than 16 candidates on flat logits and narrower on peaked ones."""
    rng = np.random.default_rng(0)
    flat = np.isfinite(hf_warp(rng.standard_normal((8, 3000)) * 0.5, 1.0, 0, 0.92)).sum(-1)
    peaked = np.isfinite(hf_warp(rng.standard_normal((8, 3000)) * 6.0, 1.0, 0, 0.92)).sum(-1)
    assert flat.min() > 16 and peaked.max() <= 16


@pytest.mark.parametrize("k", [1, 16, 41, 200, 500])
def test_blockwise_top_k_equals_lax_top_k(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((4, 51305)).astype(np.float32)
    x[2, rng.permutation(51305)[:51300]] = -np.inf  # 5 entries above -inf: fewer than k for most k
    x[3, :-3] = -np.inf  # 3 above -inf, in the last (padded) block: -inf ties reach its padding
    values, ids = top_k(jnp.asarray(x), k)
    expected_values, expected_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(values, expected_values)
    finite = np.isfinite(np.asarray(expected_values))
    np.testing.assert_array_equal(np.asarray(ids)[finite], np.asarray(expected_ids)[finite])
    assert 0 <= int(ids.min()) and int(ids.max()) < 51305


@pytest.mark.parametrize("candidates", [4, 40], ids=["over_vocabulary", "among_candidates"])
def test_sampled_frequencies_match_the_warped_distribution(candidates):
    # The nucleus has 11 of 40 ids: 4 candidates cannot hold it (draw over the vocabulary), 40 can.
    logits = np.random.default_rng(1).standard_normal(40).astype(np.float32)
    params = SamplingParams(temperature=1.2, top_k=15, top_p=0.8, candidates=candidates)
    expected = torch.softmax(torch.as_tensor(hf_warp(logits[None], 1.2, 15, 0.8))[0], -1).numpy().astype(np.float64)
    n = 50_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.jit(select_tokens, static_argnames="params")(jnp.broadcast_to(jnp.asarray(logits), (n, 40)), keys,
                                                            params=params)
    counts = np.bincount(np.asarray(draws), minlength=40)
    kept = expected > 0
    assert kept.sum() == 11 and counts[~kept].sum() == 0  # only the nucleus is ever drawn
    chi2 = ((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum()
    # Tolerance: the chi-square statistic stays below its 99.9% quantile (fixed seed, so deterministic).
    assert chi2 < scipy.stats.chi2.ppf(0.999, kept.sum() - 1)



@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_a_rows_draw_ignores_its_neighbours(temperature):
    """A peaked row (nucleus among the 16 candidates) draws the same token with the same key whether its batch
    holds only peaked rows or also a flat one (nucleus wider than the candidates: the row-by-row branch). With
    top-k on, every row's kept set lies among its candidates, so top-k needs no such case."""
    rng = np.random.default_rng(2)
    peaked = rng.standard_normal((1, 3000)).astype(np.float32) * 6.0
    flat = rng.standard_normal((1, 3000)).astype(np.float32) * 0.5
    params = SamplingParams(temperature=temperature, top_p=0.92, candidates=16)
    select = jax.jit(select_tokens, static_argnames="params")
    alone, beside_flat = [], []
    for seed in range(100):
        keys = jax.random.split(jax.random.key(seed), 2)
        alone.append(int(select(jnp.asarray(np.concatenate([peaked, peaked])), keys, params=params)[0]))
        beside_flat.append(int(select(jnp.asarray(np.concatenate([peaked, flat])), keys, params=params)[0]))
    assert alone == beside_flat and len(set(alone)) > 1

# ---- the loop against transformers' generate ---------------------------------------------------------------

PROMPT_LENGTHS = (5, 23, 9, 14)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = small_tokenizer(num_image_codes=16)
    directory = hf_dir(tmp_path_factory.mktemp("hf"), tokenizer, seed=3)
    rng = np.random.default_rng(7)
    prompt_ids = [rng.integers(1, tokenizer.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    return tokenizer, directory, prompt_ids


def hf_generate(directory, prompt_ids, max_new_tokens: int, eos: int | None) -> list[np.ndarray]:
    """transformers' greedy generate on a left-padded batch; each row's new tokens, trimmed after its eos."""
    import transformers

    model = transformers.GPTNeoXForCausalLM.from_pretrained(directory).eval()
    model.generation_config.eos_token_id = eos
    width = max(map(len, prompt_ids))
    ids = np.zeros((len(prompt_ids), width), np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompt_ids):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0).numpy()[:, width:]
    rows = []
    for row in out:
        hits = np.flatnonzero(row == eos) if eos is not None else []
        end = hits[0] + 1 if len(hits) else len(row)
        assert np.all(row[end:] == 0)  # transformers pads finished rows
        rows.append(row[:end])
    return rows


def test_greedy_equals_transformers_generate_on_left_padded_batch(setup):
    tokenizer, directory, prompt_ids = setup
    sampler = Sampler(load_hf_model(directory), tokenizer, batch_size=4)
    ours = sampler.generate(prompt_ids, DecodeSpec(40, SamplingParams(greedy=True)), seed=0).ids
    ref = hf_generate(directory, prompt_ids, 40, eos=None)
    assert all(len(r) == 40 for r in ref)
    for got, want in zip(ours, ref):
        np.testing.assert_array_equal(got, want)
    assert len({tuple(r) for r in ref}) == len(ref)  # rows differ, so a row mix-up would show


def test_prompt_and_new_tokens_may_fill_every_position_but_no_more(setup):
    """The last new token is never fed back: a 1,000-token prompt leaves room for 25 new ones at 1,024 positions
    (transformers generates them too); one more is refused before compiling, naming the input."""
    tokenizer, directory, prompt_ids = setup
    sampler = Sampler(load_hf_model(directory), tokenizer, batch_size=2)
    prompts = [prompt_ids[0], [int(t) for t in np.resize(prompt_ids[1], 1000)]]
    greedy = SamplingParams(greedy=True)
    assert len(sampler.generate(prompts, DecodeSpec(25, greedy), seed=0).ids[1]) == 25
    with pytest.raises(ValueError, match=r"^input 1: a prompt of 1000 tokens \+ max_new_tokens 26 - 1 exceeds the "
                                         r"model's max_position_embeddings 1024"):
        sampler.generate(prompts, DecodeSpec(26, greedy), seed=0)


def test_stop_token_ends_each_row_like_transformers(setup):
    tokenizer, directory, prompt_ids = setup
    sampler = Sampler(load_hf_model(directory), tokenizer, batch_size=4)
    free = sampler.generate(prompt_ids, DecodeSpec(40, SamplingParams(greedy=True)), seed=0).ids
    stop = int(free[0][5])  # a token row 0 emits at step 6 (maybe earlier): that row must stop there
    ours = sampler.generate(prompt_ids, DecodeSpec(40, SamplingParams(greedy=True), end_id=stop), seed=0)
    ref = hf_generate(directory, prompt_ids, 40, eos=stop)
    for got, want in zip(ours.ids, ref):
        np.testing.assert_array_equal(got, want)
    lengths = [len(r) for r in ours.ids]
    assert lengths[0] <= 6 and max(lengths) > lengths[0] and all(r[-1] == stop for r in ours.ids if len(r) < 40)


def test_seeded_sampling_is_reproducible_and_batch_independent(setup):
    tokenizer, directory, prompt_ids = setup
    model = load_hf_model(directory)
    spec = DecodeSpec(24, SamplingParams(), end_id=tokenizer.end_id)
    four = Sampler(model, tokenizer, batch_size=4)
    first = four.generate(prompt_ids, spec, seed=11).ids
    again = four.generate(prompt_ids, spec, seed=11).ids
    other = four.generate(prompt_ids, spec, seed=12).ids
    in_pairs = Sampler(model, tokenizer, batch_size=2).generate(prompt_ids, spec, seed=11).ids
    three = four.generate(prompt_ids[:3], spec, seed=11)  # e.g. the rows a resampling retry still needs
    assert three.timings[0]["compile_s"] == 0  # decoded by the four-row program: nothing new to compile
    for a, b, c, d in zip(first, again, in_pairs, three.ids + [first[3]]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(a, d)
    assert any(len(a) != len(o) or np.any(a != o) for a, o in zip(first, other))


def test_sampling_on_8_devices_equals_one_device(setup):
    tokenizer, directory, _ = setup
    assert jax.device_count() == 8
    rng = np.random.default_rng(8)
    prompt_ids = [rng.integers(1, tokenizer.vocab_size, n).tolist() for n in (3, 17, 8, 11, 25, 6, 9, 14)]
    spec = DecodeSpec(24, SamplingParams(top_k=30))
    one = Sampler(load_hf_model(directory), tokenizer, batch_size=8).generate(prompt_ids, spec, seed=5).ids
    mesh = parallel.make_mesh((1, 8, 1))
    model = load_hf_model(directory, mesh=mesh)
    sharded = Sampler(model, tokenizer, mesh=mesh, batch_size=8)
    assert isinstance(model.layers, LayerStack)  # the caller's model keeps its (training, checkpoint) layout
    blocks = sharded._state["layers"]["blocks"]  # decoding keeps one buffer per layer, each still sharded
    assert len(blocks) == 2
    for block in blocks.values():
        fsdp_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
        assert block["up_kernel"][...].sharding.is_equivalent_to(fsdp_rows, 2)
    eight = sharded.generate(prompt_ids, spec, seed=5).ids
    for a, b in zip(one, eight):
        np.testing.assert_array_equal(a, b)
