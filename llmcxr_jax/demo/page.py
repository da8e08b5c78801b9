"""The demo's HTML page: examples in both directions, and every score beside its baseline; opens without a server."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

NUM_EXAMPLES = 12
SCALE = 3  # phantoms are small; show them larger with crisp pixels


def _png(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return f"{path.parent.name}/{path.name}"


def _img(src: str, size: int) -> str:
    return f'<img src="{src}" width="{size * SCALE}" height="{size * SCALE}" style="image-rendering: pixelated">'


def _score_rows(results: dict[str, Any]) -> str:
    rows = []
    for direction, entries in (("CXR→report (report labeler)", results["reports"]),
                               ("report→CXR (image judge)", results["images"])):
        for name, value in entries.items():
            if isinstance(value, dict) and "macro_f1" in value:
                rows.append(f"<tr><td>{direction}</td><td>{html.escape(name)}</td>"
                            f"<td>{value['macro_f1']:.3f}</td><td>{value['micro_f1']:.3f}</td></tr>")
    return "\n".join(rows)


def write(out: Path, test_cases, generated: dict[str, Any], results: dict[str, Any]) -> Path:
    size = generated["generated_images"].shape[-1]
    rows_r2c, rows_c2r = [], []
    for i, case in enumerate(test_cases[:NUM_EXAMPLES]):
        true_src = Path(os.path.relpath(case.image_path, out)).as_posix()  # the page opens from `out`
        gen_src = _png(generated["generated_images"][i], out / "images" / f"{case.dicom_id}_generated.png")
        guided_src = _png(generated["guided_images"][i], out / "images" / f"{case.dicom_id}_guided.png")
        rec_src = _png(generated["reconstructions"][i], out / "images" / f"{case.dicom_id}_reconstruction.png")
        rows_r2c.append(f"<tr><td>{html.escape(generated['impressions'][i])}</td><td>{_img(gen_src, size)}</td>"
                        f"<td>{_img(guided_src, size)}</td><td>{_img(true_src, size)}</td>"
                        f"<td>{_img(rec_src, size)}</td></tr>")
        rows_c2r.append(f"<tr><td>{_img(true_src, size)}</td><td>{html.escape(generated['generated_reports'][i])}</td>"
                        f"<td>{html.escape(generated['impressions'][i])}</td></tr>")
    reports, vq = results["reports"], results["vqgan"]
    text = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llmcxr-jax demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} td,th{{border:1px solid #ccc;padding:4px;
vertical-align:top}} table{{border-collapse:collapse;margin-bottom:2em}}</style></head><body>
<h1>llmcxr-jax demo on chest X-ray phantoms</h1>
<p>{results['num_train']} training and {results['num_test']} test phantoms; VQ-GAN, LM stage 1 and stage 2 trained
here on a CPU. This run of the demo took {results['timing_s']:.0f} s (a rerun into the same directory resumes the
stages already finished there). Scores are finding-label F1 of the phantom judges against the true
labels of the test phantoms; random baselines are means over {results['baseline_draws']} draws.</p>
<h2>Scores</h2>
<table><tr><th>direction</th><th>what</th><th>macro-F1</th><th>micro-F1</th></tr>
{_score_rows(results)}</table>
<p>Generated reports: BLEU-4 {reports['bleu4']:.3f}, ROUGE-L {reports['rougeL']:.3f} against the true
impressions. VQ-GAN: reconstruction PSNR {vq['psnr_test_db']:.1f} dB, perplexity of test codes
{vq['codebook_usage_test']['perplexity']:.1f}.</p>
<h2>Report → chest X-ray</h2>
<p>Images are sampled as the original does (top-p 0.92), and again with classifier-free guidance at scale
{results['guidance_scale']:g} against the same instruction with an empty report, which the demo's LM also
learned to draw from (report dropout; neither is in the original).</p>
<table><tr><th>input report (impression)</th><th>generated</th><th>generated, guided</th><th>true image</th>
<th>VQ-GAN reconstruction</th></tr>
{''.join(rows_r2c)}</table>
<h2>Chest X-ray → report</h2>
<table><tr><th>input image</th><th>generated report</th><th>true report (impression)</th></tr>
{''.join(rows_c2r)}</table>
</body></html>
"""
    path = out / "index.html"
    path.write_text(text)
    return path
