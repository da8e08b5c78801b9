"""`make demo`: the whole LLM-CXR system end to end on chest X-ray phantoms, on a CPU, in minutes.

phantoms (MIMIC-shaped files) → VQ-GAN training → encode → TFDS builds → tokenizer → LM stage 1 → stage 2 →
sampling report→CXR and CXR→report → scores against baselines → `demo_out/index.html` + `metrics.json`.
Every step is the real code path (the same CLIs and functions a MIMIC user runs); only configs are small.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vqgan_flax.atomic import check_output_dir, write_atomic

STEPS = 9


class Progress:
    """Numbered stage lines with elapsed time, so a person sees where the demo is."""

    def __init__(self) -> None:
        self.start = time.time()
        self.n = 0

    def stage(self, text: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{STEPS}] {text}  (t={time.time() - self.start:.0f}s)", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmcxr_jax.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output directory (page, PNGs, metrics, all artifacts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=8000, help="training phantoms")
    parser.add_argument("--num_test", type=int, default=200, help="test phantoms (scored)")
    parser.add_argument("--vqgan_steps", type=int, default=300)
    parser.add_argument("--stage1_steps", type=int, default=100)
    parser.add_argument("--stage2_steps", type=int, default=1700)
    parser.add_argument("--lm_batch", type=int, default=16, help="LM global batch (sequences per step)")
    parser.add_argument("--tokenizer_vocab", type=int, default=1000,
                        help="text vocabulary of the demo BPE (phantom reports saturate near 1000)")
    args = parser.parse_args(argv)
    counts = ("num_train", "num_test", "vqgan_steps", "stage1_steps", "stage2_steps", "lm_batch", "tokenizer_vocab")
    if bad := [f"--{name} {getattr(args, name)}" for name in counts if getattr(args, name) < 1]:
        parser.error(f"{', '.join(bad)}: must be at least 1")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: must be >= 0")
    if args.num_test > args.num_train:  # the image baseline draws num_test distinct training phantoms
        parser.error(f"--num_test {args.num_test} exceeds --num_train {args.num_train}")
    try:
        check_output_dir(args.out)
    except NotADirectoryError as err:
        parser.error(str(err))
    return args


# The settings a run was started with, beside its artifacts.
SETTINGS_FILE = "demo_settings.json"


def settings_of(args: argparse.Namespace) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k != "out"}


def claim_out(out: Path, settings: dict) -> None:
    """Record the run's settings in OUT, or refuse OUT when it holds a run of other settings: the stages finished
    there are resumed as this run's (a changed step count trained on under the old schedule or was skipped, a
    changed phantom count reused the old datasets). A directory from before the record is taken as this run's."""
    path = out / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if changed := [f"--{k} {recorded.get(k)} there, {v} now" for k, v in settings.items() if recorded.get(k) != v]:
            raise SystemExit(f"error: --out {out} holds a demo run with other settings ({'; '.join(changed)}): its "
                             "finished stages would be mixed into this run; rerun with its settings, or give another "
                             "--out (or delete that one)")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).absolute()
    claim_out(out, settings_of(args))
    from llmcxr_jax.demo import pipeline  # imports JAX; after argument errors are out of the way

    progress = Progress()
    results = pipeline.run(args, out, progress)
    (out / "metrics.json").write_text(json.dumps({"settings": settings_of(args), **results}, indent=2,
                                                 default=_plain))
    print(f"\ndemo finished in {time.time() - progress.start:.0f}s: open {out / 'index.html'}", flush=True)


def _plain(x):
    return x.tolist() if isinstance(x, np.ndarray) else float(x)


if __name__ == "__main__":
    main()
