"""XLA:GPU's compiled decoding step for an H100, on a machine without one, and the kernels it launches.

Deviceless ahead-of-time compilation (`llmcxr_jax.aot`: the CUDA PJRT plugin without CUDA libraries, the
`gpu-aot` extra). Fusion, layout and kernel choices are XLA's own for sm_90; with no device there is no
autotuning, so tile sizes and split-k come from its heuristics. This is how the KV-cache layout, the batch-1
matmuls and the blockwise top-k were chosen (NOTES.md).

    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/gpu_compile.py --shape 2.8b --batch 1
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from llmcxr_jax import aot
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, unstack_layers
from shapes import LLMCXR_VOCAB, SHAPES  # noqa: E402  bench/shapes.py

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_LAUNCH = re.compile(r"%([\w-]+?)(?:\.\d+)? = (\([^()]*\)|\w+\[[\d,]*\]\{[\d,]*\}) "
                     r"(?:fusion|custom-call|copy|transpose)\(")
_LAYOUT = re.compile(r"\{[\d,]*\}")
_CALLS = re.compile(r"kind=k\w+, calls=%([\w.-]+)")


def kernels(hlo_text: str) -> Counter[str]:
    """What the compiled module launches, by 'name output-shape' (e.g. 'loop_multiply_fusion bf16[32,80,2560]',
    a tuple output as '(bf16[2,512], bf16[2,512])'): the fusions, custom calls, copies and transposes of its
    unfused computations (entry and loop bodies), each counted once per place it appears (not per loop trip)."""
    blocks: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group(1)
            blocks[name] = []
        elif name is not None and line.strip() and line != "}":
            blocks[name].append(line)
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
    args = parser.parse_args()
    config = GPTNeoXConfig(vocab_size=LLMCXR_VOCAB, **SHAPES[args.shape], dtype="bfloat16", param_dtype="bfloat16")
    image_codes = (LLMCXR_VOCAB - 1024, LLMCXR_VOCAB)  # the vocabulary's last 1,024 ids
    hlo = decode_step_hlo(config, args.batch, args.cache_length, image_codes if args.image else None)
    if args.hlo_out:
        args.hlo_out.write_text(hlo)
    counts = kernels(hlo)
    print(f"decoding step, {args.shape} bf16, batch {args.batch}, cache {args.cache_length}"
          f"{', image codes only' if args.image else ''}, XLA:GPU for "
          f"{aot.H100_TARGET_CONFIG.name}: {sum(counts.values())} kernels")
    for kernel, n in counts.most_common():
        print(f"{n:6d}  {kernel}")


if __name__ == "__main__":
    main()
