"""`python -m llmcxr_jax.generate` end to end on tiny random weights, and checkpoint/VQ-GAN loading rules."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import vqgan_flax
from llmcxr_jax import checkpoint, generate, prompts
from llmcxr_jax.convert import load_hf_model
from llmcxr_jax.generate import Sampler
from llmcxr_jax.sampling import SamplingParams
from test_generate_common import REPORTS, hf_dir, small_tokenizer
from vqgan_flax.config import PRESETS
from vqgan_flax.images import load_image, postprocess, preprocess

TINY_VQGAN = PRESETS["tiny"]  # 32² images, 16×16 codes from 64 entries


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """An HF directory, its converted checkpoint recording the VQ-GAN, a training workdir, and two VQ-GANs."""
    root = tmp_path_factory.mktemp("generate_cli")
    tokenizer = small_tokenizer(TINY_VQGAN.num_codes)
    vqgans = {}
    for name, seed in (("vqgan", 0), ("other_vqgan", 1)):
        params = vqgan_flax.checkpoint.random_params(TINY_VQGAN, seed)
        vqgan_flax.checkpoint.write(root / name, TINY_VQGAN, params)
        vqgans[name] = root / name
    hf = hf_dir(root / "hf", tokenizer, seed=2)
    meta = {"vqgan_fingerprint": vqgan_flax.checkpoint.read_fingerprint(vqgans["vqgan"]),
            "vqgan_grid": list(TINY_VQGAN.grid), "token_layout": dataclasses.asdict(tokenizer.layout)}
    model = load_hf_model(hf)
    checkpoint.save_model(model, root / "ckpt", extra_metadata=meta)
    tokenizer.save(root / "ckpt")
    workdir = checkpoint.TrainCheckpoints(root / "workdir", every=1, keep=1, async_save=False)
    workdir.save(7, {"model": nnx.to_pure_dict(nnx.state(model, nnx.Param))}, {},
                 checkpoint.model_metadata(model.config, meta))
    workdir.close()
    tokenizer.save(root / "workdir")
    return {"hf": hf, "ckpt": root / "ckpt", "workdir": root / "workdir", **vqgans}


def run_cli(dirs, out: Path, *args: str) -> list[dict]:
    generate.main(["--checkpoint", str(dirs["ckpt"]), "--vqgan", str(dirs["vqgan"]), "--out", str(out),
                   "--dtype", "float32", "--batch_size", "2", *args])
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_cli_report_to_cxr_writes_pngs_and_reproduces(dirs, tmp_path):
    args = ("--task", "report2cxr", "--input", REPORTS[0], "--input", REPORTS[4], "--input", REPORTS[8],
            "--seed", "5")
    first = run_cli(dirs, tmp_path / "a", *args)
    again = run_cli(dirs, tmp_path / "b", *args)
    assert [r["index"] for r in first] == [0, 1, 2] and [r["input"] for r in first] == [REPORTS[i] for i in (0, 4, 8)]
    for r, s in zip(first, again):
        codes = np.asarray(r["output"])
        assert codes.shape == TINY_VQGAN.grid and 0 <= codes.min() and codes.max() < TINY_VQGAN.num_codes
        assert r["output"] == s["output"] and r["instruction"] == s["instruction"] and r["seed"] == 5
        assert r["task"] == "report2cxr" and r["timings"]["steps"] == 256 and r["timings"]["generate_s"] > 0
        png = Image.open(tmp_path / "a" / r["image"])
        assert png.size == (TINY_VQGAN.resolution, TINY_VQGAN.resolution)
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / s["image"]).read_bytes()
    assert first[0]["output"] != first[1]["output"]
    # each PNG is its own row's codes through the VQ-GAN (the sampler decodes in device-sized chunks)
    vqgan = vqgan_flax.load(dirs["vqgan"])
    expected = postprocess(np.asarray(nnx.jit(vqgan_flax.VQGAN.decode)(
        vqgan, np.asarray([r["output"] for r in first], np.int32))))
    for r, want in zip(first, expected):
        png = np.asarray(Image.open(tmp_path / "a" / r["image"]))
        assert np.abs(png.astype(int) - want).max() <= 1, r["index"]  # float rounding only


def test_cli_cxr_to_report_and_instruct_write_text(dirs, tmp_path, capsys):
    images = []
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48), dtype=np.uint8)
        images.append(tmp_path / f"cxr{i}.png")
        Image.fromarray(pixels).save(images[-1])
    args = ("--task", "cxr2report", "--max_new_tokens", "16", *map(str, images))
    reports = run_cli(dirs, tmp_path / "reports", *args)
    again = run_cli(dirs, tmp_path / "reports_again", *args)
    assert [(r["output"], r["instruction"]) for r in reports] == [(r["output"], r["instruction"]) for r in again]
    assert [r["input"] for r in reports] == list(map(str, images))
    assert all(isinstance(r["output"], str) for r in reports) and any(r["output"] for r in reports)
    # each report is the one for its own image's codes, encoded directly
    vqgan = vqgan_flax.load(dirs["vqgan"])
    pixels = np.stack([preprocess(load_image(path), TINY_VQGAN.resolution) for path in images])
    codes = np.asarray(nnx.jit(vqgan_flax.VQGAN.encode)(vqgan, pixels))
    sampler = Sampler.from_checkpoint(dirs["ckpt"], dirs["vqgan"], dtype="float32", batch_size=2)
    direct = sampler.cxr_to_report(codes=codes, instruction=[r["instruction"] for r in reports],
                                   seed=reports[0]["seed"], max_new_tokens=16)
    assert [r["output"] for r in reports] == direct.texts
    lines = tmp_path / "questions.txt"
    # Notepad's BOM and CRLFs; a form feed inside a line is no line break (str.splitlines() made it one)
    lines.write_bytes("\ufeffWhat is an effusion?\r\n\r\nDescribe the\x0cheart.\r\n".encode("utf-8"))
    answers = run_cli(dirs, tmp_path / "answers", "--task", "instruct", "--input_file", str(lines),
                      "--max_new_tokens", "16", "--top_k", "20", "--temperature", "0.8", "--mesh", "1,-1,1")
    assert [r["instruction"] for r in answers] == ["What is an effusion?", "Describe the\x0cheart."]
    questions = [r["instruction"] for r in answers]

    def direct(sampling: SamplingParams) -> list[str]:
        sampler = Sampler.from_checkpoint(dirs["ckpt"], dirs["vqgan"], dtype="float32", batch_size=2,
                                          sampling=sampling)
        return sampler.instruct(questions, max_new_tokens=16, seed=prompts.DEFAULT_SEED).texts

    # the flags reach the sampler: the same draws as a direct call with them, not those of the defaults
    assert [r["output"] for r in answers] == direct(SamplingParams(top_k=20, temperature=0.8))
    assert [r["output"] for r in answers] != direct(SamplingParams())
    printed = capsys.readouterr().out  # text outputs are shown, not only written
    assert all(f"[{r['index']}] {r['output']}\n" in printed for r in answers)


def test_cli_names_the_image_that_is_too_small(dirs, tmp_path):
    good, small = tmp_path / "good.png", tmp_path / "small.png"
    Image.fromarray(np.full((40, 48), 128, np.uint8)).save(good)
    Image.fromarray(np.full((20, 24), 128, np.uint8)).save(small)  # the tiny VQ-GAN takes 32²
    with pytest.raises(SystemExit, match=r"small.png: image is 20x24: short side 20 < 32"):
        run_cli(dirs, tmp_path / "out", "--task", "cxr2report", str(good), str(small))
    with pytest.raises(SystemExit, match=r"missing.png: cannot open: \[Errno 2\] No such file"):
        run_cli(dirs, tmp_path / "out", "--task", "cxr2report", str(good), str(tmp_path / "missing.png"))


def test_cli_resample_failure_still_writes_what_came_back(dirs, tmp_path):
    """Random weights draw text ids too, so 256 new tokens never hold the 16x16 grid's 256 image ids: every row
    fails, and each is recorded with its error."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"2 of 2 rows did not yield .* the rows that came back are in .*results"):
        run_cli(dirs, out, "--task", "report2cxr", "--image_mode", "resample", "--max_tries", "1",
                "--max_new_tokens", "256", "--input", REPORTS[0], "--input", REPORTS[1])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["index"], r["input"], r["output"], r["error"]) for r in records] == [
        (0, REPORTS[0], None, "no full image grid"), (1, REPORTS[1], None, "no full image grid")]



@pytest.mark.parametrize("args,message", [
    (("--task", "instruct", "--input", "x", "--max_new_tokens", "0"), "--max_new_tokens must be >= 1, got 0"),
    (("--task", "instruct", "--input", "x", "--instruction", " "), "--instruction is empty"),
    (("--task", "instruct", "--input_file", "{tmp}"), "Is a directory: '{tmp}'"),
    (("--task", "instruct", "--input_file", "{tmp}/file"), "--input_file {tmp}/file: no inputs in it"),
    (("--task", "instruct", "--input_file", "{tmp}/latin1"), "{tmp}/latin1:2: not UTF-8 text: byte 0xe9"),
    (("--task", "instruct", "--input", "x", "--temperature", "inf"), "temperature must be a finite number > 0"),
    (("--task", "instruct", "--input", "x", "--out", "{tmp}/file"), "--out {tmp}/file exists and is not a directory"),
    (("--task", "report2cxr", "--input", "x", "--image_mode", "resample", "--max_tries", "0"),
     "max_tries must be >= 1, got 0"),
    (("--task", "report2cxr", "--input", "x", "--image_mode", "resample", "--max_new_tokens", "8"),
     "max_new_tokens=8 cannot hold an image of 256 codes"),
])
def test_cli_input_mistakes_are_one_line(dirs, tmp_path, args, message):
    (tmp_path / "file").write_text(" \n\n")
    (tmp_path / "latin1").write_bytes("fine\ncaf\u00e9\n".encode("latin-1"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dirs, tmp_path / "out", *args)
    assert str(exit_info.value).startswith("error: ")
    assert message.replace("{tmp}", str(tmp_path)) in str(exit_info.value)


def test_empty_inputs_give_empty_results_with_a_vqgan_and_greedy_ignores_temperature(dirs):
    sampler = Sampler.from_checkpoint(dirs["ckpt"], dirs["vqgan"], dtype="float32", batch_size=2,
                                      sampling=SamplingParams(greedy=True, temperature=0.0))  # as HF's generate
    empty = sampler.report_to_cxr([])
    assert empty.codes.shape == (0, *TINY_VQGAN.grid) and empty.images.shape == (0, 32, 32, 3)
    assert sampler.cxr_to_report(np.zeros((0, 32, 32, 3), np.float32)).texts == []
    plain_greedy = Sampler.from_checkpoint(dirs["ckpt"], dirs["vqgan"], dtype="float32", batch_size=2,
                                           sampling=SamplingParams(greedy=True))
    question = ["Describe the heart."]
    assert (sampler.instruct(question, max_new_tokens=4).texts
            == plain_greedy.instruct(question, max_new_tokens=4, seed=1).texts)


def test_cli_refuses_a_vqgan_with_another_fingerprint(dirs, tmp_path, capsys):
    with pytest.raises(SystemExit, match="fingerprint .* differs from vqgan_fingerprint"):
        generate.main(["--checkpoint", str(dirs["ckpt"]), "--vqgan", str(dirs["other_vqgan"]), "--task",
                       "report2cxr", "--input", REPORTS[0], "--out", str(tmp_path), "--dtype", "float32"])
    with pytest.raises(SystemExit, match="not a model"):
        generate.main(["--checkpoint", str(tmp_path), "--task", "instruct", "--input", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(tmp_path), "--task", "instruct", "--input", "x", "--out", str(tmp_path),
                       "--mesh", "1,x"])
    assert "argument --mesh: '1,x' is not comma-separated integers" in capsys.readouterr().err



def test_a_vqgan_workdir_is_not_taken_for_a_language_model(tmp_path):
    workdir = checkpoint.TrainCheckpoints(tmp_path / "vq_run", every=1, keep=1, async_save=False)
    workdir.save(3, {"gen": {"w": np.zeros(2, np.float32)}}, {}, {"task": "vqgan", "vqgan_config": {}})
    workdir.close()
    with pytest.raises(SystemExit, match=r"^error: .*vq_run.*: a VQ-GAN training workdir \(its metadata has no "
                                         r"model_config\); give an LM checkpoint"):
        generate.main(["--checkpoint", str(tmp_path / "vq_run"), "--task", "instruct", "--input", "x", "--out",
                       str(tmp_path / "out")])

def test_training_attention_and_remat_choices_do_not_reach_the_sampler(dirs, tmp_path):
    """A model trained with attention_impl=cudnn (GPU only, no masks) must still decode, masks and all."""
    checkpoint.save_model(load_hf_model(dirs["hf"], attention_impl="cudnn", remat_policy="full"), tmp_path / "c")
    assert checkpoint.read_metadata(tmp_path / "c")["model_config"]["attention_impl"] == "cudnn"
    model, _, _ = generate.load_language_model(tmp_path / "c", dtype="float32")
    assert (model.config.attention_impl, model.config.remat_policy) == ("auto", "none")


def test_from_checkpoint_reads_hf_converted_and_workdir_alike(dirs):
    """All three kinds load the same weights: greedy answers agree; the VQ-GAN's grid comes along."""
    answers = []
    for kind in ("hf", "ckpt", "workdir"):
        sampler = Sampler.from_checkpoint(dirs[kind], dirs["vqgan"], dtype="float32",
                                          sampling=SamplingParams(greedy=True))
        assert sampler.image_grid == TINY_VQGAN.grid and sampler.tokenizer.num_image_codes == TINY_VQGAN.num_codes
        answers.append(sampler.instruct(["What is an effusion?", "Describe the heart."], max_new_tokens=12).texts)
    assert answers[0] == answers[1] == answers[2] and any(answers[0])
    codes_only = Sampler.from_checkpoint(dirs["ckpt"], dtype="float32")  # grid from the checkpoint's metadata
    assert codes_only.vqgan is None and codes_only.image_grid == TINY_VQGAN.grid
