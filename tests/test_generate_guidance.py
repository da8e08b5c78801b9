"""Classifier-free guidance for report→CXR: the compiled loop against transformers' full forward, its limits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcxr_jax import prompts
from llmcxr_jax.convert import load_hf_model
from llmcxr_jax.generate import Sampler, main
from llmcxr_jax.sampling import DecodeSpec, SamplingParams
from test_generate_common import REPORTS, hf_dir, small_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = small_tokenizer(num_image_codes=16)
    directory = hf_dir(tmp_path_factory.mktemp("hf"), tokenizer, seed=5)
    rng = np.random.default_rng(9)
    prompt_ids = [rng.integers(1, tokenizer.vocab_size, n).tolist() for n in (5, 19, 11, 8)]
    twins = [rng.integers(1, tokenizer.vocab_size, n).tolist() for n in (7, 3, 13, 8)]
    return tokenizer, directory, prompt_ids, twins


def hf_guided_greedy(directory, prompt_ids, twins, scale: float, steps: int) -> list[list[int]]:
    """Greedy guided decoding with transformers, one row at a time and no cache: argmax of u + s·(c - u)."""
    import transformers

    model = transformers.GPTNeoXForCausalLM.from_pretrained(directory).eval()
    rows = []
    for cond, uncond in zip(prompt_ids, twins):
        new: list[int] = []
        for _ in range(steps):
            with torch.no_grad():
                c = model(torch.as_tensor([cond + new])).logits[0, -1].double()
                u = model(torch.as_tensor([uncond + new])).logits[0, -1].double()
            new.append(int(torch.argmax(u + scale * (c - u))))
        rows.append(new)
    return rows


def test_guided_greedy_equals_transformers_reference(setup):
    tokenizer, directory, prompt_ids, twins = setup
    spec = DecodeSpec(12, SamplingParams(greedy=True), guidance_scale=2.5)
    ours = Sampler(load_hf_model(directory), tokenizer, batch_size=4).generate(
        prompt_ids, spec, seed=0, unconditional_ids=twins).ids
    ref = hf_guided_greedy(directory, prompt_ids, twins, 2.5, 12)
    for got, want in zip(ours, ref):
        assert got.tolist() == want
    plain = Sampler(load_hf_model(directory), tokenizer, batch_size=4).generate(
        prompt_ids, DecodeSpec(12, SamplingParams(greedy=True)), seed=0).ids
    assert any(a.tolist() != b.tolist() for a, b in zip(plain, ours))  # guidance changed some rows


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional(setup):
    tokenizer, directory, prompt_ids, twins = setup
    sampler = Sampler(load_hf_model(directory), tokenizer, batch_size=2)  # two batches: keys follow the rows
    sampling = SamplingParams(top_p=0.9)

    def sample(prompts_, scale=None, uncond=None):
        return [r.tolist() for r in sampler.generate(prompts_, DecodeSpec(16, sampling, guidance_scale=scale),
                                                     seed=4, unconditional_ids=uncond).ids]

    assert sample(prompt_ids, 1.0, twins) == sample(prompt_ids)
    assert sample(prompt_ids, 0.0, twins) == sample(twins)
    assert sample(prompt_ids, 3.0, twins) != sample(prompt_ids)


def test_report_to_cxr_guides_against_the_same_instruction_with_an_empty_report(setup):
    tokenizer, directory, _, _ = setup
    sampler = Sampler(load_hf_model(directory), tokenizer, image_grid=(4, 4), batch_size=4)
    instruction = prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST[2]
    unconditional = sampler.report_to_cxr([""] * 5, instruction=instruction, seed=3).codes
    guided_zero = sampler.report_to_cxr(REPORTS[:5], instruction=instruction, seed=3, guidance_scale=0.0).codes
    np.testing.assert_array_equal(guided_zero, unconditional)
    guided = sampler.report_to_cxr(REPORTS[:5], seed=3, guidance_scale=3.0)
    assert guided.codes.shape == (5, 4, 4) and guided.codes.min() >= 0 and guided.codes.max() < 16
    assert guided.tries == [1] * 5


def test_guidance_refuses_what_it_cannot_do(setup, tmp_path):
    tokenizer, directory, prompt_ids, twins = setup
    sampler = Sampler(load_hf_model(directory), tokenizer, image_grid=(4, 4), batch_size=4)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        DecodeSpec(8, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="give both or neither"):
        sampler.generate(prompt_ids, DecodeSpec(8, guidance_scale=2.0), seed=0)
    with pytest.raises(ValueError, match="give both or neither"):
        sampler.generate(prompt_ids, DecodeSpec(8), seed=0, unconditional_ids=twins)
    with pytest.raises(ValueError, match="3 unconditional prompts for 4 prompts"):
        sampler.generate(prompt_ids, DecodeSpec(8, guidance_scale=2.0), seed=0, unconditional_ids=twins[:3])
    with pytest.raises(ValueError, match="needs image_mode='constrained'"):
        sampler.report_to_cxr(REPORTS[:2], image_mode="resample", guidance_scale=2.0)
    with pytest.raises(SystemExit, match="--guidance_scale is only for report2cxr, not instruct"):
        main(["--checkpoint", str(directory), "--task", "instruct", "--input", "Hi", "--out", str(tmp_path),
              "--guidance_scale", "2", "--dtype", "float32"])
