"""Sampling latency: ours (one compiled loop) and, with --ref, transformers' `generate`, same weights, same run.

    PYTHONPATH=. python bench/generate_latency.py --shape tiny --ref
    PYTHONPATH=. python bench/generate_latency.py --shape 2.8b --dtype bfloat16 --ref      # GPU

Random weights in the GPT-NeoX shape named by --shape with LLM-CXR's 51305-id vocabulary; prompts are 128
random ids. Measurements (SPEC §10 settings: top-p 0.92, top-k off, temperature 1, no stop token):
- `text`: ms per new token at batch 1 and 16, 256 new tokens;
- `image`: seconds per image at batch 1: 256 image tokens. Ours uses the constrained mode (image ids only);
  transformers samples all ids freely, as the original does, so its image time is the batch-1 text run.
Times include the prefill; each is the median of --repeats calls after warm-up/compile, synchronised
(block_until_ready / cuda.synchronize). Both implementations run one after the other in this process (JAX with
XLA_PYTHON_CLIENT_PREALLOCATE=false). Prints one JSON line per measurement, then a table, and appends the lines
to bench/results/generate.jsonl. Imports only jax, flax, numpy, torch, transformers and llmcxr_jax.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to the torch reference

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llmcxr_jax.convert import save_hf_model  # noqa: E402
from llmcxr_jax.model import GPTNeoX, GPTNeoXConfig, unstack_layers  # noqa: E402
from llmcxr_jax.sampling import DecodeSpec, SamplingParams, decode, row_keys  # noqa: E402
from profile_ops import profile_top_ops  # noqa: E402  (bench/, like timing)
from shapes import LLMCXR_VOCAB, SHAPES  # noqa: E402  bench/shapes.py
from timing import median_seconds  # noqa: E402  bench/timing.py (scripts run from bench/)

RESULTS = Path(__file__).resolve().parent / "results" / "generate.jsonl"
IMAGE_OFFSET, NUM_CODES = 50281, 1024  # LLM-CXR's vocabulary (shapes.LLMCXR_VOCAB) at every shape
PROMPT_LEN, NEW_TOKENS = 128, 256
SAMPLING = SamplingParams()  # top-p 0.92, top-k off, temperature 1


def model_config(shape: str, dtype: str) -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=LLMCXR_VOCAB, **SHAPES[shape], dtype=dtype, param_dtype=dtype)


def prompts(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(1, IMAGE_OFFSET - 4, (batch, PROMPT_LEN)).astype(np.int32)


def bench_ours(model: GPTNeoX, batch: int, spec: DecodeSpec, args: argparse.Namespace,
               label: str) -> tuple[float, float]:
    """Median seconds per `decode` call and the first call's. Layouts: `stacked` weights scanned, `unstacked`
    (one buffer per layer, `unstack_layers` before jit), `unrolled` (stacked weights, unstacked inside jit)."""
    graphdef, state = nnx.split(unstack_layers(model) if args.layout == "unstacked" else model)

    @jax.jit
    def run(state, ids, valid, seed):
        module = nnx.merge(graphdef, state)
        module = unstack_layers(module) if args.layout == "unrolled" else module
        return decode(module, ids, valid, row_keys(seed, jnp.arange(ids.shape[0])), spec).tokens

    ids = jnp.asarray(prompts(batch))
    valid = jnp.ones_like(ids, bool)
    seeds = iter(range(1_000_000))

    def call():
        return run(state, ids, valid, jnp.uint32(next(seeds))).block_until_ready()

    timed = median_seconds(call, args.warmup, args.repeats)
    if args.profile:
        hlo = run.lower(state, ids, valid, jnp.uint32(0)).compile().as_text()  # the executable just timed
        profile_top_ops(call, f"decode {args.layout} {label} b{batch}", args.profile, hlo_text=hlo)
    return timed


def bench_transformers(hf_dir: str, dtype: str, batches: list[int], warmup: int, repeats: int,
                       threads: int | None) -> tuple[dict[int, float], str]:
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.GPTNeoXForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # never stop early: time exactly NEW_TOKENS tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = {}
    for batch in batches:
        ids = torch.as_tensor(prompts(batch), dtype=torch.long, device=device)

        @torch.inference_mode()
        def call() -> None:
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.92, top_k=0,
                           temperature=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
            sync()

        seconds[batch] = median_seconds(call, warmup, repeats)[0]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return seconds, f"torch {torch.__version__} transformers {transformers.__version__} {name}"


def record(impl: str, measure: str, batch: int, seconds: float, args: argparse.Namespace, device: str,
           first_call_s: float | None = None) -> dict:
    row = {"bench": "generate_latency", "impl": impl, "measure": measure, "shape": args.shape, "batch": batch,
           "dtype": args.dtype, "layout": args.layout if impl == "jax" else None, "prompt_len": PROMPT_LEN,
           "new_tokens": NEW_TOKENS,
           "ms_per_token": round(1e3 * seconds / NEW_TOKENS, 3), "tokens_per_s": round(batch * NEW_TOKENS / seconds, 1),
           "s_per_call": round(seconds, 4), "repeats": args.repeats, "device": device,
           "xla_flags": os.environ.get("XLA_FLAGS", "") if impl == "jax" else None,
           "date": datetime.date.today().isoformat()}
    if measure == "image":
        row["s_per_image"] = round(seconds / batch, 4)
    if first_call_s is not None:
        row["first_call_s"] = round(first_call_s, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batches", default="1,16", help="text batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="calls before timing (the first compiles)")
    parser.add_argument("--ref", action="store_true", help="also time transformers' generate on the same weights")
    parser.add_argument("--torch_threads", type=int, help="torch CPU threads")
    parser.add_argument("--layout", choices=["stacked", "unstacked", "unrolled"], default="unstacked",
                        help="our layer weights while decoding (see bench_ours)")
    parser.add_argument("--profile", type=Path, help="also trace one call per measurement; top ops appended here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = GPTNeoX(model_config(args.shape, args.dtype), rngs=nnx.Rngs(0))
    device = f"jax {jax.__version__} {jax.devices()[0].device_kind}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(row: dict) -> None:
        """Print and append each row as soon as it is measured: a run cut short keeps what it measured."""
        rows.append(row)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    with tempfile.TemporaryDirectory() as hf_dir:
        if args.ref:  # before any re-layout of our weights
            save_hf_model(model, hf_dir)
        text = DecodeSpec(NEW_TOKENS, SAMPLING)
        for batch in batches:
            seconds, first = bench_ours(model, batch, text, args, "text")
            emit(record("jax", "text", batch, seconds, args, device, first))
        image = DecodeSpec(NEW_TOKENS, SAMPLING, allowed=(IMAGE_OFFSET, IMAGE_OFFSET + NUM_CODES))
        seconds, first = bench_ours(model, 1, image, args, "image")
        emit(record("jax", "image", 1, seconds, args, device, first))
        if args.ref:
            del model
            times, ref_device = bench_transformers(hf_dir, args.dtype, batches, args.warmup, args.repeats,
                                                   args.torch_threads)
            for batch, seconds in times.items():
                emit(record("transformers", "text", batch, seconds, args, ref_device))
            if 1 in times:
                emit(record("transformers", "image", 1, times[1], args, ref_device))
    print(f"\n{'impl':13} {'layout':10} {'measure':7} {'shape':10} {'batch':>5} {'dtype':9} {'ms/token':>9} "
          f"{'tokens/s':>9} {'s/image':>8}")
    for r in rows:
        print(f"{r['impl']:13} {r['layout'] or '-':10} {r['measure']:7} {r['shape']:10} {r['batch']:>5} {r['dtype']:9} "
              f"{r['ms_per_token']:>9.3f} {r['tokens_per_s']:>9.1f} {r.get('s_per_image', float('nan')):>8.3f}")


if __name__ == "__main__":
    main()
