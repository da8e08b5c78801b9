"""Convert a taming-transformers Lightning checkpoint into a vqgan_flax directory.

    python -m vqgan_flax.convert --ckpt FILE.ckpt --config FILE.yaml --out DIR

Every generator key (encoder, decoder, quantize, quant_conv, post_quant_conv) must map onto the model
the yaml describes; missing, unknown and mis-shaped keys are errors. `loss.*` tensors (LPIPS, PatchGAN
with BatchNorm statistics) are kept verbatim, under their original names, in DIR/loss.safetensors.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors.numpy

from vqgan_flax import checkpoint
from vqgan_flax.atomic import write_atomic
from vqgan_flax.config import VQGANConfig
from vqgan_flax.torch_checkpoint import read_state_dict

LOSS_PREFIX = "loss."
LOSS_FILE = "loss.safetensors"

Transform = Callable[[np.ndarray], np.ndarray]


class Rule(NamedTuple):
    """A taming parameter `<module>.<taming_leaf>` is our `<module>.<our_leaf>` (or `<module>` when our_leaf is '')."""

    module: str  # regex, full match on the module path
    taming_leaf: str
    our_leaf: str
    to_ours: Transform
    to_taming: Transform


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _oihw_to_hwio(x: np.ndarray) -> np.ndarray:
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D conv weight, got shape {x.shape}")
    return x.transpose(2, 3, 1, 0)


def _hwio_to_oihw(x: np.ndarray) -> np.ndarray:
    return x.transpose(3, 2, 0, 1)


# First match wins. Module paths are identical on both sides (see vqgan_flax.model).
RULES: tuple[Rule, ...] = (
    Rule(r".+\.norm(?:1|2|_out)?", "weight", "scale", _same, _same),  # GroupNorm
    Rule(r"quantize\.embedding", "weight", "", _same, _same),  # codebook (n_embed, embed_dim)
    Rule(r".+", "weight", "kernel", _oihw_to_hwio, _hwio_to_oihw),  # Conv2d
    Rule(r".+", "bias", "bias", _same, _same),
)


class ConversionError(ValueError):
    """The checkpoint cannot be converted for this config."""


def _our_name(key: str) -> tuple[str, Rule] | None:
    module, _, leaf = key.rpartition(".")
    for rule in RULES:
        if leaf == rule.taming_leaf and re.fullmatch(rule.module, module):
            return (f"{module}.{rule.our_leaf}" if rule.our_leaf else module), rule
    return None


def _taming_name(name: str) -> tuple[str, Rule]:
    for rule in RULES:
        module, _, leaf = name.rpartition(".") if rule.our_leaf else (name, "", "")
        if leaf == rule.our_leaf and re.fullmatch(rule.module, module):
            return f"{module}.{rule.taming_leaf}", rule
    raise ConversionError(f"no rule maps parameter {name} back to a taming key")


def to_flax(state: Mapping[str, np.ndarray], source: str = "state_dict") -> dict[str, np.ndarray]:
    """taming generator state dict -> our flat parameters. Keys no rule maps are errors."""
    out: dict[str, np.ndarray] = {}
    unmapped = []
    for key, value in state.items():
        mapped = _our_name(key)
        if mapped is None:
            unmapped.append(key)
            continue
        try:
            out[mapped[0]] = mapped[1].to_ours(value)
        except ValueError as err:
            raise ConversionError(f"{source}: {key}: {err}") from err
    if unmapped:
        raise ConversionError(f"{source}: unknown generator keys {sorted(unmapped)}")
    return out


def to_taming(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat parameters -> a taming generator state dict (the inverse of `to_flax`)."""
    out = {}
    for name, value in params.items():
        key, rule = _taming_name(name)
        out[key] = np.ascontiguousarray(rule.to_taming(np.asarray(value)))
    return out


def taming_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every generator tensor a taming checkpoint for `config` holds (computed abstractly)."""
    shapes = {}
    for name, shape in checkpoint.param_shapes(config).items():
        key, rule = _taming_name(name)
        shapes[key] = rule.to_taming(np.broadcast_to(np.float32(0), shape)).shape
    return shapes


def split_state(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(generator tensors, `loss.*` tensors)."""
    loss = {k: v for k, v in state.items() if k.startswith(LOSS_PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(LOSS_PREFIX)}, loss


def convert(ckpt: str | Path, config_yaml: str | Path, out: str | Path) -> str:
    """Convert and write DIR; returns the VQ-GAN fingerprint."""
    generator, loss = split_state(read_state_dict(ckpt))
    config = VQGANConfig.from_taming_yaml(config_yaml)
    source = f"checkpoint {ckpt} does not match config {config_yaml}"
    try:
        checkpoint.check_params(generator, taming_shapes(config), source)
    except checkpoint.CheckpointError as err:
        raise ConversionError(str(err)) from err
    params = to_flax(generator, source)
    if Path(out).is_dir() and any(Path(out).iterdir()):  # only the same VQ-GAN again (e.g. without its loss)
        meta = Path(out) / checkpoint.META_FILE
        if not meta.is_file() or checkpoint.read_fingerprint(out) != checkpoint.stored_fingerprint(params):
            raise ConversionError(f"--out {out}: holds other files or another VQ-GAN (codes may have been made "
                                  "with it); give a new directory")
    loss_path = Path(out) / LOSS_FILE
    Path(out).mkdir(parents=True, exist_ok=True)
    if loss:  # before the parameters, whose meta.json (written last) marks the directory complete
        write_atomic(loss_path, safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in loss.items()}))
    else:
        loss_path.unlink(missing_ok=True)  # never keep another model's loss tensors beside these parameters
    return checkpoint.write(out, config, params, {"source": Path(ckpt).name})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vqgan_flax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="taming Lightning checkpoint (.ckpt)")
    parser.add_argument("--config", required=True, help="the taming yaml it was trained with")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        fingerprint = convert(args.ckpt, args.config, args.out)
    except (ValueError, OSError) as err:  # every user-caused error names its file
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {args.out} (fingerprint {fingerprint})")


if __name__ == "__main__":
    main()
