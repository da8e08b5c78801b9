"""Input-pipeline throughput on one CPU core: formatted, tokenized examples per second (target >= 650/s).

    PYTHONPATH=. python bench/data_throughput.py [--examples 4000] [--repeats 3]

Synthetic MIMIC-shaped records (256 codes, reports of 30-120 words of radiology phrasing, ~100 tokens, like
stage-1 FINDINGS + IMPRESSION) and Dolly-shaped records, in memory, with the packaged GPT-NeoX-20B tokenizer.
Measured: `format` (record -> tokens + loss weights, no Grain), `pipeline` (make_lm_iterator on MIMIC alone:
slice, shuffle, mix, format, filter, bucket-pad, batch) and `pipeline_mix` (MIMIC 0.8 + Dolly 0.2). The process
is pinned to one core and the tokenizer to one thread. Median of `--repeats` timed passes after a warm-up pass;
prints one JSON line per measurement, then a table, and appends the lines to bench/results/data.jsonl.
"""
from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # the tokenizer's thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from llmcxr_jax.data.formatting import make_formatter  # noqa: E402
from llmcxr_jax.data.pipeline import make_lm_iterator  # noqa: E402
from llmcxr_jax.tokenizer import LlmCxrTokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data.jsonl"
TARGET = 650.0
PHRASES = (
    "The lungs are clear without focal consolidation.", "No pleural effusion or pneumothorax is seen.",
    "The cardiomediastinal silhouette is within normal limits.", "Mild bibasilar atelectasis.",
    "There is a small left pleural effusion with adjacent compressive atelectasis.",
    "Endotracheal tube terminates 4.5 cm above the carina.", "Right internal jugular line ends in the low SVC.",
    "Moderate cardiomegaly is unchanged compared to ___.", "No acute cardiopulmonary process.",
    "Pulmonary vascular congestion without frank edema.", "Healed right rib fractures are again noted.",
    "Hiatal hernia is present.", "Patchy opacity in the right lower lobe may reflect pneumonia in the correct "
    "clinical setting.", "Degenerative changes of the thoracic spine.", "Lungs are hyperinflated.",
)


def mimic_records(n: int, rng: np.random.Generator) -> list[dict]:
    records = []
    for i in range(n):
        words, sentences = int(rng.integers(30, 121)), []
        while sum(len(s.split()) for s in sentences) < words:
            sentences.append(PHRASES[int(rng.integers(len(PHRASES)))])
        records.append({"dicom_id": f"{i:08x}-{rng.integers(1 << 30):08x}", "report": " ".join(sentences),
                        "codes": rng.integers(0, 1024, 256).astype(np.int16),
                        "direction": ("cxr2report", "report2cxr")[i % 2]})
    return records


def dolly_records(n: int, rng: np.random.Generator) -> list[dict]:
    return [{"instruction": f"Summarise note {i} for a patient.", "response": " ".join(rng.choice(PHRASES, 4)),
             "context": " ".join(rng.choice(PHRASES, 6)) if i % 2 else ""} for i in range(n)]


def examples_per_second(run: Callable[[], int], repeats: int) -> float:
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16, help="global batch size (one process)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    tok = LlmCxrTokenizer.from_pretrained(None)
    rng = np.random.default_rng(0)
    mimic, dolly = mimic_records(args.examples, rng), dolly_records(args.examples // 4, rng)
    fmt = make_formatter("mimic", tok, 42)
    lengths = [len(fmt(r).input_ids) for r in mimic[:500]]

    def format_only() -> int:
        for record in mimic:
            fmt(record)
        return len(mimic)

    def pipeline(sources: dict) -> Callable[[], int]:
        def run() -> int:
            it = make_lm_iterator(sources, tok, global_batch_size=args.batch, process_index=0, process_count=1)
            batches = args.examples // args.batch
            for _ in range(batches):
                next(it)
            return batches * args.batch
        return run

    runs = {"format": format_only, "pipeline": pipeline({"mimic": mimic}),
            "pipeline_mix": pipeline({"mimic": mimic, "dolly": dolly})}
    lines = []
    for name, run in runs.items():
        rate = examples_per_second(run, args.repeats)
        lines.append({"bench": "data_throughput", "measure": name, "examples_per_s": round(rate, 1),
                      "target": TARGET, "cpu": platform.processor() or platform.machine(), "cores": 1,
                      "examples": args.examples, "mean_tokens": round(float(np.mean(lengths)), 1),
                      "date": datetime.date.today().isoformat()})
        print(json.dumps(lines[-1]), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    print(f"\n{'measure':<14}{'examples/s':>12}  (one core, mean {lines[0]['mean_tokens']} tokens/example, "
          f"target >= {TARGET:.0f})")
    for line in lines:
        print(f"{line['measure']:<14}{line['examples_per_s']:>12.1f}")


if __name__ == "__main__":
    main()
