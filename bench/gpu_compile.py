"""XLA:GPU's compiled programs for an H100, on a machine without one: the decoding step's kernels, or the
training step's kernels ranked by the memory they move.

Deviceless ahead-of-time compilation (`llmcxr_jax.aot`: the CUDA PJRT plugin without CUDA libraries, the
`gpu-aot` extra). Fusion, layout and kernel choices are XLA's own for sm_90; with no device there is no
autotuning, so tile sizes and split-k come from its heuristics. This is how the KV-cache layout, the batch-1
matmuls, the blockwise top-k and the GELU were chosen (NOTES.md). cuDNN attention needs a GPU to compile, so in
the training step it is an opaque kernel of cuDNN's operands and results (`aot.cudnn_shaped_attention`): the rest
of the program is what XLA builds around cuDNN's kernels, which are missing from the list (`--attention xla`:
XLA's attention instead).

    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/gpu_compile.py --shape 2.8b --batch 1
    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/gpu_compile.py --train --batch 8     # configs/stage1.py's 2.8B
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llmcxr_jax import aot, lm_task, parallel
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, unstack_layers
from shapes import LLMCXR_VOCAB, SHAPES  # noqa: E402  bench/shapes.py

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_LAUNCH = re.compile(r"%([\w-]+?)(?:\.\d+)? = (\([^()]*\)|\w+\[[\d,]*\]\{[\d,]*\}) "
                     r"(?:fusion|custom-call|copy|transpose)\(")
_LAYOUT = re.compile(r"\{[\d,]*\}")
_CALLS = re.compile(r"kind=k\w+, calls=%([\w.-]+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\(.*?\)|\w+\[[\d,]*\](?:\{[\d,]*\})?) ([\w-]+)\((.*)$")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|bf16|[fsu](?:8|16|32|64))\[([\d,]*)\]")
_NOT_LAUNCHED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def _launched(op: str) -> bool:
    """Whether an instruction runs work of its own: an async pair's `*-done` (jax 0.12's XLA runs dynamic-slice fusions
    as fusion-start/fusion-done) only waits for what its `*-start` moved."""
    return op not in _NOT_LAUNCHED and not op.endswith("-done")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """The module's computations by name, each its instruction lines."""
    blocks: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group(1)
            blocks[name] = []
        elif name is not None and line.strip() and line != "}":
            blocks[name].append(line)
    return blocks


def kernels(hlo_text: str) -> Counter[str]:
    """What the compiled module launches, by 'name output-shape' (e.g. 'loop_multiply_fusion bf16[32,80,2560]',
    a tuple output as '(bf16[2,512], bf16[2,512])'): the fusions, custom calls, copies and transposes of its
    unfused computations (entry and loop bodies), each counted once per place it appears (not per loop trip)."""
    blocks = _computations(hlo_text)
    fused = {m.group(1) for lines in blocks.values() for line in lines for m in [_CALLS.search(line)] if m}
    counts: Counter[str] = Counter()
    for block, lines in blocks.items():
        if block in fused:
            continue
        for line in lines:
            m = _LAUNCH.search(line)
            if m:
                counts[f"{m.group(1)} {_LAYOUT.sub('', m.group(2))}"] += 1
    return counts


def _bytes(shapes: str) -> int:
    """Bytes of every array shape written in `shapes` (one, or a tuple's)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _ITEM_BYTES[kind]
               for kind, dims in _ARRAY.findall(shapes))


class Traffic(NamedTuple):
    """One launched instruction: the bytes it reads and writes per run, and how often it runs per call."""
    name: str
    shape: str
    op: str  # the JAX source op (metadata op_name)
    bytes_per_run: int
    runs: int


def _fusion_bytes(lines: list[str]) -> int:
    """Reads plus writes of a fused computation: a parameter read only through slices or gathers costs what they
    read, the buffer an in-place dynamic-update-slice root writes into costs nothing, and that root its update."""
    defs = {m.group(1): m.groups()[1:] for line in lines for m in [_INSTRUCTION.match(line)] if m}
    users: dict[str, list[tuple[str, int, str]]] = {}
    for name, (shape, op, rest) in defs.items():
        for position, operand in enumerate(re.findall(r"%([\w.-]+)", rest.split(")")[0])):
            users.setdefault(operand, []).append((op, position, shape))
    total = 0
    for name, (shape, op, _) in defs.items():
        if op != "parameter":
            continue
        uses = users.get(name, [])
        if uses and all(use in ("slice", "dynamic-slice", "gather") and position == 0 for use, position, _ in uses):
            total += sum(_bytes(sliced) for _, _, sliced in uses)
        elif not (uses and all(use == "dynamic-update-slice" and position == 0 for use, position, _ in uses)):
            total += _bytes(shape)
    root = next(m for line in lines if line.lstrip().startswith("ROOT") for m in [_INSTRUCTION.match(line)] if m)
    outputs = re.findall(r"%([\w.-]+)", root.group(4).split(")")[0]) if root.group(3) == "tuple" else [root.group(1)]
    for output in outputs:
        shape, op, rest = defs[output]
        while op == "bitcast":
            shape, op, rest = defs[re.search(r"%([\w.-]+)", rest).group(1)]
        total += _bytes(defs[re.findall(r"%([\w.-]+)", rest)[1]][0] if op == "dynamic-update-slice" else shape)
    return total


def traffic(hlo_text: str) -> list[Traffic]:
    """Every launched instruction of the entry computation and (per trip) its loops, with an estimate of the
    memory it moves: operand plus result bytes from the shapes (what a memory-bound kernel costs; a GEMM's tiles
    are read more than once, so GEMMs are a lower bound)."""
    blocks = _computations(hlo_text)
    entry = re.search(r"^ENTRY %(\S+) ", hlo_text, re.M).group(1)
    rows: list[Traffic] = []

    def walk(block: str, runs: int) -> None:
        defs = {m.group(1): m.group(2) for line in blocks[block] for m in [_INSTRUCTION.match(line)] if m}
        for line in blocks[block]:
            m = _INSTRUCTION.match(line)
            if not m or not _launched(m.group(3)):
                continue
            name, shape, op, rest = m.groups()
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                walk(re.search(r"body=%([\w.-]+)", rest).group(1), runs * int(trips.group(1) if trips else 1))
                continue
            called = _CALLS.search(rest)
            if called:
                moved = _fusion_bytes(blocks[called.group(1)])
            else:
                operands = re.findall(r"%([\w.-]+)", rest.split(")")[0])
                moved = _bytes(shape) + sum(_bytes(defs.get(operand, "")) for operand in operands)
            source = re.search(r'op_name="([^"]*)"', rest)
            rows.append(Traffic(name, _LAYOUT.sub("", shape), source.group(1) if source else "", moved, runs))

    walk(entry, 1)
    return rows


def train_step_hlo(batch: int, seq_len: int, variant: str = "", attention: str = "cudnn_shaped") -> str:
    """The optimized HLO of one training step of configs/stage1.py (`variant`; "" = the 2.8B model) on a
    synthetic batch of `batch` × `seq_len`, compiled for one H100, with `attention` "cudnn_shaped"
    (`aot.cudnn_shaped_attention`) or "xla"."""
    from llmcxr_jax import config_files, train  # ml_collections: only the train mode needs it (not on GPU hosts)

    config = config_files.load_config(f"stage1:{variant}")
    config.data.update(source="synthetic", seq_len=seq_len)
    config.train.update(global_batch_size=batch, num_steps=1)
    config.model.attention_impl = "xla"
    mesh = train.topology_mesh("h100:1", config.mesh.shape)
    train.check_config(config, mesh)  # e.g. an odd --batch, which loss_mode "original" cannot group in pairs
    rules = parallel.DEFAULT_RULES
    task = lm_task.build_task(config, mesh=mesh, rules=rules, total_steps=1,
                              metadata={"stage": 1, **train.token_metadata(config), "vqgan_fingerprint": ""})
    with aot.cudnn_shaped_attention() if attention == "cudnn_shaped" else contextlib.nullcontext():
        return train.compile_step(task, train.lm_batch_shapes(config), mesh, rules).as_text()


def decode_step_hlo(config: GPTNeoXConfig, batch: int, cache_length: int,
                    vocab_range: tuple[int, int] | None = None) -> str:
    """The optimized HLO of one cached decoding step (`GPTNeoX.extend` of one token per row, per-layer weight
    buffers as `Sampler` decodes; logits over `vocab_range` only, as image mode asks), compiled for an H100."""
    device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    model = nnx.eval_shape(lambda: unstack_layers(GPTNeoX(config, rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(model)

    def on_device(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)

    state = jax.tree.map(on_device, state)
    cache = jax.tree.map(on_device, jax.eval_shape(lambda: model.init_cache(batch, cache_length)))
    ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=device)

    def step(state, ids, cache):
        return nnx.merge(graphdef, state).extend(ids, cache, vocab_range=vocab_range)

    return jax.jit(step, donate_argnums=2).lower(state, ids, cache).compile().as_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="2.8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache_length", type=int, default=384, help="prompt + new tokens (bench: 128 + 256)")
    parser.add_argument("--image", action="store_true", help="logits for the 1,024 image codes only (image mode)")
    parser.add_argument("--hlo_out", type=Path, help="also write the optimized HLO here")
    parser.add_argument("--train", action="store_true", help="configs/stage1.py's training step instead (2.8B)")
    parser.add_argument("--seq", type=int, default=1024, help="with --train: sequence length")
    parser.add_argument("--attention", choices=("cudnn_shaped", "xla"), default="cudnn_shaped",
                        help="with --train: cuDNN's attention as opaque kernels of its shapes, or XLA's attention")
    parser.add_argument("--top", type=int, default=40, help="with --train: kernels listed")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s for the ms column (H200: 4.8e12)")
    args = parser.parse_args()
    if args.train:
        return print_train_traffic(args)
    config = GPTNeoXConfig(vocab_size=LLMCXR_VOCAB, **SHAPES[args.shape], dtype="bfloat16", param_dtype="bfloat16")
    image_codes = (LLMCXR_VOCAB - 1024, LLMCXR_VOCAB)  # the vocabulary's last 1,024 ids
    hlo = decode_step_hlo(config, args.batch, args.cache_length, image_codes if args.image else None)
    if args.hlo_out:
        args.hlo_out.write_text(hlo)
    counts = kernels(hlo)
    moved = sum(r.bytes_per_run * r.runs for r in traffic(hlo))
    weights = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: GPTNeoX(config, rngs=nnx.Rngs(0))))))
    print(f"decoding step, {args.shape} bf16, batch {args.batch}, cache {args.cache_length}"
          f"{', image codes only' if args.image else ''}, XLA:GPU for "
          f"{aot.H100_TARGET_CONFIG.name}: {sum(counts.values())} kernels, {moved / 1e9:.2f} GB moved (estimate; "
          f"all weights: {weights / 1e9:.2f} GB), {moved / args.bandwidth * 1e3:.2f} ms at "
          f"{args.bandwidth / 1e12:.1f} TB/s")
    for kernel, n in counts.most_common():
        print(f"{n:6d}  {kernel}")


def print_train_traffic(args: argparse.Namespace) -> None:
    hlo = train_step_hlo(args.batch, args.seq, attention=args.attention)
    if args.hlo_out:
        args.hlo_out.write_text(hlo)
    rows = sorted(traffic(hlo), key=lambda r: -r.bytes_per_run * r.runs)
    total = sum(r.bytes_per_run * r.runs for r in rows)
    attention = "cuDNN's attention as opaque kernels" if args.attention == "cudnn_shaped" else "XLA's attention"
    print(f"training step, configs/stage1.py (2.8B), batch {args.batch} x {args.seq}, {attention}, XLA:GPU for "
          f"{aot.H100_TARGET_CONFIG.name}: {len(rows)} kernels, {total / 1e9:.0f} GB moved (estimate), "
          f"{total / args.bandwidth * 1e3:.0f} ms at {args.bandwidth / 1e12:.1f} TB/s")
    print(f"{'GB':>8} {'ms':>7} {'runs':>5}  kernel  shape  source op")
    for r in rows[:args.top]:
        moved = r.bytes_per_run * r.runs
        print(f"{moved / 1e9:8.2f} {moved / args.bandwidth * 1e3:7.2f} {r.runs:5d}  {r.name}  {r.shape[:70]}  "
              f"{r.op[-70:]}")


if __name__ == "__main__":
    main()
