"""The protocol runner driving the real `llmcxr_jax.generate.Sampler` (a tiny random GPT-NeoX, codes only)
through `evaluate.GenerateSampler`: the calls it makes and the records they give. Model quality is not tested;
a random model's report→CXR never yields a full image when sampling freely, which tests the no-image path.
"""
from __future__ import annotations

import dataclasses

import pytest

from llmcxr_jax.convert import load_hf_model
from llmcxr_jax.evaluate import GenerateSampler, read_results, run_mimic_protocol, select_mimic_eval
from llmcxr_jax.generate import Sampler
from llmcxr_jax.prompts import choose_instruction
from mimic_fixture import GRID, NUM_CODES, write_mimic_tree
from test_generate_common import hf_dir, small_tokenizer

SEED = 42


@pytest.fixture(scope="module")
def tiny_sampler(tmp_path_factory):
    tokenizer = small_tokenizer(NUM_CODES)
    directory = hf_dir(tmp_path_factory.mktemp("lm"), tokenizer)
    return Sampler(load_hf_model(directory), tokenizer, image_grid=GRID, batch_size=2)


@pytest.fixture
def selection(tmp_path):
    fx = write_mimic_tree(tmp_path / "mimic", codes_format="dir")
    return select_mimic_eval(fx.root, fx.codes_path, frozenset(i.dicom_id for i in fx.images))


def _spy(sampler, calls):
    """Record the instruction and batch size of every call the adapter makes to the real sampler."""
    class Spy:
        def cxr_to_report(self, **kw):
            calls.append(("cxr2report", kw["instruction"], len(kw["codes"]), kw["max_new_tokens"]))
            return sampler.cxr_to_report(**kw)

        def report_to_cxr(self, reports, **kw):
            calls.append(("report2cxr", kw["instruction"], len(reports), kw["max_new_tokens"]))
            return sampler.report_to_cxr(reports, **kw)
    return Spy()


def test_generate_sampler_runs_the_protocol_with_a_tiny_model(tiny_sampler, selection, tmp_path):
    calls = []
    adapter = GenerateSampler(_spy(tiny_sampler, calls), image_mode="constrained")
    summary = run_mimic_protocol(selection, lambda: adapter, tmp_path / "out", seed=SEED, batch_size=2)
    records = read_results(summary.path)
    assert [r["dicom_id"] for r in records] == [i.dicom_id for i in selection.items]
    for record in records:
        assert isinstance(record["gen_report"], str)
        assert len(record["gen_image"]) == GRID[0] * GRID[1] and 0 <= min(record["gen_image"])
        assert max(record["gen_image"]) < NUM_CODES
    expected = []  # one call per direction and batch of two, each row with its own instruction
    for start in range(0, len(selection.items), 2):
        ids = [i.dicom_id for i in selection.items[start:start + 2]]
        for direction, tokens in (("cxr2report", 128), ("report2cxr", 300)):
            expected.append((direction, [choose_instruction(SEED, i, direction) for i in ids], len(ids), tokens))
    assert calls == expected


def test_generate_sampler_records_no_image_when_resampling_runs_out(tiny_sampler, selection, tmp_path):
    adapter = GenerateSampler(tiny_sampler, image_mode="resample", max_tries=1)
    one = dataclasses.replace(selection, items=selection.items[:1])
    records = read_results(run_mimic_protocol(one, lambda: adapter, tmp_path / "out", seed=SEED).path)
    assert records[0]["gen_image"] is None and isinstance(records[0]["gen_report"], str)


def test_generate_sampler_keeps_the_images_of_rows_that_succeeded():
    """Resampling that runs out for one row of a batch takes only that row's image, not its neighbours'."""
    from llmcxr_jax.generate import ImageGenerationError

    class OneRowFails:
        def report_to_cxr(self, reports, **kw):
            raise ImageGenerationError("1 of 2 rows did not yield an image", [1], [[3] * 16, None])

    adapter = GenerateSampler(OneRowFails())
    assert adapter.report_to_cxr(["a", "b"], seed=0, instructions=["i", "j"], max_new_tokens=300) == [[3] * 16, None]
