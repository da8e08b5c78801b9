"""Hugging Face GPT-NeoX ↔ our stacked NNX layout, tensor by tensor, from one table of names and transforms.

Loading fills an abstract model (`nnx.eval_shape`) one stacked tensor at a time from memory-mapped files, so
host memory stays near one copy of the model. CLI:

    python -m llmcxr_jax.convert hf-to-orbax HF_DIR CKPT_DIR
    python -m llmcxr_jax.convert orbax-to-hf CKPT_DIR HF_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax import parallel
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, pad_vocab, resolve_dtype
from llmcxr_jax.safetensors_io import SafetensorsError, SafetensorsFile, write_file
from llmcxr_jax.tokenizer import LAYOUT_FILE
from vqgan_flax.json_object import read_json_object
from vqgan_flax.torch_checkpoint import damaged_entry

# Registered buffers of older transformers checkpoints; they hold no weights.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")
LAYER = "gpt_neox.layers.{i}."


class ConversionError(ValueError):
    """An HF directory or checkpoint that cannot be converted; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One tensor: our parameter path, its HF name, the HF shape, and the transforms in both directions."""

    ours: tuple[str, ...]
    hf: str  # may contain {i} for per-layer tensors
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def conversion_table(cfg: GPTNeoXConfig) -> list[Row]:
    """The mapping for a config; HF Linear weights are (out, in), ours are (in, ..., out)."""
    V, E, N, H, M = cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    R = cfg.table_rows  # our embedding tables carry zero rows past the vocabulary (GPTNeoXConfig.vocab_multiple)
    rows = [
        Row(("embed_in",), "gpt_neox.embed_in.weight", (V, E), lambda w: pad_vocab(w, R, 0), lambda a: a[:V]),
        Row(("final_ln_scale",), "gpt_neox.final_layer_norm.weight", (E,), _same, _same),
        Row(("final_ln_bias",), "gpt_neox.final_layer_norm.bias", (E,), _same, _same),
        Row(("layers", "ln1_scale"), LAYER + "input_layernorm.weight", (E,), _same, _same),
        Row(("layers", "ln1_bias"), LAYER + "input_layernorm.bias", (E,), _same, _same),
        Row(("layers", "ln2_scale"), LAYER + "post_attention_layernorm.weight", (E,), _same, _same),
        Row(("layers", "ln2_bias"), LAYER + "post_attention_layernorm.bias", (E,), _same, _same),
        # Fused QKV rows are ordered (head, [q|k|v], head_dim): HF views the output as (..., heads, 3·head_dim).
        Row(("layers", "qkv_kernel"), LAYER + "attention.query_key_value.weight", (3 * E, E),
            lambda w: w.T.reshape(E, N, 3, H), lambda a: a.reshape(E, 3 * E).T),
        Row(("layers", "qkv_bias"), LAYER + "attention.query_key_value.bias", (3 * E,),
            lambda b: b.reshape(N, 3, H), lambda a: a.reshape(3 * E)),
        Row(("layers", "out_kernel"), LAYER + "attention.dense.weight", (E, E),
            lambda w: w.T.reshape(N, H, E), lambda a: a.reshape(E, E).T),
        Row(("layers", "out_bias"), LAYER + "attention.dense.bias", (E,), _same, _same),
        Row(("layers", "up_kernel"), LAYER + "mlp.dense_h_to_4h.weight", (M, E), _t, _t),
        Row(("layers", "up_bias"), LAYER + "mlp.dense_h_to_4h.bias", (M,), _same, _same),
        Row(("layers", "down_kernel"), LAYER + "mlp.dense_4h_to_h.weight", (E, M), _t, _t),
        Row(("layers", "down_bias"), LAYER + "mlp.dense_4h_to_h.bias", (E,), _same, _same),
    ]
    if not cfg.tie_word_embeddings:
        rows.append(Row(("embed_out",), "embed_out.weight", (V, E), lambda w: pad_vocab(w.T, R, 1),
                        lambda a: a[:, :V].T))
    return rows


def _hf_names(row: Row, num_layers: int) -> list[str]:
    return [row.hf.format(i=i) for i in range(num_layers)] if row.per_layer else [row.hf]


# How transformers looks for weights, in its order: a stale index beside a newer single file is not read.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# LLM-CXR's metadata (token layout, VQ-GAN grid and fingerprint, provenance) beside an HF config.json.
HF_METADATA_FILE = "llmcxr_metadata.json"


class TensorSource:
    """Name → numpy tensor over an HF directory's weight files (single or sharded, safetensors or .bin)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._files: dict[str, Path] = {}
        self._opened: dict[Path, Any] = {}
        for name in WEIGHT_FILES:  # transformers' order, so both read the same weights
            path = directory / name
            if not path.exists():
                continue
            if not name.endswith(".index.json"):
                self._files = {name: path for name in self._open(path).keys()}
                return
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{path}: not a valid index file ({e!r})") from None
            if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                raise ConversionError(f"{path}: not a valid index file (weight_map must map tensor names to file "
                                      f"names, got {str(weight_map)[:200]})")
            self._files = {name: directory / fname for name, fname in weight_map.items()}
            return
        raise ConversionError(f"{directory}: no weights found (expected model.safetensors, "
                              "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")

    def _open(self, path: Path) -> Any:
        if path not in self._opened:
            if not path.exists():
                raise ConversionError(f"{path}: weight file named by the index is missing")
            self._opened[path] = _open_safetensors(path) if path.suffix == ".safetensors" else _TorchBin(path)
        return self._opened[path]

    def names(self) -> set[str]:
        return set(self._files)

    def get(self, name: str) -> np.ndarray:
        opened = self._open(self._files[name])
        if name not in opened.keys():
            raise ConversionError(f"{self._files[name]}: the index says it holds {name!r}, but it does not")
        return opened.get(name)

    def file_of(self, name: str) -> Path:
        return self._files[name]


def _open_safetensors(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from None


class _TorchBin:
    """A `pytorch_model.bin` opened with `weights_only=True` and mmap; torch is imported only here."""

    def __init__(self, path: Path):
        try:
            import torch  # conversion of .bin files is the only place torch is needed
        except ImportError:
            raise ConversionError(f"{path}: reading PyTorch .bin weights needs torch; install the `convert` extra "
                                  "(torch for your machine), or give a directory with .safetensors weights") from None
        self._torch = torch
        if (damaged := damaged_entry(path)) is not None:
            raise ConversionError(f"{path}: damaged: entry {damaged} fails its CRC check; download the file again")
        try:
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
            raise ConversionError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e}); "
                                  "the file may be truncated or not a state dict") from None
        if not isinstance(self._state, dict):
            raise ConversionError(f"{path}: expected a state dict, found {type(self._state).__name__}")

    def keys(self) -> list[str]:
        return list(self._state)

    def get(self, name: str) -> np.ndarray:
        t = self._state[name].detach()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(jnp.bfloat16)
        return t.numpy()


def _check_names(src: TensorSource, table: list[Row], cfg: GPTNeoXConfig) -> None:
    expected = {n for row in table for n in _hf_names(row, cfg.num_hidden_layers)}
    present = {n for n in src.names() if not n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("embed_out.weight")
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing:
        raise ConversionError(f"{src.directory}: {len(missing)} tensors missing from the weights, e.g. {missing[:5]}")
    if unknown:
        raise ConversionError(f"{src.directory}: {len(unknown)} unexpected tensors for a GPT-NeoX with this "
                              f"config.json, e.g. {unknown[:5]}")


def _read_row(src: TensorSource, row: Row, cfg: GPTNeoXConfig, dtype: np.dtype) -> np.ndarray:
    parts = []
    for name in _hf_names(row, cfg.num_hidden_layers):
        tensor = src.get(name)
        if tuple(tensor.shape) != row.hf_shape:
            raise ConversionError(f"{src.file_of(name)}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"but config.json implies {row.hf_shape}")
        parts.append(np.asarray(row.to_ours(tensor), dtype=dtype))
    return np.stack(parts) if row.per_layer else parts[0]


def abstract_model(cfg: GPTNeoXConfig) -> GPTNeoX:
    """The model's structure with ShapeDtypeStructs instead of arrays: nothing is allocated."""
    return nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0)))


def load_hf_model(path: str | Path, dtype: str = "float32", *, mesh: jax.sharding.Mesh | None = None,
                  rules: parallel.Rules = parallel.DEFAULT_RULES, **runtime: Any) -> GPTNeoX:
    """Read an HF GPT-NeoX directory. `dtype` sets parameter and compute dtype unless `runtime` overrides them.

    With `mesh`, each tensor goes straight to its shards, so a model larger than one device loads.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ConversionError(f"{directory}: not a directory (expected an HF model directory with config.json)")
    runtime = {"dtype": dtype, "param_dtype": dtype, **runtime}
    resolve_dtype(runtime["param_dtype"])
    try:
        cfg = GPTNeoXConfig.from_hf_file(directory / "config.json", **runtime)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    src = TensorSource(directory)
    table = conversion_table(cfg)
    _check_names(src, table, cfg)
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = nnx.to_pure_dict(parallel.state_shardings(state, mesh, rules)) if mesh is not None else None
    pure = nnx.to_pure_dict(state)
    np_dtype = np.dtype(resolve_dtype(cfg.param_dtype))
    for row in table:
        array = _read_row(src, row, cfg, np_dtype)
        target = _get(shardings, row.ours) if shardings is not None else None
        _set(pure, row.ours, jax.device_put(array, target) if target is not None else jnp.asarray(array))
        del array
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def save_hf_model(model: GPTNeoX, path: str | Path, *, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write `config.json` and safetensors (sharded with an index above `max_shard_bytes`) that transformers loads."""
    cfg = model.config
    out = Path(path)
    present = sorted(p.name for p in out.glob("*") if p.name in WEIGHT_FILES or p.name.startswith("model-"))
    if present:  # old shards or an index left beside new weights would be read instead of them
        raise ConversionError(f"{out}: already holds weights {present}; write to an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    entries = []
    for row in conversion_table(cfg):
        stacked = _get(pure, row.ours)
        for i, name in enumerate(_hf_names(row, cfg.num_hidden_layers)):
            def produce(stacked=stacked, i=i, row=row):
                return row.to_hf(np.asarray(stacked[i] if row.per_layer else stacked))
            entries.append((name, row.hf_shape, np.dtype(stacked.dtype), produce))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * entry[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        write_file(out / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_file(out / fname, shard)
            weight_map.update({e[0]: fname for e in shard})
        total = sum(int(np.prod(e[1])) * e[2].itemsize for e in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf()
    dtype_name = str(np.dtype(resolve_dtype(cfg.param_dtype)))
    hf.update(torch_dtype=dtype_name, dtype=dtype_name)
    (out / "config.json").write_text(json.dumps(hf, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmcxr_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h2o = sub.add_parser("hf-to-orbax", help="HF GPT-NeoX directory → Orbax parameter checkpoint")
    h2o.add_argument("hf_dir")
    h2o.add_argument("ckpt_dir")
    h2o.add_argument("--dtype", default="float32", help="parameter dtype to store (float32, bfloat16, float16)")
    h2o.add_argument("--vocab_multiple", type=int, default=GPTNeoXConfig.vocab_multiple,
                     help="pad the embedding tables to a multiple of this many rows (the training config's "
                          "model.vocab_multiple; 1 = none)")
    o2h = sub.add_parser("orbax-to-hf", help="Orbax parameter checkpoint → HF directory (config.json + safetensors)")
    o2h.add_argument("ckpt_dir")
    o2h.add_argument("hf_dir")
    args = parser.parse_args(argv)
    try:
        _convert(args)
    except (ValueError, OSError) as e:  # ConversionError, CheckpointError, missing files: the message names them
        sys.exit(f"error: {e}")
    print(f"wrote {args.ckpt_dir if args.command == 'hf-to-orbax' else args.hf_dir}")


def _convert(args: argparse.Namespace) -> None:
    from llmcxr_jax import checkpoint

    if args.command == "hf-to-orbax":
        target = Path(args.ckpt_dir)
        if target.exists() and any(target.iterdir()):  # Orbax would replace what is there without a word
            raise ConversionError(f"{target}: not empty; write to an empty directory")
        model = load_hf_model(args.hf_dir, dtype=args.dtype, vocab_multiple=args.vocab_multiple)
        carried = read_hf_metadata(Path(args.hf_dir))
        checkpoint.save_model(model, args.ckpt_dir,
                              extra_metadata={**carried, "converted_from": str(Path(args.hf_dir))})
        _copy_tokenizer(Path(args.hf_dir), Path(args.ckpt_dir))
    else:
        model = checkpoint.load_model(args.ckpt_dir)
        meta, _, _ = checkpoint.latest_metadata(args.ckpt_dir)
        save_hf_model(model, args.hf_dir)
        own = {k: v for k, v in meta.items() if k not in ("format_version", "model_config", "versions")}
        if own:
            checkpoint.write_json_atomic(Path(args.hf_dir) / HF_METADATA_FILE, own)
        _copy_tokenizer(Path(args.ckpt_dir), Path(args.hf_dir))


def read_hf_metadata(directory: Path) -> dict[str, Any]:
    """The LLM-CXR metadata an `orbax-to-hf` export left beside config.json ({} for a plain HF directory)."""
    return read_json_object(directory / HF_METADATA_FILE, ConversionError, missing_ok=True)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Carry the tokenizer along, with LLM-CXR's token layout (image codes, offsets) that lives beside it."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", LAYOUT_FILE):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


if __name__ == "__main__":
    main()
