"""The demo's own pieces: phantoms written as MIMIC-CXR files go through the real MIMIC builder untouched."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llmcxr_jax.data.mimic_builder import MimicCxrConfig, MimicCxrLlmcxr
from llmcxr_jax.data.phantom import LABELS, make_phantom
from llmcxr_jax.data.reports import parse_report
from llmcxr_jax.demo import phantom_mimic
from vqgan_flax.codes import CodesMeta, CodesWriter


@pytest.mark.parametrize("args,message", [(["--stage2_steps", "0"], "--stage2_steps 0: must be at least 1"),
                                          (["--num_train", "0", "--lm_batch", "-1"],
                                           "--num_train 0, --lm_batch -1: must be at least 1"),
                                          (["--out", "{file}"], "--out {file} exists and is not a directory"),
                                          (["--num_train", "3", "--num_test", "5"],
                                           "--num_test 5 exceeds --num_train 3"),
                                          (["--seed", "-1"], "--seed -1: must be >= 0")])
def test_demo_flags_out_of_range_are_refused_before_any_work(tmp_path, capsys, args, message):
    from llmcxr_jax.demo.__main__ import parse_args

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        parse_args([a.replace("{file}", str(tmp_path / "file")) for a in args])
    assert message.replace("{file}", str(tmp_path / "file")) in capsys.readouterr().err


def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path):
    """Rerunning into --out resumes its finished stages, which are only this run's if every setting is the same."""
    from llmcxr_jax.demo.__main__ import claim_out, parse_args, settings_of

    out = tmp_path / "demo_out"
    claim_out(out, settings_of(parse_args(["--out", str(out)])))
    claim_out(out, settings_of(parse_args(["--out", str(out)])))  # the same run again: resumed
    with pytest.raises(SystemExit, match=r"--out \S+demo_out holds a demo run with other settings \(--seed 0 there, "
                                         r"1 now; --stage2_steps 1700 there, 1800 now\)"):
        claim_out(out, settings_of(parse_args(["--out", str(out), "--stage2_steps", "1800", "--seed", "1"])))


def test_a_tokenizer_vocabulary_too_small_for_the_layout_is_the_demos_error():
    from llmcxr_jax.demo.pipeline import train_tokenizer

    texts = ["No acute cardiopulmonary process. Heart size normal."] * 10
    with pytest.raises(SystemExit, match=r"^error: --tokenizer_vocab 260 is too small for the phantom reports"):
        train_tokenizer(texts, 260, 64)
    assert train_tokenizer(texts, 300, 64).text_vocab_size == 304


def test_phantoms_as_mimic_files_build_with_the_mimic_builder(tmp_path):
    cases = phantom_mimic.write_manual_dir(tmp_path / "manual", seed=3, num_train=6, num_test=2, size=32)
    assert [c.split for c in cases] == ["train"] * 6 + ["test"] * 2
    first = make_phantom(3, 0, 32)
    assert cases[0].report == first.report and cases[0].labels == tuple(first.labels[k] for k in LABELS)
    stored = json.loads((tmp_path / "manual" / "labels.json").read_text())
    assert stored["labels"] == list(LABELS) and len(stored["cases"]) == 8
    meta = CodesMeta(fingerprint="demo-test", grid=(2, 2), num_codes=8, recipe={"name": "test"})
    CodesWriter(tmp_path / "manual" / "codes", meta).write([c.dicom_id for c in cases],
                                                          np.arange(32, dtype=np.int16).reshape(8, 2, 2) % 8)
    for stage in (1, 2):
        config = MimicCxrConfig(name=f"t{stage}", stage=stage, grid=(2, 2), num_codes=8)
        builder = MimicCxrLlmcxr(config=config, data_dir=tmp_path / "tfds")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "manual"))
        counts = builder.info.metadata["counts"]
        assert counts["train"]["kept"] == 6 and counts["validation"]["kept"] == 2, counts
        records = tfds.data_source(f"mimic_cxr_llmcxr/t{stage}", data_dir=tmp_path / "tfds", split="validation")
        assert {r["report"].decode() for r in records} == {parse_report(c.report, stage) for c in cases[6:]}


def test_random_baselines_are_averaged_and_the_page_shows_every_score(tmp_path):
    from llmcxr_jax.demo import page, pipeline

    draws = [{"macro_f1": 0.1, "micro_f1": 0.2}, {"macro_f1": 0.3, "micro_f1": 0.4}]
    assert pipeline._mean_scores(draws) == pytest.approx({"macro_f1": 0.2, "micro_f1": 0.3, "macro_f1_std": 0.1})
    cases = [phantom_mimic.Case(f"d{i}", "test", str(tmp_path / "manual" / "images" / f"d{i}.png"), "IMPRESSION: x",
                                (0,) * len(LABELS)) for i in range(2)]
    for case in cases:
        Path(case.image_path).parent.mkdir(parents=True, exist_ok=True)
        Path(case.image_path).write_bytes(b"png")
    generated = {"generated_images": np.zeros((2, 8, 8), np.uint8), "reconstructions": np.zeros((2, 8, 8), np.uint8),
                 "guided_images": np.zeros((2, 8, 8), np.uint8), "impressions": ["a <b>", "c"],
                 "generated_reports": ["r1", "r2"]}
    score = {"macro_f1": 0.25, "micro_f1": 0.5}
    results = {"reports": {"generated": score, "baseline_prior_random": {**score, "macro_f1": 0.125},
                           "bleu4": 0.1, "rougeL": 0.2},
               "images": {"generated": score, "generated_guided_2": score,
                          "baseline_prior_random_train_images": score},
               "vqgan": {"psnr_test_db": 20.0, "codebook_usage_test": {"perplexity": 3.0}},
               "num_train": 5, "num_test": 2, "timing_s": 12.0, "baseline_draws": 10, "guidance_scale": 2.0}
    text = page.write(tmp_path, cases, generated, results).read_text()
    assert "means over 10 draws" in text and "a &lt;b&gt;" in text
    assert text.count("<td>baseline_prior_random") == 2 and "<td>0.125</td>" in text
    assert "<td>generated_guided_2</td>" in text and "guidance at scale\n2 against" in text
    assert (tmp_path / "images" / "d1_generated.png").is_file() and (tmp_path / "images" / "d1_guided.png").is_file()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 2 * 5 and all((tmp_path / src).is_file() for src in sources), sources
