"""The train CLI on the real data path: a MIMIC-shaped fixture built by the TFDS builder, read through Grain."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llmcxr_jax import config_files
from llmcxr_jax.data.mimic_builder import MimicCxrLlmcxr
from llmcxr_jax.data.mimic_codes import VqganMismatchError
from llmcxr_jax.tokenizer import LlmCxrTokenizer
from mimic_fixture import FINGERPRINT, GRID, NUM_CODES, write_mimic_tree
from train_helpers import ROOT, with_two_ids_swapped


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    fx = write_mimic_tree(root / "manual")
    builder = MimicCxrLlmcxr(config="stage1", data_dir=root / "tfds", file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=fx.root))
    texts = [p.read_text() for p in (fx.root / "reports").rglob("*.txt")]
    tokenizer = LlmCxrTokenizer.train_small(texts * 4, vocab_size=400, num_image_codes=NUM_CODES)
    tokenizer.save(root / "tokenizer")
    return root, tokenizer


def _train(root, tokenizer, workdir, *extra, processes: int = 1, lengths: str = "(512,)"):
    launcher = [str(ROOT / "launch/local.py"), "--num_processes", str(processes), "--devices_per_process",
                str(4 // processes), "--"] if processes > 1 else ["-m", "llmcxr_jax.train"]
    cmd = [sys.executable, *launcher, "--config", str(ROOT / "configs/stage1.py:tiny"),
           "--workdir", str(workdir), "--config.data.source=tfds", f"--config.data.data_dir={root / 'tfds'}",
           "--config.data.dolly_builder=", f"--config.tokenizer={root / 'tokenizer'}",
           f"--config.model.vocab_size={tokenizer.vocab_size}", "--config.model.max_position_embeddings=512",
           f"--config.data.lengths={lengths}", "--config.data.max_length=512", "--config.train.global_batch_size=4",
           "--config.train.num_steps=2", "--config.train.eval_every=2", *extra]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes}", JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_trains_and_evaluates_on_the_built_dataset(prepared, tmp_path):
    root, tokenizer = prepared
    out = _train(root, tokenizer, tmp_path / "w", "--config.data.report_dropout=0.25")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "[eval] step 2: loss=" in out.stdout
    meta = json.loads((tmp_path / "w" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["vqgan_fingerprint"] == FINGERPRINT and meta["report_dropout"] == 0.25
    assert meta["token_layout"]["text_vocab_size"] == tokenizer.text_vocab_size
    assert LlmCxrTokenizer.from_pretrained(tmp_path / "w").layout == tokenizer.layout  # saved for the sampler


def test_resuming_with_another_tokenizer_is_refused_and_keeps_the_workdirs(prepared, tmp_path):
    """Same layout and shapes, other ids for the same text: training on would silently relearn the vocabulary."""
    root, tokenizer = prepared
    with_two_ids_swapped(tokenizer).save(tmp_path / "other")
    with_two_ids_swapped(tokenizer).save(tmp_path / "w")  # a first try that died before any checkpoint
    first = _train(root, tokenizer, tmp_path / "w")
    assert first.returncode == 0, first.stderr[-3000:]  # nothing was trained with it: replaced
    saved = (tmp_path / "w" / "tokenizer.json").read_bytes()
    assert LlmCxrTokenizer.from_pretrained(tmp_path / "w").encode_batch(["lungs heart"]) == \
        tokenizer.encode_batch(["lungs heart"])
    assert _train(root, tokenizer, tmp_path / "w", "--config.train.num_steps=3").returncode == 0  # same: resumes
    out = _train(root, tokenizer, tmp_path / "w", "--config.train.num_steps=4",
                 f"--config.tokenizer={tmp_path / 'other'}")
    assert out.returncode == 1 and f"--workdir {tmp_path / 'w'} was trained with another tokenizer" in out.stderr, \
        out.stderr[-2000:]
    assert (tmp_path / "w" / "tokenizer.json").read_bytes() == saved
    assert (tmp_path / "w" / "checkpoints" / "3").exists() and not (tmp_path / "w" / "checkpoints" / "4").exists()
    out = _train(root, tokenizer, tmp_path / "next", f"--config.init.workdir={tmp_path / 'w'}",
                 f"--config.tokenizer={tmp_path / 'other'}")  # the next stage, from that workdir
    assert out.returncode == 1 and f"init.workdir {tmp_path / 'w'} was trained with another tokenizer" in out.stderr


def test_vqgan_training_refuses_a_dataset_without_images(prepared):
    """The MIMIC LM dataset holds codes, not pictures: named, not a KeyError from the first batch."""
    from llmcxr_jax.train_vqgan import image_sources

    root, _ = prepared
    config = config_files.load_config("vqgan:tiny")
    config.data.update(source="tfds", builder="mimic_cxr_llmcxr/stage1", data_dir=str(root / "tfds"))
    with pytest.raises(ValueError, match=r"data.builder 'mimic_cxr_llmcxr/stage1' has no 'image' feature \(it has "
                                         r"\[.*'codes'.*\]\); VQ-GAN training reads cxr_images"):
        image_sources(config)


def test_epoch_ends_are_kept_besides_the_latest_checkpoints(prepared, tmp_path):
    """SPEC §9 saves every epoch and keeps 5; periodic saves (here every step, keep 1) must not evict them."""
    root, tokenizer = prepared
    out = _train(root, tokenizer, tmp_path / "w", "--config.train.num_steps=0", "--config.train.num_epochs=3",
                 "--config.train.eval_every=0", "--config.train.checkpoint_every=1",
                 "--config.train.keep_checkpoints=1", "--config.train.epoch_checkpoints=2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    kept = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit())
    epoch = kept[-1] // 3
    assert epoch > 1 and kept == [2 * epoch, 3 * epoch], kept


def test_two_processes_train_on_the_built_dataset(prepared, tmp_path):
    """Each process reads its own rows (here 444-479 tokens, so their own buckets of 464 and 512 differ in some
    batches): every batch must still have one width on both."""
    root, tokenizer = prepared
    out = _train(root, tokenizer, tmp_path / "w", "--config.train.num_steps=4", processes=2, lengths="(464,512)")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[eval] step 2: loss=" in out.stdout and (tmp_path / "w" / "checkpoints" / "4").is_dir()


@pytest.mark.parametrize("trainer", ["lm", "vqgan"])
def test_a_dataset_that_is_not_there_is_one_line_not_the_tfds_catalogue(prepared, tmp_path, trainer):
    from llmcxr_jax import train, train_vqgan

    root, _ = prepared
    for data_dir, where in ((root / "tfds", f"data_dir '{root / 'tfds'}'"),
                            (tmp_path / "absent", f"data_dir '{tmp_path / 'absent'}' (no such directory)")):
        config = config_files.load_config("stage1:" if trainer == "lm" else "vqgan:tiny")
        config.data.update(data_dir=str(data_dir), source="tfds")
        if trainer == "lm":
            config.data.update(mimic_builder="mimic_cxr_llmcxr/stage1", dolly_builder="dolly15k")
        else:
            config.data.builder = "cxr_images/llmcxr256"
        with pytest.raises(FileNotFoundError) as raised:
            train.tfds_sources(config, "train") if trainer == "lm" else train_vqgan.image_sources(config)
        message = str(raised.value)
        assert message.startswith("data: cannot open '") and f"in {where}: " in message, message
        assert "\n" not in message and "Build it first" in message, message


def test_codes_of_another_vqgan_are_refused_before_training(prepared, tmp_path):
    root, tokenizer = prepared
    out = _train(root, tokenizer, tmp_path / "w", "--config.vqgan.fingerprint=some-other-vqgan")
    assert out.returncode != 0
    assert "but some-other-vqgan was asked for" in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_mimic_and_vqa_codes_of_different_vqgans_are_refused(tmp_path):
    """With no fingerprint in the config, the second codes-bearing dataset is held to the first one's."""
    from llmcxr_jax import train

    for name, fingerprint in (("stage1", FINGERPRINT), ("stage2", "another-vqgan")):
        fx = write_mimic_tree(tmp_path / name)
        meta = fx.codes_path / "meta.json"
        meta.write_text(meta.read_text().replace(FINGERPRINT, fingerprint))
        MimicCxrLlmcxr(config=name, data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=fx.root))
    config = config_files.load_config("stage1:tiny")
    config.data.update(data_dir=str(tmp_path / "tfds"), mimic_builder="mimic_cxr_llmcxr/stage1",
                       vqa_builder="mimic_cxr_llmcxr/stage2", dolly_builder="")
    config.vqgan.grid = GRID[0]
    with pytest.raises(VqganMismatchError, match=rf"stage2: codes from VQ-GAN fingerprint another-vqgan, but "
                                                 rf"{FINGERPRINT} was asked for"):
        train.tfds_sources(config, "train")
    config.data.vqa_builder = "mimic_cxr_llmcxr/stage1"
    assert train.tfds_sources(config, "train")[1] == FINGERPRINT


def test_train_data_takes_report_dropout_from_the_config(prepared):
    """data.report_dropout reaches the training iterator (some report→CXR rows change, none else); a config
    file from before the field existed trains as the original (no dropout)."""
    from llmcxr_jax import train

    root, tokenizer = prepared
    config = config_files.load_config("stage1:tiny")
    config.data.update(source="tfds", data_dir=str(root / "tfds"), dolly_builder="", lengths=(512,), max_length=512)
    config.update(tokenizer=str(root / "tokenizer"))
    config.vqgan.grid = GRID[0]

    def first_epoch(dropout):
        config.data.report_dropout = dropout
        it, per_epoch, _ = train.make_train_data(config)
        return [row for _ in range(per_epoch) for row in next(it)["input_ids"]]
    plain, dropping = first_epoch(0.0), first_epoch(0.5)
    changed = [a for a, b in zip(plain, dropping) if not np.array_equal(a, b)]
    assert changed and len(changed) < len(plain)
    def report_to_cxr(ids):  # the image is the response: its first id comes after `### Response:\n`
        return np.argmax(tokenizer.is_image_id(ids)) > np.argmax(ids == tokenizer.response_key_id)
    assert all(report_to_cxr(a) for a in changed) and not all(report_to_cxr(a) for a in plain)
    del config.data.report_dropout
    assert train.report_dropout(config) == 0.0
    it, per_epoch, _ = train.make_train_data(config)
    unset = [row for _ in range(per_epoch) for row in next(it)["input_ids"]]
    assert len(plain) == len(unset) and all(np.array_equal(a, b) for a, b in zip(plain, unset))


def test_build_cli_prepares_the_mimic_configs(tmp_path, capsys):
    from llmcxr_jax.data import build

    fx = write_mimic_tree(tmp_path / "manual")
    build.main(["mimic", "--manual_dir", str(fx.root), "--data_dir", str(tmp_path / "tfds")])
    out = capsys.readouterr().out
    assert "built mimic_cxr_llmcxr/stage1" in out and "built mimic_cxr_llmcxr/stage2" in out
    assert "its images: reconstructed: PA/AP images of each subject's earliest PA/AP study" in out
    source = tfds.data_source("mimic_cxr_llmcxr/stage2", data_dir=tmp_path / "tfds", split="train")
    assert len(source) > 0


def test_rerunning_the_build_after_a_failed_config_keeps_the_one_built(tmp_path, capsys):
    """Stage 2 fails (a selection pickle under another name: it would have been reconstructed silently); once
    fixed, the README's command again builds stage 2 and keeps stage 1 (an explicit --config still refuses)."""
    from llmcxr_jax.data import build
    from llmcxr_jax.data.mimic_files import SELECTION_PICKLE

    fx = write_mimic_tree(tmp_path / "manual", selection=True)
    misnamed = fx.root / SELECTION_PICKLE.replace("earlist", "earliest")
    (fx.root / SELECTION_PICKLE).rename(misnamed)
    command = ["mimic", "--manual_dir", str(fx.root), "--data_dir", str(tmp_path / "tfds")]
    with pytest.raises(SystemExit, match=rf"^error: \S+manual: {misnamed.name} is not {SELECTION_PICKLE} \(the "
                                         r"original's spelling\), which stage 2 reads"):
        build.main(command)
    assert "built mimic_cxr_llmcxr/stage1" in capsys.readouterr().out
    misnamed.rename(fx.root / SELECTION_PICKLE)
    build.main(command)
    out = capsys.readouterr().out
    assert "kept mimic_cxr_llmcxr/stage1/1.0.0, already built" in out and "built mimic_cxr_llmcxr/stage2" in out
    assert f"its images: file {fx.root / SELECTION_PICKLE}" in out
    with pytest.raises(SystemExit, match=r"stage1/\S+ is already built there"):
        build.main([*command, "--config", "stage1"])
