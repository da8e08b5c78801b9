"""The demo's stages, each one call into the code a MIMIC-CXR user runs (see __main__.py for the order)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llmcxr_jax import config_files, metrics, prompts, train, train_vqgan
from llmcxr_jax.data import phantom
from llmcxr_jax.data.reports import parse_report
from llmcxr_jax.demo import page, phantom_mimic

SAMPLE_BATCH = 40
BASELINE_DRAWS = 10  # random baselines are averaged over this many draws (one draw of 200 varies by ±0.03)
# Report→CXR is sampled twice: as the original does, and with classifier-free guidance at this scale (not in
# the original; the demo LM trains its unconditional branch with data.report_dropout). Both are scored. The
# scale was chosen on 200 training phantoms of two runs (NOTES.md), not on the test phantoms.
GUIDANCE_SCALE = 4.0



def train_tokenizer(texts: list[str], vocab_size: int, num_codes: int) -> Any:
    """The demo's BPE; a `--tokenizer_vocab` too small for LLM-CXR's layout is the demo's error, not a traceback."""
    from llmcxr_jax.tokenizer import LlmCxrTokenizer, TokenizerLayoutError

    try:
        return LlmCxrTokenizer.train_small(texts, vocab_size=vocab_size, num_image_codes=num_codes)
    except TokenizerLayoutError as err:  # too few merges, e.g. for 'image' as one token
        raise SystemExit(f"error: --tokenizer_vocab {vocab_size} is too small for the phantom reports (the default "
                         f"1000 works): {err}") from None


def run(args: argparse.Namespace, out: Path, progress: Any) -> dict[str, Any]:
    vq_config = config_files.load_config("vqgan:demo")
    size = vq_config.model.resolution
    progress.stage(f"phantoms: {args.num_train} train + {args.num_test} test at {size}², laid out like MIMIC-CXR")
    cases = phantom_mimic.write_manual_dir(out / "manual", seed=args.seed, num_train=args.num_train,
                                           num_test=args.num_test, size=size)
    train_cases = [c for c in cases if c.split == "train"]
    test_cases = [c for c in cases if c.split == "test"]

    progress.stage(f"VQ-GAN: {args.vqgan_steps} steps of L1 + codebook loss (configs/vqgan.py:demo)")
    vq_config.train.update(num_steps=args.vqgan_steps, progress=True)
    vq_config.seed = args.seed
    if train_vqgan.run(vq_config, str(out / "vqgan_run")) is None:
        raise SystemExit("demo: VQ-GAN training stopped early (SIGTERM?); run `make demo` again to resume")
    vqgan_dir = out / "vqgan_run" / "export"

    progress.stage("encode: every phantom → codes (python -m vqgan_flax.encode)")
    from vqgan_flax import encode

    encode.main(["--vqgan", str(vqgan_dir), "--out", str(out / "manual" / "codes"), "--batch_size", "64",
                 str(out / "manual" / "images")])

    import vqgan_flax

    vqgan = vqgan_flax.load(vqgan_dir)
    grid, num_codes = vqgan.config.grid, vqgan.config.num_codes
    progress.stage(f"datasets: TFDS ArrayRecord builds of stage 1 and stage 2 ({grid[0]}×{grid[1]} codes)")
    builders = _build_datasets(out, grid, num_codes)

    progress.stage("tokenizer: a small BPE with LLM-CXR's token layout, trained on the phantom reports")
    texts = [c.report for c in train_cases] + list(prompts.CXR_VQ_INPUT_INSTRUCTION_LIST) + \
        list(prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST) + [prompts.PROMPT_WITH_INPUT_FORMAT]
    tokenizer = train_tokenizer(texts, args.tokenizer_vocab, num_codes)
    tokenizer.save(out / "tokenizer")

    common = dict(data_dir=str(out / "tfds"), tokenizer=str(out / "tokenizer"), vocab=tokenizer.vocab_size,
                  grid=grid[0], num_codes=num_codes, seed=args.seed, batch=args.lm_batch)
    progress.stage(f"LM stage 1: {args.stage1_steps} steps on FINDINGS+IMPRESSION, all tasks (configs/stage1.py:demo)")
    train.run(_lm_config("stage1", builders[0], args.stage1_steps, **common), str(out / "stage1"))
    _require_finished(out / "stage1", args.stage1_steps)
    progress.stage(f"LM stage 2: {args.stage2_steps} steps on IMPRESSION, seeded from stage 1")
    config2 = _lm_config("stage2", builders[1], args.stage2_steps, **common)
    config2.init.workdir = str(out / "stage1")
    train.run(config2, str(out / "stage2"))
    _require_finished(out / "stage2", args.stage2_steps)

    progress.stage(f"sampling: report→CXR and CXR→report for {len(test_cases)} test phantoms")
    generated = _sample(out, vqgan_dir, vqgan, test_cases, args.seed)

    progress.stage("scores: phantom judges against prior-matched baselines and the VQ-GAN ceiling")
    results = _score(vqgan, train_cases, test_cases, generated, args.seed)
    results["timing_s"] = round(time_since(progress), 1)
    page.write(out, test_cases, generated, results)
    return results


def _require_finished(workdir: Path, steps: int) -> None:
    """A run stopped by SIGTERM returns normally after its checkpoint; the demo must not go on without it."""
    from llmcxr_jax.checkpoint import TrainCheckpoints

    ckpts = TrainCheckpoints(workdir, read_only=True)
    latest = ckpts.latest_step()
    ckpts.close()
    if latest != steps:
        raise SystemExit(f"demo: training in {workdir} stopped at step {latest} of {steps} (a SIGTERM, or a run "
                         "there with other step counts); run `make demo` again to resume, or use another --out")


def time_since(progress: Any) -> float:
    import time

    return time.time() - progress.start


def _build_datasets(out: Path, grid: tuple[int, int], num_codes: int) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    from llmcxr_jax.data.mimic_builder import MimicCxrConfig, MimicCxrLlmcxr

    names = []
    for stage in (1, 2):
        config = MimicCxrConfig(name=f"phantoms_stage{stage}", stage=stage, grid=tuple(grid), num_codes=num_codes)
        builder = MimicCxrLlmcxr(config=config, data_dir=out / "tfds")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=out / "manual"))
        names.append(f"mimic_cxr_llmcxr/{config.name}")
        print(f"  {names[-1]}: {builder.info.metadata['counts']}", flush=True)
    return names[0], names[1]


def _lm_config(stage: str, builder: str, steps: int, *, data_dir: str, tokenizer: str, vocab: int, grid: int,
               num_codes: int, seed: int, batch: int):
    config = config_files.load_config(f"{stage}:demo")
    config.data.update(data_dir=data_dir, mimic_builder=builder)
    config.update(tokenizer=tokenizer, seed=seed)
    config.model.vocab_size = vocab
    config.vqgan.update(grid=grid, num_codes=num_codes)
    config.train.update(num_steps=steps, global_batch_size=batch)
    return config


def _sample(out: Path, vqgan_dir: Path, vqgan, test_cases, seed: int) -> dict[str, Any]:
    from llmcxr_jax.evaluate import REPORT_TOKENS as EVAL_REPORT_TOKENS  # the original's eval: 128
    from llmcxr_jax.generate import Sampler
    from vqgan_flax.codes import CodesDir

    sampler = Sampler.from_checkpoint(out / "stage2", vqgan_dir, dtype="float32", batch_size=SAMPLE_BATCH)
    codes_dir = CodesDir.open(out / "manual" / "codes")
    true_codes = np.stack([codes_dir[c.dicom_id] for c in test_cases])
    impressions = [parse_report(c.report, 2) for c in test_cases]
    images = sampler.report_to_cxr(impressions, seed=seed, progress=True)
    guided = sampler.report_to_cxr(impressions, seed=seed, guidance_scale=GUIDANCE_SCALE, progress=True)
    texts = sampler.cxr_to_report(codes=true_codes, seed=seed, progress=True, max_new_tokens=EVAL_REPORT_TOKENS)
    from vqgan_flax.images import postprocess

    return {"impressions": impressions, "generated_images": postprocess(images.images), "generated_codes": images.codes,
            "guided_images": postprocess(guided.images), "generated_reports": texts.texts, "true_codes": true_codes,
            "reconstructions": postprocess(np.asarray(vqgan.decode(true_codes)))}


def _score(vqgan, train_cases, test_cases, generated, seed: int) -> dict[str, Any]:
    truth = phantom_mimic.label_matrix(test_cases)
    train_truth = phantom_mimic.label_matrix(train_cases)
    names = phantom.LABELS
    freq = metrics.label_frequencies(train_truth)
    n = len(test_cases)
    reports = generated["generated_reports"]
    report_labels = phantom.report_label_array(reports)
    judge = phantom.train_image_judge(size=generated["generated_images"].shape[-1])
    rng = np.random.default_rng(seed)
    draws = [rng.choice(len(train_cases), n, replace=False) for _ in range(BASELINE_DRAWS)]
    train_images = np.stack([_read(train_cases[i].image_path) for draw in draws for i in draw])
    judged = judge.predict(train_images).reshape(BASELINE_DRAWS, n, len(names))
    true_images = np.stack([_read(c.image_path) for c in test_cases])
    scores = {
        "reports": {
            "generated": metrics.label_scores(truth, report_labels, names),
            "baseline_prior_random": _mean_scores(
                [metrics.label_scores(truth, metrics.prior_random_labels(freq, n, seed + k), names)
                 for k in range(BASELINE_DRAWS)]),
            "baseline_all_normal": metrics.label_scores(truth, metrics.all_normal_labels(n), names),
            # BLEU-1..4 and ROUGE-L against the impressions; findings are scored above, against the true labels
            **metrics.report_scores(reports, generated["impressions"], labeler=None),
        },
        "images": {
            "generated": metrics.label_scores(truth, judge.predict(generated["generated_images"]), names),
            f"generated_guided_{GUIDANCE_SCALE:g}": metrics.label_scores(
                truth, judge.predict(generated["guided_images"]), names),
            "baseline_prior_random_train_images": _mean_scores(
                [metrics.label_scores(truth, predicted, names) for predicted in judged]),
            "ceiling_vqgan_reconstructions": metrics.label_scores(
                truth, judge.predict(generated["reconstructions"]), names),
        },
        "vqgan": {
            "psnr_test_db": float(np.mean(metrics.psnr(true_images, generated["reconstructions"], data_range=255.0))),
            "codebook_usage_test": metrics.codebook_usage(generated["true_codes"],
                                                          vqgan.config.num_codes)._asdict(),
            "codebook_usage_generated": metrics.codebook_usage(generated["generated_codes"],
                                                               vqgan.config.num_codes)._asdict(),
        },
        "num_test": n, "num_train": len(train_cases), "baseline_draws": BASELINE_DRAWS,
        "guidance_scale": GUIDANCE_SCALE,
    }
    return scores


def _mean_scores(draws: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of several draws' scores, plus the spread of their macro-F1."""
    mean = {key: float(np.mean([d[key] for d in draws])) for key in draws[0]}
    return {**mean, "macro_f1_std": float(np.std([d["macro_f1"] for d in draws]))}


def _read(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))
