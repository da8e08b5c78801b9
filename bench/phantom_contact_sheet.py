"""Contact sheet of one phantom per finding (docs/phantoms.png) and phantom generation speed on one core.

    python bench/phantom_contact_sheet.py [--out docs/phantoms.png] [--size 256] [--count 200]

Each tile is the 256 x 256 phantom; its bottom-right inset is the same case rendered at 64 x 64 (the demo size).
Speed is measured single-threaded (BLAS pinned to one thread) over `--count` random phantoms, 3 times.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image, ImageDraw  # noqa: E402

from llmcxr_jax.data.phantom import Finding, make_phantom  # noqa: E402

SHEET = (
    ("normal", ()),
    ("cardiomegaly (severe)", (Finding("cardiomegaly", severity="severe"),)),
    ("R pleural effusion (moderate)", (Finding("pleural_effusion", side="right", severity="moderate"),)),
    ("L pleural effusion (large)", (Finding("pleural_effusion", side="left", severity="large"),)),
    ("R pneumothorax (moderate)", (Finding("pneumothorax", side="right", severity="moderate"),)),
    ("L pneumothorax (small)", (Finding("pneumothorax", side="left", severity="small"),)),
    ("R upper consolidation", (Finding("consolidation", side="right", zone="upper"),)),
    ("L lower consolidation", (Finding("consolidation", side="left", zone="lower"),)),
    ("R middle consolidation", (Finding("consolidation", side="right", zone="middle"),)),
    ("endotracheal tube", (Finding("endotracheal_tube"),)),
    ("R IJ central line", (Finding("central_line", side="right"),)),
    ("L pacemaker", (Finding("pacemaker", side="left"),)),
)
CAPTION = 18


def tile(index: int, caption: str, findings, size: int, seed: int) -> Image.Image:
    big = Image.fromarray(make_phantom(seed, index, size, findings).image)
    small = Image.fromarray(make_phantom(seed, index, 64, findings).image)
    big.paste(small, (size - 66, size - 66))
    out = Image.new("L", (size, size + CAPTION), 255)
    out.paste(big, (0, 0))
    ImageDraw.Draw(out).text((4, size + 3), caption, fill=0)
    return out


def contact_sheet(size: int, seed: int, columns: int = 4) -> Image.Image:
    tiles = [tile(i, caption, findings, size, seed) for i, (caption, findings) in enumerate(SHEET)]
    rows = -(-len(tiles) // columns)
    sheet = Image.new("L", (columns * (size + 4), rows * (size + CAPTION + 4)), 255)
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * (size + 4), (i // columns) * (size + CAPTION + 4)))
    return sheet


def images_per_second(size: int, count: int, repeats: int = 3, seed: int = 1) -> tuple[float, float]:
    """(best, median) rate over `repeats` timed runs of `count` phantoms; the best is the least disturbed by load."""
    make_phantom(seed, 0, size)  # warm caches
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            make_phantom(seed, i, size)
        rates.append(count / (time.perf_counter() - start))
    return max(rates), float(sorted(rates)[len(rates) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/phantoms.png")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(args.size, args.seed).save(args.out)
    print(f"wrote {args.out}")
    for size in sorted({64, args.size}):
        best, median = images_per_second(size, args.count)
        print(f"phantoms at {size}x{size}: {best:.1f} images/s best, {median:.1f} median of 3 runs "
              "(one thread; image + findings + report)")


if __name__ == "__main__":
    main()
