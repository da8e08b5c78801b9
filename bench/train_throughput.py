"""Training throughput: our jitted LM step against the Hugging Face PyTorch step on the same shape.

    python bench/train_throughput.py --shape pythia-70m --batch 8 --seq 512 --ref
    python bench/train_throughput.py --shape 2.8b --batch 8 --seq 1024 --remat full --attention cudnn --ref

Ours and the reference run as separate subprocesses one after the other (JAX with
XLA_PYTHON_CLIENT_PREALLOCATE=false), so neither holds memory the other needs. Prints one JSON line per
measurement and a table last; appends the lines to bench/results/train.jsonl. Imports only jax, flax, optax,
orbax, numpy, torch and transformers (what the GPU machines have), so it runs from source via PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from shapes import SHAPES, TRAIN_VOCAB  # noqa: E402  bench/ (the script's folder)
from timing import median_seconds  # noqa: E402

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_kind: str) -> float:
    return next((v for k, v in PEAK_FLOPS.items() if k in device_kind), 0.0)


def model_shape(name: str) -> dict:
    return dict(SHAPES[name], vocab_size=TRAIN_VOCAB[name])


def measure_ours(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from llmcxr_jax import lm_task, parallel, trainer

    shape = model_shape(args.shape)
    config = types.SimpleNamespace(
        seed=0, model=dict(shape, dtype=args.dtype, param_dtype="float32", attention_impl=args.attention,
                           remat_policy=args.remat, max_position_embeddings=max(2048, args.seq)),
        optim=types.SimpleNamespace(lr=1e-5, schedule="constant", warmup_steps=0, end_lr_fraction=0.0, b1=0.9,
                                    b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0, mu_dtype=args.mu_dtype),
        train=types.SimpleNamespace(loss_mode="global", loss_group_size=2, micro_batches=1, loss_chunk=args.chunk,
                                    peak_flops_per_device=0.0),
        init=types.SimpleNamespace(hf_dir="", workdir=""))
    mesh = parallel.make_mesh((1, -1, 1))
    rules = parallel.DEFAULT_RULES
    task = lm_task.build_task(config, mesh=mesh, rules=rules, total_steps=1,
                              metadata={"stage": 1, "image_offset": shape["vocab_size"]})
    graphdef, _, shardings = trainer.state_shardings(task, mesh, rules)
    batch_sh = trainer.batch_shardings(task, mesh, rules)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state = jax.jit(lambda: nnx.state(task.create_state()), out_shardings=shardings)()
        step = trainer.compile_train_step(task, graphdef, shardings, batch_sh)
        rng = np.random.default_rng(0)
        batch = {"input_ids": rng.integers(1, shape["vocab_size"], (args.batch, args.seq)).astype(np.int32),
                 "loss_weights": np.ones((args.batch, args.seq), np.float32)}
        batch = trainer.to_global(batch, batch_sh)
        step = step.lower(state, batch).compile()
        hlo = step.as_text()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        first_step_s = time.perf_counter() - t0  # initialisation, compile and the first step, as the reference's


        def steps() -> None:
            nonlocal state, metrics
            for _ in range(args.steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)

        seconds, _ = median_seconds(steps, warmup=1, repeats=args.repeats)
        if args.profile:
            from profile_ops import profile_top_ops  # bench/ (the script's folder)

            def one_step() -> None:
                nonlocal state
                state, step_metrics = step(state, batch)
                jax.block_until_ready(step_metrics)

            profile_top_ops(one_step, f"train {args.shape} b{args.batch} {args.remat} {args.attention}",
                            Path(args.profile), hlo_text=hlo)
    device = jax.devices()[0]
    result = _result("ours", args, seconds / args.steps, first_step_s, device.device_kind, jax.device_count(),
                     float(metrics["loss"]))
    memory = device.memory_stats() or {}  # None on CPU
    result.update(jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), mu_dtype=args.mu_dtype,
                  fused_attention="__cudnn$fmha" in hlo,
                  # per layer, the scan body: 1 = the backward reuses the forward's outputs, 2 = it reruns it
                  attention_forwards=hlo.count('custom_call_target="__cudnn$fmhaSoftmax"'),
                  # kernels XLA duplicated to fit the device's memory (matmuls run twice): 0 unless memory-tight
                  xla_remat_copies=trainer.rematerialized_kernels(hlo),
                  peak_gib=round(memory.get("peak_bytes_in_use", 0) / 2**30, 1))
    return result


def measure_reference(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    shape = model_shape(args.shape)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hf_config = transformers.GPTNeoXConfig(**shape, rotary_pct=0.25, use_parallel_residual=True,
                                           max_position_embeddings=max(2048, args.seq))
    with device:  # initialise on the card: a CPU init of 2.8B weights takes minutes of a short lease
        model = transformers.GPTNeoXForCausalLM(hf_config)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    ids = torch.randint(1, shape["vocab_size"], (args.batch, args.seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0

    def steps() -> None:
        nonlocal loss
        for _ in range(args.steps):
            loss = step()
        if cuda:
            torch.cuda.synchronize()

    seconds, _ = median_seconds(steps, warmup=1, repeats=args.repeats)
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    result = _result("transformers", args, seconds / args.steps, first_step_s, kind, 1, float(loss))
    result.update(torch=torch.__version__, transformers=transformers.__version__,
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else 0.0)
    return result


def _result(impl: str, args: argparse.Namespace, step_s: float, first_s: float, kind: str, devices: int,
            loss: float) -> dict:
    from llmcxr_jax.lm_task import flops_per_token
    from llmcxr_jax.model import GPTNeoXConfig

    tokens_s = args.batch * args.seq / step_s
    peak = peak_flops(kind) * devices
    flops = flops_per_token(GPTNeoXConfig(**model_shape(args.shape)), args.seq)
    return {"bench": "train", "impl": impl, "shape": args.shape, "batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "remat": args.remat, "attention": args.attention, "step_s": step_s,
            "tokens_per_s": tokens_s, "mfu": tokens_s * flops / peak if peak else None, "first_step_s": first_s, "device": kind, "devices": devices, "loss": loss,
            "date": time.strftime("%Y-%m-%d")}


def _child(args: argparse.Namespace, impl: str) -> dict:
    """Run one implementation in a fresh process; its last stdout line is the JSON result."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, __file__, "--child", impl, *sys.argv[1:]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    *printed, result = out.stdout.strip().splitlines()
    print("\n".join(printed))  # e.g. --profile's table
    return json.loads(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--remat", default="none", help="none, full, dots, dots_no_batch")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
    parser.add_argument("--chunk", type=int, default=256, help="loss_chunk (0 = full logits)")
    parser.add_argument("--mu_dtype", default="", help="Adam first-moment dtype ('' = parameter dtype)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref", action="store_true", help="also run the transformers reference")
    parser.add_argument("--profile", help="also trace one of our steps; its top ops are appended to this file")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.jsonl"))
    parser.add_argument("--child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_ours(args) if args.child == "ours" else measure_reference(args)))
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for impl in ("ours", "transformers") if args.ref else ("ours",):  # each kept as it comes: a time limit may
        results.append(_child(args, impl))                         # stop the reference after ours has run
        print(json.dumps(results[-1]))
        with open(args.out, "a") as f:
            f.write(json.dumps(results[-1]) + "\n")
    print(f"\n{'impl':<14}{'shape':<8}{'batch':>6}{'remat':>15}{'tokens/s':>10}{'step ms':>9}{'MFU':>7}"
          f"{'peak GiB':>9}{'first s':>8}  device")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{r['impl']:<14}{r['shape']:<8}{r['batch']:>6}{r['remat']:>15}{r['tokens_per_s']:>10.0f}"
              f"{r['step_s'] * 1e3:>9.1f}{mfu:>7}{r['peak_gib']:>9.1f}{r['first_step_s']:>8.1f}  {r['device']}")
    if len(results) == 2:
        print(f"ratio ours/transformers: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
