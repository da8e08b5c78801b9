"""Sampler tasks: constrained and resampled image generation, stop handling, the original's prompts and outputs."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from llmcxr_jax import prompts
from llmcxr_jax.convert import load_hf_model
from llmcxr_jax.generate import ImageGenerationError, Sampler
from llmcxr_jax.sampling import DecodeSpec, SamplingParams, decode, row_keys
from test_generate_common import REPORTS, constant_logits, hf_dir, small_tokenizer

GRID = (4, 4)


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer(num_image_codes=16)


@pytest.fixture(scope="module")
def directory(tmp_path_factory, tokenizer):
    return hf_dir(tmp_path_factory.mktemp("hf"), tokenizer, seed=1)


def logits_over(tokenizer, **groups: float) -> np.ndarray:
    """Constant logits: `text`, `image` and `end` set each group's logit (-30 when not given)."""
    logits = np.full(tokenizer.vocab_size, -30.0, np.float32)
    if "text" in groups:
        logits[:tokenizer.end_id] = groups["text"]
    if "image" in groups:
        logits[tokenizer.image_offset:] = groups["image"]
    if "end" in groups:
        logits[tokenizer.end_id] = groups["end"]
    return logits


def sampler_with(directory, tokenizer, logits=None, **kwargs) -> Sampler:
    model = load_hf_model(directory)
    if logits is not None:
        constant_logits(model, logits)
    return Sampler(model, tokenizer, image_grid=GRID, batch_size=4, **kwargs)


@pytest.mark.parametrize("bias", ["random", "text_and_end"])
def test_constrained_mode_always_yields_the_grid(directory, tokenizer, bias):
    # "text_and_end": image ids are 30 nats below text and `### End`, so free sampling would never draw one.
    logits = None if bias == "random" else logits_over(tokenizer, text=0.0, end=2.0, image=-30.0)
    sampler = sampler_with(directory, tokenizer, logits)
    result = sampler.report_to_cxr(REPORTS[:5], seed=3)
    assert result.codes.shape == (5, *GRID) and result.codes.dtype == np.int32
    assert result.codes.min() >= 0 and result.codes.max() < tokenizer.num_image_codes
    assert len(np.unique(result.codes)) > 4 and result.tries == [1] * 5 and result.images is None
    close = [tokenizer.image_placeholder_ids[2], *tokenizer.encode("\n\n" + prompts.END_KEY)]
    for i, response in enumerate(result.responses):
        assert response[0] == tokenizer.image_placeholder_ids[0] and response[-len(close):].tolist() == close
        prompt = prompts.generation_prompt_ids(tokenizer, result.instructions[i], input_text=REPORTS[i])
        # The original's extraction reads the same codes back, and the response decodes as the training text.
        extracted = prompts.extract_image_codes(tokenizer, prompt + response.tolist(), 16)
        assert extracted == result.codes[i].ravel().tolist()
        assert tokenizer.decode(response) == "<>\n\n### End"


def test_resample_mode_redraws_rows_until_they_yield_the_grid(directory, tokenizer):
    # Each step: one of 16 image ids, or `### End` with probability ~0.04, so ~half the rows end too early.
    logits = logits_over(tokenizer, image=0.0, end=float(np.log(16 * 0.04 / 0.96)))
    sampler = sampler_with(directory, tokenizer, logits, sampling=SamplingParams(top_p=1.0))
    result = sampler.report_to_cxr(REPORTS[:6], seed=0, image_mode="resample", max_tries=30, max_new_tokens=16)
    assert max(result.tries) > 1 and min(result.tries) >= 1
    for codes, response in zip(result.codes, result.responses):
        assert response.tolist() == tokenizer.codes_to_ids(codes.ravel())


def test_resample_mode_gives_up_after_max_tries(directory, tokenizer):
    # 17 image ids per row, never 16: every row fails every try.
    sampler = sampler_with(directory, tokenizer, logits_over(tokenizer, image=0.0))
    with pytest.raises(ImageGenerationError, match=r"3 of 3 rows did not yield exactly 16 image codes in 2 tries") as e:
        sampler.report_to_cxr(REPORTS[:3], seed=0, image_mode="resample", max_tries=2, max_new_tokens=17)
    assert e.value.failed_rows == [0, 1, 2] and e.value.codes == [None] * 3


def test_rows_stop_at_end_and_are_padded(directory, tokenizer):
    model = constant_logits(load_hf_model(directory), logits_over(tokenizer, text=0.0, end=float(np.log(40.0))))
    spec = DecodeSpec(64, SamplingParams(), end_id=tokenizer.end_id, pad_id=tokenizer.pad_id)
    ids = jnp.ones((6, 8), jnp.int32)
    tokens, steps = nnx.jit(decode, static_argnames="spec")(model, ids, jnp.ones((6, 8), bool),
                                                             row_keys(jnp.uint32(0), jnp.arange(6)), spec=spec)
    tokens = np.asarray(tokens)
    ends = [int(np.flatnonzero(row == tokenizer.end_id)[0]) for row in tokens]
    assert len(set(ends)) > 1 and int(steps) == max(ends) + 1 < 64  # the loop stops once every row has ended
    for row, end in zip(tokens, ends):
        assert np.all(row[end + 1:] == tokenizer.pad_id) and np.all(row[:end] < tokenizer.end_id)


def test_loop_draws_follow_the_warped_distribution(directory, tokenizer):
    """Draws across steps (fresh keys each step) and rows match the top-p distribution of constant logits."""
    logits = np.full(tokenizer.vocab_size, -30.0, np.float32)
    logits[:12] = np.random.default_rng(2).standard_normal(12)
    model = constant_logits(load_hf_model(directory), logits)
    spec = DecodeSpec(200, SamplingParams(top_p=0.8))
    ids = jnp.ones((8, 4), jnp.int32)
    tokens, _ = nnx.jit(decode, static_argnames="spec")(model, ids, jnp.ones((8, 4), bool),
                                                        row_keys(jnp.uint32(1), jnp.arange(8)), spec=spec)
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=tokenizer.vocab_size)
    order = np.argsort(-logits[:12])
    probs = np.exp(logits[:12] - logits[:12].max())
    probs /= probs.sum()
    above = np.cumsum(probs[order]) - probs[order]
    nucleus = order[above < 0.8]  # HF's rule for well-separated values: keep while the mass above is < top_p
    expected = np.zeros(tokenizer.vocab_size)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert counts[expected == 0].sum() == 0 and len(nucleus) >= 3
    n = counts.sum()
    chi2 = ((counts[nucleus] - n * expected[nucleus]) ** 2 / (n * expected[nucleus])).sum()
    assert chi2 < scipy.stats.chi2.ppf(0.999, len(nucleus) - 1)  # tolerance: the 99.9% quantile


def test_text_tasks_use_the_original_prompts_and_post_processing(directory, tokenizer):
    sampler = sampler_with(directory, tokenizer, sampling=SamplingParams(greedy=True))
    codes = np.random.default_rng(0).integers(0, 16, (3, *GRID))
    reports = sampler.cxr_to_report(codes=codes, seed=9, max_new_tokens=12)
    assert reports.instructions == [prompts.choose_instruction(9, str(i), "cxr2report") for i in range(3)]
    assert set(reports.instructions) <= set(prompts.CXR_VQ_INPUT_INSTRUCTION_LIST)
    spec = DecodeSpec(12, SamplingParams(greedy=True), end_id=tokenizer.end_id)
    ids = [prompts.generation_prompt_ids(tokenizer, i, image_codes=c) for i, c in zip(reports.instructions, codes)]
    new = sampler.generate(ids, spec, seed=9).ids
    assert reports.texts == [prompts.extract_response_text(tokenizer, p + n.tolist()) for p, n in zip(ids, new)]
    assert all(isinstance(t, str) for t in reports.texts) and any(reports.texts)
    answer = sampler.instruct("Describe the heart.", max_new_tokens=12, seed=9)
    with_input = sampler.instruct("Summarize.", REPORTS[:2], max_new_tokens=12, seed=9)
    assert answer.instructions == ["Describe the heart."] and with_input.instructions == ["Summarize."] * 2
    for result, inputs in ((answer, [None]), (with_input, REPORTS[:2])):  # Dolly's prompts, same post-processing
        ids = [prompts.generation_prompt_ids(tokenizer, i, input_text=x) for i, x in zip(result.instructions, inputs)]
        new = sampler.generate(ids, spec, seed=9).ids
        assert result.texts == [prompts.extract_response_text(tokenizer, p + n.tolist()) for p, n in zip(ids, new)]
    per_row = ["Read this image.", "Describe this image.", "Report."]
    assert sampler.cxr_to_report(codes=codes, instruction=per_row, max_new_tokens=4).instructions == per_row
    with pytest.raises(ValueError, match="2 instructions for 3 inputs"):
        sampler.cxr_to_report(codes=codes, instruction=per_row[:2])
    with pytest.raises(ValueError, match="image_grid"):
        Sampler(load_hf_model(directory), tokenizer).report_to_cxr(REPORTS[:1])
    with pytest.raises(ValueError, match="no VQ-GAN"):
        sampler.cxr_to_report(np.zeros((1, 32, 32, 3), np.float32))
    empty = sampler.cxr_to_report(codes=np.zeros((0, *GRID), np.int32), max_new_tokens=4)
    assert empty.texts == [] and empty.instructions == []
    assert sampler.report_to_cxr([]).codes.shape == (0, *GRID)
