"""HF ↔ ours conversion: every file layout HF checkpoints come in, round trips, and clear errors."""

import gc
import json
import re
import shutil
import struct
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import hf_logits, save_hf, tiny_hf_model
from llmcxr_jax import checkpoint, convert, parallel
from llmcxr_jax.convert import ConversionError, load_hf_model, save_hf_model

IDS = np.random.default_rng(0).integers(0, 90, (2, 13))  # valid for every vocabulary below


def _assert_same_logits(ours, hf):
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(IDS))), hf_logits(hf, IDS), atol=1e-4, rtol=0)


def _write_old_style_bin(hf, directory, shards: int = 1):
    """What transformers 4.28 wrote for dolly: pytorch_model.bin (+ index), registered buffers, rotary_pct config."""
    directory.mkdir()
    state = dict(hf.state_dict())
    if "lm_head.weight" in state:  # transformers 5's module name; checkpoints on disk say embed_out
        state["embed_out.weight"] = state.pop("lm_head.weight")
    for i in range(hf.config.num_hidden_layers):
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
    names = sorted(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        weight_map = {}
        for k in range(shards):
            fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            part = {n: state[n] for n in names[k::shards]}
            torch.save(part, directory / fname)
            weight_map.update({n: fname for n in part})
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = hf.config.to_dict()
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_through_transformers(tmp_path, tied):
    hf = tiny_hf_model(seed=1, tie_word_embeddings=tied)
    ours = load_hf_model(save_hf(hf, tmp_path / "in"))
    save_hf_model(ours, tmp_path / "out")
    reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    _assert_same_logits(ours, reloaded)
    assert list(hf.state_dict()) == list(reloaded.state_dict())
    for a, b in zip(hf.state_dict().values(), reloaded.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_our_sharded_safetensors_load_in_transformers(tmp_path):
    hf = tiny_hf_model(seed=2)
    ours = load_hf_model(save_hf(hf, tmp_path / "in"))
    save_hf_model(ours, tmp_path / "out", max_shard_bytes=20_000)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    _assert_same_logits(ours, transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval())


@pytest.mark.parametrize("layout", ["bin", "sharded_bin", "sharded_safetensors"])
def test_checkpoint_layouts_load(tmp_path, layout):
    hf = tiny_hf_model(seed=3)
    if layout == "bin":
        path = _write_old_style_bin(hf, tmp_path / "hf")
    elif layout == "sharded_bin":
        path = _write_old_style_bin(hf, tmp_path / "hf", shards=3)
    else:
        path = save_hf(hf, tmp_path / "hf", max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").exists()
    _assert_same_logits(load_hf_model(path), hf)


def test_bfloat16_checkpoint_loads(tmp_path):
    hf = tiny_hf_model(seed=4)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf", dtype="bfloat16")
    table = np.asarray(ours.embed_in[...].astype(jnp.float32))
    np.testing.assert_array_equal(table[:96], hf.gpt_neox.embed_in.weight.detach().float().numpy())
    assert table.shape == (128, 32) and not table[96:].any()  # zero rows up to a multiple of vocab_multiple


def test_vocabulary_splits_over_a_tensor_axis(tmp_path):
    """A vocabulary such as LLM-CXR's 51,305 (= 5·31·331), or 90 here, divides by no tensor axis of 8; the padded
    tables (128 rows here) shard over `tensor`, and logits and exported weights stay HF's."""
    hf = tiny_hf_model(seed=5, vocab_size=90)
    mesh = parallel.make_mesh((1, 1, 8))
    ours = load_hf_model(save_hf(hf, tmp_path / "hf"), mesh=mesh)
    assert ours.embed_in[...].sharding.spec[0] == "tensor" and ours.embed_out[...].sharding.spec[1] == "tensor"
    assert ours.embed_in[...].addressable_shards[0].data.shape == (16, 32)
    _assert_same_logits(ours, hf)
    save_hf_model(ours, tmp_path / "out")
    _assert_same_logits(ours, transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval())


def test_checkpoint_from_before_vocab_padding_loads(tmp_path):
    """meta.json without `vocab_multiple` describes unpadded tables (written before padding existed)."""
    hf = tiny_hf_model(seed=8, vocab_size=90)
    unpadded = load_hf_model(save_hf(hf, tmp_path / "hf"), vocab_multiple=1)
    assert unpadded.embed_in[...].shape == (90, 32)
    checkpoint.save_model(unpadded, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    del meta["model_config"]["vocab_multiple"]
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    restored = checkpoint.load_model(tmp_path / "ckpt")
    assert restored.config.vocab_multiple == 1 and restored.embed_in[...].shape == (90, 32)
    _assert_same_logits(restored, hf)


def test_load_directly_onto_a_mesh(tmp_path):
    hf = tiny_hf_model(seed=5)
    mesh = parallel.make_mesh((1, 8, 1))
    ours = load_hf_model(save_hf(hf, tmp_path / "hf"), mesh=mesh)
    assert ours.layers.qkv_kernel[...].sharding.spec[:2] == (None, "fsdp")
    _assert_same_logits(ours, hf)


def test_cli_hf_to_orbax_and_back(tmp_path):
    hf = tiny_hf_model(seed=6)
    save_hf(hf, tmp_path / "hf")
    convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    restored = checkpoint.load_model(tmp_path / "ckpt")
    _assert_same_logits(restored, hf)
    convert.main(["orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2")])
    _assert_same_logits(restored, transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf2").eval())
    with pytest.raises(SystemExit, match=r"^error: .*ckpt: not empty; write to an empty directory"):
        convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "unpadded"), "--vocab_multiple", "1"])
    unpadded = checkpoint.load_model(tmp_path / "unpadded")  # for runs that keep model.vocab_multiple=1
    assert restored.embed_in[...].shape == (128, 32) and unpadded.embed_in[...].shape == (96, 32)
    _assert_same_logits(unpadded, hf)
    # a training workdir exports its latest step
    workdir = checkpoint.TrainCheckpoints(tmp_path / "run", every=1, keep=1, async_save=False)
    workdir.save(4, {"model": nnx.to_pure_dict(nnx.state(restored, nnx.Param))}, {},
                 checkpoint.model_metadata(restored.config, {"stage": 2}))
    workdir.close()
    convert.main(["orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "hf3")])
    _assert_same_logits(restored, transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf3").eval())


def test_orbax_to_hf_keeps_the_token_layout_and_llmcxr_metadata(tmp_path):
    """An exported HF directory must load with its own tokenizer (image codes) and VQ-GAN identity, and convert
    back without losing them."""
    from llmcxr_jax.generate import load_language_model, load_tokenizer
    from llmcxr_jax.tokenizer import LlmCxrTokenizer

    tokenizer = LlmCxrTokenizer.train_small(["FINDINGS: clear lungs. IMPRESSION: normal."] * 20, 300,
                                            num_image_codes=16)
    hf = tiny_hf_model(seed=7, vocab_size=tokenizer.vocab_size)
    meta = {"vqgan_grid": [2, 2], "vqgan_fingerprint": "f" * 64, "token_layout": {"num_image_codes": 16}}
    checkpoint.save_model(load_hf_model(save_hf(hf, tmp_path / "hf")), tmp_path / "ckpt", extra_metadata=meta)
    tokenizer.save(tmp_path / "ckpt")
    convert.main(["orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    _, loaded, source = load_language_model(tmp_path / "out", dtype="float32")
    assert {k: loaded[k] for k in meta} == meta and source.endswith("llmcxr_metadata.json")
    assert load_tokenizer(tmp_path / "out", None).layout == tokenizer.layout
    convert.main(["hf-to-orbax", str(tmp_path / "out"), str(tmp_path / "back")])
    back = checkpoint.read_metadata(tmp_path / "back")
    assert {k: back[k] for k in meta} == meta and back["converted_from"] == str(tmp_path / "out")


def test_a_single_weight_file_is_read_before_an_index_as_transformers_does(tmp_path):
    old, new = tiny_hf_model(seed=8), tiny_hf_model(seed=9)
    path = save_hf(old, tmp_path / "hf", max_shard_size="20KB")
    sharded = sorted(p.name for p in path.iterdir())
    save_hf(new, tmp_path / "single")
    shutil.copy(tmp_path / "single" / "model.safetensors", path / "model.safetensors")
    _assert_same_logits(load_hf_model(path), new)
    assert "model.safetensors.index.json" in sharded
    with pytest.raises(ConversionError, match=r"hf: already holds weights \['model-00001-of-.*, "
                                              r"'model.safetensors', 'model.safetensors.index.json'\]"):
        save_hf_model(load_hf_model(path), path)  # stale shards beside new weights would be read instead


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, message", [
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, r"tensor 'w' of shape \[4, 4\] F32 needs 64 "
                                                                          r"bytes, its data_offsets span 32"),
    ({"w": {"dtype": "F32", "shape": [2]}}, r"tensor 'w' has malformed data_offsets None"),
    ([1, 2], r"header is not a JSON object"),
])
def test_malformed_safetensors_headers_name_the_file_and_tensor(tmp_path, header, message):
    from llmcxr_jax.safetensors_io import SafetensorsError, SafetensorsFile

    blob = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(64))
    with pytest.raises(SafetensorsError, match=r"bad.safetensors: " + message):
        SafetensorsFile(path)


def test_an_index_naming_the_wrong_shard_is_a_conversion_error(tmp_path):
    path = save_hf(tiny_hf_model(), tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "gpt_neox.embed_in.weight"
    index["weight_map"][name] = next(f for f in index["weight_map"].values() if f != index["weight_map"][name])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=rf"^error: .*model-0000\d-of-\d+.safetensors: the index says it holds "
                                         rf"'{name}', but it does not"):
        convert.main(["hf-to-orbax", str(path), str(tmp_path / "ckpt")])


def test_missing_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"empty/config.json: no config.json"):
        load_hf_model(tmp_path / "empty")


def test_not_gpt_neox(tmp_path):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama'.*GPT-NeoX"):
        load_hf_model(path)


def test_wrong_tensor_shape_names_both_shapes(tmp_path):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"model.safetensors: tensor 'gpt_neox.layers.0.mlp.dense_h_to_4h.weight' "
                                              r"has shape \(80, 32\), but config.json implies \(64, 32\)"):
        load_hf_model(path)


def test_truncated_safetensors(tmp_path):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model.safetensors: file is truncated"):
        load_hf_model(path)


def test_truncated_bin(tmp_path):
    path = _write_old_style_bin(tiny_hf_model(), tmp_path / "hf")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"pytorch_model.bin: cannot read PyTorch weights"):
        load_hf_model(path)


def test_a_bin_with_a_damaged_tensor_is_refused_not_converted(tmp_path):
    """torch.load reads zip entries without checking their CRCs: one flipped byte of a weight loaded silently."""
    path = _write_old_style_bin(tiny_hf_model(), tmp_path / "hf") / "pytorch_model.bin"
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name_length + extra_length + 5] ^= 0x10  # one bit of the first tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"pytorch_model.bin: damaged: entry \S+/data/0 fails its CRC check"):
        load_hf_model(path.parent)


@pytest.mark.parametrize("weight_map", [[], {"gpt_neox.embed_in.weight": None}])
def test_an_index_whose_weight_map_is_no_name_to_file_map_is_a_conversion_error(tmp_path, weight_map):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match=r"model.safetensors.index.json: not a valid index file \(weight_map "
                                              r"must map tensor names to file names"):
        load_hf_model(path)


def test_bin_without_torch_installed_says_what_to_install(tmp_path, monkeypatch):
    path = _write_old_style_bin(tiny_hf_model(), tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as on a torch-less machine
    with pytest.raises(ConversionError, match=r"pytorch_model.bin: reading PyTorch .bin weights needs torch; "
                                              r"install the `convert` extra"):
        load_hf_model(path)


def test_cli_bad_input_is_one_line_naming_the_problem(tmp_path):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    (path / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"^error: .*hf: no weights found"):
        convert.main(["hf-to-orbax", str(path), str(tmp_path / "ckpt")])
    with pytest.raises(SystemExit, match=r"^error: \S*nothing_here: not a model: expected config.json"):
        convert.main(["orbax-to-hf", str(tmp_path / "nothing_here"), str(tmp_path / "hf2")])


def test_missing_tensor(tmp_path):
    hf = tiny_hf_model()
    path = _write_old_style_bin(hf, tmp_path / "hf")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    del state["gpt_neox.layers.1.attention.dense.bias"]
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"1 tensors missing.*layers.1.attention.dense.bias"):
        load_hf_model(path)


def test_unknown_dtype(tmp_path):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; expected one of"):
        load_hf_model(path, dtype="fp8")


def test_no_weights(tmp_path):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    (path / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"no weights found"):
        load_hf_model(path)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_with_other_config_is_refused(tmp_path):
    """Refused from the stored shapes, naming a parameter, before Orbax starts reads that would fail later."""
    hf = tiny_hf_model()
    convert.main(["hf-to-orbax", str(save_hf(hf, tmp_path / "hf")), str(tmp_path / "ckpt")])
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    meta["model_config"]["hidden_size"] = 64
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    expected = r"params: parameters do not match the model config in meta.json \(embed_in: stored \(128, 32\), "
    with pytest.raises(ValueError, match=expected + r"the config needs \(128, 64\); .*; and 12 more\)"):
        checkpoint.load_model(tmp_path / "ckpt")
    gc.collect()  # an unfinished read's failure would surface here as an unraisable-exception warning


def test_checkpoint_without_params_is_named(tmp_path):
    convert.main(["hf-to-orbax", str(save_hf(tiny_hf_model(), tmp_path / "hf")), str(tmp_path / "ckpt")])
    (tmp_path / "ckpt" / "params" / "_METADATA").unlink()  # Orbax's tree metadata: the restore needs no more
    assert checkpoint.load_model(tmp_path / "ckpt").config.hidden_size == 32
    shutil.rmtree(tmp_path / "ckpt" / "params")
    with pytest.raises(SystemExit, match=r"^error: \S*ckpt/params: missing; \S*ckpt has meta.json but no parameters$"):
        convert.main(["orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2")])


@pytest.mark.parametrize("content,message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, "
                                                                                         "got list")])
def test_metadata_files_that_are_not_json_objects_are_named(tmp_path, content, message):
    """The metadata readers (HF export metadata, token layout, VQ-GAN config, HF config.json, our meta.json, codes
    metadata) share one reader."""
    import vqgan_flax
    from llmcxr_jax.convert import HF_METADATA_FILE, read_hf_metadata
    from llmcxr_jax.tokenizer import LAYOUT_FILE, LlmCxrTokenizer, TokenizerLayoutError
    from vqgan_flax.checkpoint import CONFIG_FILE, CheckpointError
    from vqgan_flax.codes import META_FILE, CodesDir, CodesError

    (tmp_path / HF_METADATA_FILE).write_text(content)
    with pytest.raises(ConversionError, match=f"{HF_METADATA_FILE}: {message}"):
        read_hf_metadata(tmp_path)
    LlmCxrTokenizer.from_pretrained().save(tmp_path / "tok")
    (tmp_path / "tok" / LAYOUT_FILE).write_text(content)
    with pytest.raises(TokenizerLayoutError, match=f"{LAYOUT_FILE}: {message}"):
        LlmCxrTokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / CONFIG_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE}: {message}"):
        vqgan_flax.checkpoint.read_config(tmp_path / "vq")
    assert read_hf_metadata(tmp_path / "vq") == {}  # none there: a plain HF directory
    (tmp_path / "vq" / "config.json").write_text(content)
    with pytest.raises(ValueError, match=f"vq/config.json: {message}"):
        load_hf_model(tmp_path / "vq")
    (tmp_path / "vq" / "meta.json").write_text(content)
    with pytest.raises(ValueError, match=f"vq/meta.json: {message}"):
        checkpoint.read_metadata(tmp_path / "vq")
    (tmp_path / "codes").mkdir()
    (tmp_path / "codes" / META_FILE).write_text(content)
    with pytest.raises(CodesError, match=f"{META_FILE}: {message}"):
        CodesDir.open(tmp_path / "codes")


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": "32"}, r"hidden_size='32' must be positive ints"),
    ({"num_hidden_layers": 0, "vocab_size": True}, r"vocab_size=True, num_hidden_layers=0 must be positive ints"),
    ({"num_attention_heads": 5}, r"hidden_size 32 is not divisible by num_attention_heads 5"),
])
def test_hf_config_values_of_the_wrong_kind_are_named(tmp_path, change, message):
    path = save_hf(tiny_hf_model(), tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=rf"hf/config.json: {message}"):
        load_hf_model(path)


def test_a_checkpoint_whose_parameters_were_replaced_is_refused(tmp_path):
    """meta.json records each parameter's checksum: another model's `params/` in its place decodes but is refused."""
    for name, seed in (("ckpt", 0), ("other", 1)):
        convert.main(["hf-to-orbax", str(save_hf(tiny_hf_model(seed), tmp_path / f"hf{seed}")), str(tmp_path / name)])
    shutil.rmtree(tmp_path / "ckpt" / "params")
    shutil.copytree(tmp_path / "other" / "params", tmp_path / "ckpt" / "params")
    with pytest.raises(SystemExit, match=r"^error: \S*ckpt/params: \S+, \S+, \S+ and \d+ more \(\d+ arrays\) differ "
                                         r"from what was saved \(the checksums in meta.json\)"):
        convert.main(["orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2")])
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"differ from what was saved"):  # read as saved,
        checkpoint.load_model(tmp_path / "ckpt", dtype="bfloat16", param_dtype="bfloat16")  # compared, then cast
    assert checkpoint.load_model(tmp_path / "other").config.hidden_size == 32
    convert.main(["orbax-to-hf", str(tmp_path / "other"), str(tmp_path / "hf_other")])  # checksums stay behind
    assert "checksums" not in json.loads((tmp_path / "hf_other" / "llmcxr_metadata.json").read_text())


def test_parameters_without_a_saved_checksum_are_named_in_a_warning(tmp_path, caplog):
    """A record that lacks an array (renamed, or saved by other code) cannot vouch for it: said, not silent."""
    convert.main(["hf-to-orbax", str(save_hf(tiny_hf_model(), tmp_path / "hf")), str(tmp_path / "ckpt")])
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    del meta["checksums"]["embed_in"]
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    checkpoint.load_model(tmp_path / "ckpt")
    assert re.search(r"ckpt/params: embed_in \(1 array\) could not be compared with the saved checksums", caplog.text)
