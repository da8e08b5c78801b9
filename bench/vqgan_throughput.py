"""VQ-GAN encode/decode throughput: ours (JAX, jitted) and, with --ref, the taming PyTorch modules, same run.

    PYTHONPATH=. python bench/vqgan_throughput.py --shape tiny --ref
    PYTHONPATH=. python bench/vqgan_throughput.py --shape f16 --batch 64 --ref      # GPU

Random weights and random inputs (never zeros). Each measurement: warm-up calls (compile), then `--repeats`
timed calls synchronised with block_until_ready / cuda.synchronize; the median is reported. Encode is
image -> codes, decode is codes -> image (the LLM-CXR decode path: codebook lookup, post_quant_conv, decoder).
Prints one JSON line per measurement, then a table, and appends the lines to bench/results/vqgan.jsonl.
Imports only jax, flax, numpy, torch and taming (+ vqgan_flax).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the torch reference

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from vqgan_flax import checkpoint  # noqa: E402
from vqgan_flax.config import PRESETS, VQGANConfig  # noqa: E402
from timing import median_seconds  # bench/timing.py (scripts run from bench/)

RESULTS = Path(__file__).resolve().parent / "results" / "vqgan.jsonl"


def bench_ours(config: VQGANConfig, batch: int, dtype: str, warmup: int, repeats: int) -> dict[str, float]:
    model = checkpoint.build(config, checkpoint.random_params(config), dtype=jnp.dtype(dtype))
    graphdef, state = nnx.split(model)
    k1, k2 = jax.random.split(jax.random.key(0))
    images = jax.random.uniform(k1, (batch, config.resolution, config.resolution, config.in_channels),
                                minval=-1, maxval=1)
    codes = jax.random.randint(k2, (batch, *config.grid), 0, config.n_embed)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    decode = jax.jit(lambda s, c: nnx.merge(graphdef, s).decode(c))
    return {"encode": median_seconds(lambda: encode(state, images).block_until_ready(), warmup, repeats)[0],
            "decode": median_seconds(lambda: decode(state, codes).block_until_ready(), warmup, repeats)[0]}


def bench_taming(config: VQGANConfig, batch: int, warmup: int, repeats: int,
                 threads: int | None) -> tuple[dict[str, float], str]:
    import torch
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ddconfig = {k: v for k, v in config.to_dict().items() if k not in ("n_embed", "embed_dim")}
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # taming's Decoder prints its z shape; stdout is for results
        encoder, decoder = Encoder(**ddconfig).to(device).eval(), Decoder(**ddconfig).to(device).eval()
    quantize = VectorQuantizer(config.n_embed, config.embed_dim, beta=0.25).to(device).eval()
    quant_conv = torch.nn.Conv2d(config.z_channels, config.embed_dim, 1).to(device).eval()
    post_quant_conv = torch.nn.Conv2d(config.embed_dim, config.z_channels, 1).to(device).eval()
    images = torch.rand(batch, config.in_channels, config.resolution, config.resolution, device=device) * 2 - 1
    codes = torch.randint(0, config.n_embed, (batch * config.grid[0] * config.grid[1],), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def encode() -> None:
        quantize(quant_conv(encoder(images)))
        sync()

    @torch.inference_mode()
    def decode() -> None:
        z_q = quantize.get_codebook_entry(codes, (batch, *config.grid, config.embed_dim))
        decoder(post_quant_conv(z_q))
        sync()

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"encode": median_seconds(encode, warmup, repeats)[0],
            "decode": median_seconds(decode, warmup, repeats)[0]}, f"torch {torch.__version__} {name}"


def record(impl: str, op: str, seconds: float, args: argparse.Namespace, dtype: str, device: str) -> dict:
    return {"bench": "vqgan_throughput", "impl": impl, "op": op, "shape": args.shape, "batch": args.batch,
            "dtype": dtype, "images_per_s": round(args.batch / seconds, 2), "median_ms": round(seconds * 1e3, 3),
            "repeats": args.repeats, "device": device, "date": datetime.date.today().isoformat()}


def taming_importable() -> bool:
    """The GPU machines have no taming: the suite carries it as source, and goes on without it if it is not there."""
    try:
        import taming  # noqa: F401
    except ImportError:
        return False
    return True


def keep(rows: list[dict], out: Path) -> list[dict]:
    """Print `rows` and append them to `out` at once."""
    with out.open("a") as f:
        for row in rows:
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="our compute dtype")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ref", action="store_true", help="also time the taming PyTorch modules (fp32)")
    parser.add_argument("--torch_threads", type=int, help="torch CPU threads (on a busy CPU, 1 can beat spinning)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = PRESETS[args.shape]
    device = f"jax {jax.__version__} {jax.devices()[0].device_kind} x{jax.device_count()} (one used)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = keep([record("jax", op, s, args, args.dtype, device)
                 for op, s in bench_ours(config, args.batch, args.dtype, args.warmup, args.repeats).items()],
                args.out)  # before the reference: a time limit that stops it keeps these
    if args.ref and not taming_importable():
        print("taming is not importable (carry it on PYTHONPATH): no reference rows", file=sys.stderr)
    elif args.ref:
        times, ref_device = bench_taming(config, args.batch, args.warmup, args.repeats, args.torch_threads)
        rows += keep([record("taming", op, s, args, "float32", ref_device) for op, s in times.items()], args.out)
    print(f"\n{'impl':8} {'op':7} {'shape':6} {'batch':>5} {'dtype':9} {'images/s':>10} {'median ms':>10}")
    for r in rows:
        print(f"{r['impl']:8} {r['op']:7} {r['shape']:6} {r['batch']:>5} {r['dtype']:9} "
              f"{r['images_per_s']:>10.1f} {r['median_ms']:>10.2f}")


if __name__ == "__main__":
    main()
