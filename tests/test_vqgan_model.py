"""VQ-GAN model and checkpoint conversion against the taming-transformers PyTorch modules (the reference)."""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import yaml
from flax import nnx
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer as TamingQuantizer

import vqgan_flax
from vqgan_flax import checkpoint, convert
from vqgan_flax.config import PRESETS, VQGANConfig
from vqgan_flax.losses import codebook_loss
from vqgan_flax.losses import read_loss_tensors
from vqgan_flax.model import VQGAN
from vqgan_flax.quantizer import VectorQuantizer
from vqgan_flax.safe_pickle import UnsafePickleError
from vqgan_flax.torch_checkpoint import CheckpointReadError, _restricted_torch_load, read_state_dict

TINY = PRESETS["tiny"]


def taming_modules(config: VQGANConfig) -> dict[str, torch.nn.Module]:
    """The generator parts of taming's VQModel (VQModel itself needs pytorch-lightning)."""
    ddconfig = {k: v for k, v in config.to_dict().items() if k not in ("n_embed", "embed_dim")}
    return {"encoder": Encoder(**ddconfig), "decoder": Decoder(**ddconfig),
            "quantize": TamingQuantizer(config.n_embed, config.embed_dim, beta=0.25),
            "quant_conv": torch.nn.Conv2d(config.z_channels, config.embed_dim, 1),
            "post_quant_conv": torch.nn.Conv2d(config.embed_dim, config.z_channels, 1)}


def state_dict(modules: dict[str, torch.nn.Module]) -> collections.OrderedDict:
    return collections.OrderedDict((f"{prefix}.{k}", v) for prefix, m in modules.items()
                                   for k, v in m.state_dict().items())


def fake_loss_keys() -> dict[str, torch.Tensor]:
    """A few `loss.*` tensors shaped like taming's LPIPS + PatchGAN, incl. BatchNorm statistics."""
    return {"loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
            "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
            "loss.discriminator.main.3.running_mean": torch.randn(128),
            "loss.discriminator.main.3.num_batches_tracked": torch.tensor(1234)}


def taming_yaml(config: VQGANConfig) -> dict:
    ddconfig = {k: v for k, v in config.to_dict().items() if k not in ("n_embed", "embed_dim")}
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                      "params": {"embed_dim": config.embed_dim, "n_embed": config.n_embed, "ddconfig": ddconfig,
                                 "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                "params": {"disc_start": 10000, "disc_weight": 0.8}}}}}


def write_reference(tmp: Path, config: VQGANConfig, state: dict) -> tuple[Path, Path]:
    """A Lightning-style checkpoint and its taming yaml."""
    ckpt, cfg = tmp / "ref.ckpt", tmp / "ref.yaml"
    torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, ckpt)
    cfg.write_text(yaml.safe_dump(taming_yaml(config)))
    return ckpt, cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Random taming modules (norms and biases perturbed too), images, their reference outputs, and a .ckpt."""
    torch.manual_seed(0)
    modules = taming_modules(TINY)
    images = torch.rand(4, 3, TINY.resolution, TINY.resolution) * 2 - 1
    with torch.no_grad():
        for m in modules.values():
            for name, p in m.named_parameters():
                if p.ndim == 1:  # GroupNorm scale/shift and conv biases: away from the 1/0 defaults
                    p.add_(0.1 * torch.randn_like(p))
        z = modules["quant_conv"](modules["encoder"](images))
        # A codebook near real latents, so codes are diverse and the argmin is meaningful.
        rows = z.permute(0, 2, 3, 1).reshape(-1, TINY.embed_dim)
        modules["quantize"].embedding.weight.copy_(
            rows[torch.randperm(len(rows))[:TINY.n_embed]] + 0.05 * torch.randn(TINY.n_embed, TINY.embed_dim))
        z_q, _, (_, _, indices) = modules["quantize"](z)
        codes = indices.reshape(4, *TINY.grid)
        decoded = modules["decoder"](modules["post_quant_conv"](z_q))
    # One training-style forward/backward: reconstruction through the straight-through estimator + q_loss.
    probe = torch.randn(4, 3, TINY.resolution, TINY.resolution)
    z_q, q_loss, _ = modules["quantize"](modules["quant_conv"](modules["encoder"](images)))
    objective = (modules["decoder"](modules["post_quant_conv"](z_q)) * probe).mean() + q_loss
    objective.backward()
    grads = {name: modules[part].get_parameter(rest).grad.numpy().copy()
             for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.bias")
             for part, rest in [name.split(".", 1)]}
    for m in modules.values():
        m.zero_grad()
    tmp = tmp_path_factory.mktemp("taming")
    state = state_dict(modules)
    loss = fake_loss_keys()
    ckpt, cfg = write_reference(tmp, TINY, collections.OrderedDict({**state, **loss}))
    out = tmp / "converted"
    convert.main(["--ckpt", str(ckpt), "--config", str(cfg), "--out", str(out)])
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return {"modules": modules, "state": state, "loss": loss, "ckpt": ckpt, "yaml": cfg, "dir": out, "images": nhwc(images),
            "latents": nhwc(z), "codes": codes.numpy(), "decoded": nhwc(decoded), "probe": nhwc(probe),
            "objective": objective.item(), "grads": grads}


def test_encode_decode_match_taming(reference):
    model = vqgan_flax.load(reference["dir"])
    images = jnp.asarray(reference["images"])
    latents = np.asarray(nnx.jit(lambda m, x: m.encode_latents(x))(model, images))
    scale = np.abs(reference["latents"]).max()
    np.testing.assert_allclose(latents, reference["latents"], atol=1e-5 * scale, rtol=0)
    codes = np.asarray(nnx.jit(lambda m, x: m.encode(x))(model, images))
    assert codes.dtype == np.int32 and codes.shape == reference["codes"].shape
    assert len(np.unique(reference["codes"])) > TINY.n_embed // 4  # the comparison is not trivial
    assert (codes == reference["codes"]).mean() >= 0.999
    decoded = np.asarray(nnx.jit(lambda m, c: m.decode(c))(model, jnp.asarray(reference["codes"])))
    assert decoded.shape == reference["images"].shape
    assert np.abs(decoded - reference["decoded"]).max() <= 1e-4


def test_bfloat16_compute_stays_close_to_float32(reference):
    model = vqgan_flax.load(reference["dir"], dtype=jnp.bfloat16)
    latents = np.asarray(nnx.jit(lambda m, x: m.encode_latents(x))(model, jnp.asarray(reference["images"])))
    assert latents.dtype == np.float32  # bf16 convs, fp32 distances
    scale = np.abs(reference["latents"]).max()
    assert 0 < np.abs(latents - reference["latents"]).max() <= 0.03 * scale  # measured 1.5%: bf16 rounding


def test_training_forward_and_gradients_match_taming(reference):
    """`model(x)` (straight-through) and its q_loss give taming's objective and parameter gradients."""
    model = vqgan_flax.load(reference["dir"])
    images, probe = jnp.asarray(reference["images"]), jnp.asarray(reference["probe"])

    def objective(model):
        reconstruction, quantized = model(images)
        return (reconstruction * probe).mean() + codebook_loss(quantized, 0.25, legacy=True)

    value, grads = nnx.jit(nnx.value_and_grad(objective))(model)
    np.testing.assert_allclose(float(value), reference["objective"], rtol=1e-5)
    ours = convert.to_taming({".".join(map(str, path)): np.asarray(var.get_value())
                              for path, var in nnx.to_flat_state(grads)})  # taming names and layouts
    for name, expected in reference["grads"].items():
        assert np.abs(expected).max() > 0, name
        np.testing.assert_allclose(ours[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)


def test_quantizer_loss_and_gradients_match_taming():
    """Legacy beta placement (beta on the codebook term, `losses.codebook_loss(legacy=True)`) and the
    straight-through estimator, by autograd."""
    torch.manual_seed(1)
    n, dim = 16, 8
    ref = TamingQuantizer(n, dim, beta=0.25)
    z = torch.randn(2, dim, 3, 5, requires_grad=True)
    probe = torch.randn(2, dim, 3, 5)  # makes d(z_q)/dz visible in the gradient
    z_q, loss, (_, _, indices) = ref(z)
    (loss + (z_q * probe).sum()).backward()

    ours = VectorQuantizer(n, dim, rngs=nnx.Rngs(0))
    ours.embedding[...] = jnp.asarray(ref.embedding.weight.detach().numpy())
    graphdef, state = nnx.split(ours)
    z_nhwc = jnp.asarray(z.detach().permute(0, 2, 3, 1).numpy())
    probe_nhwc = jnp.asarray(probe.permute(0, 2, 3, 1).numpy())

    def objective(z, state):
        out = nnx.merge(graphdef, state)(z)
        return codebook_loss(out, 0.25, legacy=True) + (out.z_q * probe_nhwc).sum(), out

    (value, out), (grad_z, grad_state) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(z_nhwc, state)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), indices.reshape(-1).numpy())
    np.testing.assert_allclose(float(value - (out.z_q * probe_nhwc).sum()), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_z), z.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_state["embedding"][...]), ref.embedding.weight.grad.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_argmin_takes_first_index_on_ties():
    quantizer = VectorQuantizer(4, 2, rngs=nnx.Rngs(0))
    quantizer.embedding[...] = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    z = jnp.asarray([[[[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]]])  # the last is equidistant from all four
    np.testing.assert_array_equal(np.asarray(quantizer.indices(z)), [[[1, 0, 0]]])


def test_f16_structure_and_parameter_count_match_taming():
    """The LLM-CXR f16 config, built abstractly on both sides (torch meta device, nnx.eval_shape)."""
    config = VQGANConfig()
    with torch.device("meta"):
        modules = taming_modules(config)
    reference = {k: tuple(v.shape) for k, v in state_dict(modules).items()}
    ours = checkpoint.param_shapes(config)
    assert len(reference) == len(ours) == 343
    assert sum(int(np.prod(s)) for s in ours.values()) == 72_141_699
    assert convert.taming_shapes(config) == reference  # every name and shape, through the mapping table


def test_config_from_taming_yaml_and_json_roundtrip(reference):
    config = VQGANConfig.from_taming_yaml(reference["yaml"])
    assert config == TINY and config.grid == (16, 16) and config.num_codes == 64
    assert VQGANConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert VQGANConfig().grid == (16, 16)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["params"].pop("ddconfig"), "not a taming VQModel yaml"),
    (lambda d: d["model"]["params"]["ddconfig"].update(resamp_with_convv=True), "unknown fields ['resamp_with_convv']"),
    (lambda d: d["model"]["params"]["ddconfig"].update(ch=48), "not a multiple of 32"),
    (lambda d: d["model"]["params"]["ddconfig"].update(z_channels="32", resolution=-4),
     "z_channels='32', resolution=-4 must be positive ints"),
    (lambda d: d["model"]["params"]["ddconfig"].update(ch_mult=[1, 0]), "ch_mult (1, 0) must hold multipliers of at"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, edit, message):
    doc = taming_yaml(TINY)
    edit(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="bad.yaml") as err:
        VQGANConfig.from_taming_yaml(path)
    assert message in str(err.value)


def test_converted_directory_contents(reference):
    directory = reference["dir"]
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["source"] == "ref.ckpt" and meta["num_params"] == sum(
        v.numel() for v in reference["state"].values())
    params = safetensors.numpy.load_file(directory / "params.safetensors")
    assert meta["fingerprint"] == checkpoint.fingerprint(params)
    # the conversion is invertible: back to taming names and layouts, bit for bit
    back = convert.to_taming(params)
    assert back.keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        np.testing.assert_array_equal(back[key], value.numpy())
    loss = safetensors.numpy.load_file(directory / "loss.safetensors")  # original names, layouts and dtypes
    assert loss.keys() == reference["loss"].keys()
    for key, value in reference["loss"].items():
        assert loss[key].dtype == value.numpy().dtype
        np.testing.assert_array_equal(loss[key], value.numpy())


def test_save_load_roundtrip_keeps_fingerprint(reference, tmp_path):
    model = vqgan_flax.load(reference["dir"])
    fingerprint = vqgan_flax.save(model, tmp_path / "copy")
    assert fingerprint == checkpoint.read_fingerprint(reference["dir"])
    again = vqgan_flax.load(tmp_path / "copy", dtype=jnp.bfloat16)
    for name, value in checkpoint.params_of(model).items():
        np.testing.assert_array_equal(checkpoint.params_of(again)[name], value)


def test_corrupted_parameters_are_detected(reference, tmp_path):
    model = vqgan_flax.load(reference["dir"])
    vqgan_flax.save(model, tmp_path)
    params = safetensors.numpy.load_file(tmp_path / "params.safetensors")
    params["decoder.conv_out.bias"] = params["decoder.conv_out.bias"] + 1
    safetensors.numpy.save_file(params, tmp_path / "params.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="do not match the fingerprint"):
        vqgan_flax.load(tmp_path)


def test_checkpoint_missing_and_unknown_keys(reference, tmp_path):
    state = collections.OrderedDict(reference["state"])
    del state["encoder.mid.attn_1.q.weight"]
    state["decoder.up.0.block.0.temb_proj.weight"] = torch.zeros(32, 512)
    ckpt, cfg = write_reference(tmp_path, TINY, state)
    with pytest.raises(convert.ConversionError) as err:
        convert.convert(ckpt, cfg, tmp_path / "out")
    message = str(err.value)
    assert f"checkpoint {ckpt} does not match config {cfg}" in message
    assert "missing keys ['encoder.mid.attn_1.q.weight']" in message
    assert "unknown keys ['decoder.up.0.block.0.temb_proj.weight']" in message
    assert not (tmp_path / "out").exists()


def test_checkpoint_whose_keys_carry_a_prefix_says_so_briefly(reference, tmp_path):
    """A Net2Net checkpoint's first stage: every key behind 'first_stage_model.' (hundreds of them)."""
    state = collections.OrderedDict((f"first_stage_model.{k}", v) for k, v in reference["state"].items())
    ckpt, cfg = write_reference(tmp_path, TINY, state)
    with pytest.raises(convert.ConversionError) as err:
        convert.convert(ckpt, cfg, tmp_path / "out")
    message = str(err.value)
    assert re.search(r"missing keys \[('[^']+', ){10}'\.\.\. \d+ more'\]", message), message
    assert "every key carries the prefix 'first_stage_model.'" in message and len(message) < 2000, message


def test_checkpoint_with_unmappable_key(reference, tmp_path):
    state = collections.OrderedDict({**reference["state"], "encoder.norm_out.running_var": torch.ones(64)})
    ckpt, cfg = write_reference(tmp_path, TINY, state)
    with pytest.raises(convert.ConversionError, match=r"unknown keys \['encoder.norm_out.running_var'\]"):
        convert.convert(ckpt, cfg, tmp_path / "out")


def test_convert_refuses_a_non_empty_output_directory(reference, tmp_path):
    """Another VQ-GAN there (which codes may have been made with), or anything else, is not replaced in place;
    the same VQ-GAN again is (test_reconverting_without_loss_tensors...)."""
    (tmp_path / "out").mkdir()
    other = json.dumps({"format": checkpoint.FORMAT, "fingerprint": "another-vqgan"})
    (tmp_path / "out" / "meta.json").write_text(other)
    with pytest.raises(SystemExit, match=r"^error: --out .*out: holds other files or another VQ-GAN"):
        convert.main(["--ckpt", str(reference["ckpt"]), "--config", str(reference["yaml"]), "--out",
                      str(tmp_path / "out")])
    assert (tmp_path / "out" / "meta.json").read_text() == other
    (tmp_path / "out" / "meta.json").unlink()
    (tmp_path / "out" / "config.json").write_text("{}")  # someone else's files
    with pytest.raises(SystemExit, match=r"^error: --out .*out: holds other files or another VQ-GAN"):
        convert.main(["--ckpt", str(reference["ckpt"]), "--config", str(reference["yaml"]), "--out",
                      str(tmp_path / "out")])


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    """Plain text gets past the archive check as a legacy (non-zip) file; torch's reader then fails with a
    KeyError of its own."""
    path = tmp_path / "x.ckpt"
    path.write_text("hello world\n")
    with pytest.raises(CheckpointReadError, match=r"x.ckpt: cannot read torch checkpoint: "):
        read_state_dict(path)


def test_yaml_not_matching_checkpoint(reference, tmp_path):
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump(taming_yaml(VQGANConfig(**{**TINY.to_dict(), "ch": 64}))))
    with pytest.raises(SystemExit) as err:
        convert.main(["--ckpt", str(reference["ckpt"]), "--config", str(wider), "--out", str(tmp_path / "out")])
    message = str(err.value)
    assert f"checkpoint {reference['ckpt']} does not match config {wider}" in message
    assert "decoder.mid.attn_1.q.bias: has (64,), config needs (128,)" in message  # the first ten, sorted
    assert re.search(r"; \.\.\. \d+ more$", message), message


class CallbackState:
    """Stands for a class a Lightning checkpoint carries (taming's ModelCheckpoint callback)."""


class Payload:
    """A pickle that would run a shell command when unpickled by anything that resolves its globals."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_lightning_classes_in_a_checkpoint_are_never_run_and_its_state_dict_is_read(reference, tmp_path):
    """Lightning 1.0 keys callback states by the callback's class; such a checkpoint converts, and the classes
    (a payload among them) stay inert stand-ins."""
    marker = tmp_path / "payload_ran"
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": reference["state"], "callbacks": {CallbackState: {"best_model_score": None}},
                "hyper_parameters": Payload(marker)}, ckpt)
    with pytest.raises(pickle.UnpicklingError):  # what torch itself makes of it
        torch.load(ckpt, weights_only=True)
    state = read_state_dict(ckpt)
    assert not marker.exists()
    assert state.keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        np.testing.assert_array_equal(state[key], value.numpy())
    convert.convert(ckpt, reference["yaml"], tmp_path / "out")
    assert not marker.exists()


def test_a_state_dict_entry_that_is_not_a_tensor_is_refused(reference, tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**reference["state"], "encoder.extra": Payload(marker)}}, ckpt)
    with pytest.raises(CheckpointReadError, match=r"evil.ckpt: state_dict entries that are not named tensors: "
                                                  r"\['encoder.extra'\]"):
        convert.convert(ckpt, reference["yaml"], tmp_path / "out")
    assert not marker.exists()


def test_tensor_views_outside_their_storage_are_refused(tmp_path):
    """A crafted size/stride must not read past the storage (as_strided would return other memory)."""
    ckpt = tmp_path / "strided.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4, dtype=torch.float32)}}, ckpt)
    assert read_state_dict(ckpt)["w"].tolist() == [0, 1, 2, 3]
    with zipfile.ZipFile(ckpt) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    data_pkl = next(name for name in files if name.endswith("data.pkl"))
    # Protocol-2 BININT1 size 4 -> 16 in the tensor's (size,) tuple: a view of 16 floats over 4.
    assert files[data_pkl].count(b"K\x04\x85") == 1
    files[data_pkl] = files[data_pkl].replace(b"K\x04\x85", b"K\x10\x85")
    with zipfile.ZipFile(ckpt, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(CheckpointReadError, match="strided.ckpt"):  # torch.load refuses it itself
        read_state_dict(ckpt)
    with pytest.raises(UnsafePickleError, match=r"strided.ckpt: .*reaches element 15 of a storage of 4"):
        _restricted_torch_load(ckpt)  # where torch is not installed


def test_a_crafted_checkpoint_cannot_change_how_later_ones_decode(tmp_path):
    """BUILD on the FloatStorage stand-in (its dtype to int32) must not outlive the crafted file's own load."""
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4, dtype=torch.float32) / 4}}, good)
    crafted = tmp_path / "crafted.ckpt"
    with zipfile.ZipFile(crafted, "w") as archive:  # GLOBAL torch.FloatStorage; BUILD {"dtype": "<i4"}; {}
        archive.writestr("archive/data.pkl", b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtype"
                                             b"X\x03\x00\x00\x00<i4sb0}.")
    with pytest.raises(UnsafePickleError, match="crafted.ckpt: not a readable pickle"):
        _restricted_torch_load(crafted)
    assert _restricted_torch_load(good)["state_dict"]["w"].tolist() == [0, 0.25, 0.5, 0.75]


def test_restricted_reader_matches_torch_load(reference):
    """The fallback reader (used where torch is absent or refuses a file) rebuilds the same tensors."""
    ours = _restricted_torch_load(reference["ckpt"])
    theirs = torch.load(reference["ckpt"], weights_only=True)
    assert ours["global_step"] == 1000 and ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        np.testing.assert_array_equal(ours["state_dict"][key], value.numpy())


def test_a_damaged_checkpoint_is_refused_not_converted(reference, tmp_path):
    """torch.load does not check the zip entries' CRCs: flipped bytes inside a tensor would convert silently."""
    ckpt = tmp_path / "damaged.ckpt"
    data = bytearray(reference["ckpt"].read_bytes())
    with zipfile.ZipFile(reference["ckpt"]) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
    data[start:start + 16] = bytes(16)
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match=rf"damaged.ckpt: damaged: entry {info.filename} fails its CRC"):
        convert.convert(ckpt, reference["yaml"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reconverting_without_loss_tensors_drops_the_old_ones_and_bad_loss_files_are_named(reference, tmp_path):
    out = tmp_path / "out"
    convert.convert(reference["ckpt"], reference["yaml"], out)
    assert read_loss_tensors(out).keys() == reference["loss"].keys()
    (tmp_path / "plain").mkdir()
    ckpt, cfg = write_reference(tmp_path / "plain", TINY, reference["state"])  # generator only
    convert.convert(ckpt, cfg, out)
    assert read_loss_tensors(out) == {} and vqgan_flax.load(out) is not None
    (out / "loss.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    with pytest.raises(checkpoint.CheckpointError, match=r"out/loss.safetensors: cannot read the loss tensors"):
        read_loss_tensors(out)


def test_not_a_checkpoint(reference, tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointReadError, match="notes.ckpt: not a zip-format torch checkpoint"):
        convert.convert(path, reference["yaml"], tmp_path / "out")


def _precisions(fn, *args, primitives=("conv_general_dilated", "dot_general")) -> set[str]:
    """The precision of every convolution and matmul (`primitives`) in `fn`'s jaxpr, nested calls included."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in primitives:
                found.add(str(eqn.params["precision"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_fp32_encode_and_decode_run_at_full_precision_and_training_keeps_the_default():
    """XLA:GPU runs fp32 at its default precision as TF32; the original's codes came from full fp32."""
    images = jnp.zeros((1, TINY.resolution, TINY.resolution, 3))
    codes = jnp.zeros((1, *TINY.grid), jnp.int32)
    highest, default = "(Precision.HIGHEST, Precision.HIGHEST)", "(Precision.DEFAULT, Precision.DEFAULT)"
    with jax.default_matmul_precision("default"):  # the suite's conftest sets "highest" for everything
        fp32 = VQGAN(TINY, rngs=nnx.Rngs(0))
        assert _precisions(fp32.encode, images) == {highest} == _precisions(fp32.decode, codes)
        # the training forward pass: convolutions at the default (the codebook distances are always HIGHEST)
        assert _precisions(lambda x: fp32(x)[0], images, primitives=("conv_general_dilated",)) == {default}
        bf16 = VQGAN(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        convs = ("conv_general_dilated",)
        assert highest not in _precisions(bf16.encode, images, primitives=convs) | _precisions(bf16.decode, codes)
