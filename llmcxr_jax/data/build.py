"""Build the TFDS datasets from local files: `python -m llmcxr_jax.data.build KIND --manual_dir M --data_dir D`.

KIND is `mimic` (configs stage1 and stage2), `vqa`, `dolly`, `images` (chest X-rays from a folder for VQ-GAN
training; config llmcxr256, or demo128/demo64) or `phantoms` (no manual files; `--config demo64`).
Nothing is downloaded; a missing manual file is named with where to get it. Prints the skip counts of the build.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tensorflow_datasets as tfds

BUILDERS = {
    "mimic": ("llmcxr_jax.data.mimic_builder", "MimicCxrLlmcxr", ("stage1", "stage2")),
    "vqa": ("llmcxr_jax.data.mimic_builder", "MimicCxrVqaLlmcxr", ("default",)),
    "dolly": ("llmcxr_jax.data.dolly_builder", "Dolly15k", (None,)),
    "images": ("llmcxr_jax.data.image_builder", "CxrImages", ("llmcxr256",)),
    "phantoms": ("llmcxr_jax.data.cxr_phantoms_builder", "CxrPhantoms", ("demo64",)),
}


def build(kind: str, data_dir: str, manual_dir: str | None, configs: list[str | None],
          keep_built: bool = False) -> dict:
    """Prepare each config of one builder; returns {config: metadata counts} for the report. A config already
    built in `data_dir` is an error, or with `keep_built` (the default configs: rerunning the command after one
    failed) kept as it is."""
    import importlib

    module, cls_name, _ = BUILDERS[kind]
    cls = getattr(importlib.import_module(module), cls_name)
    what = f"{kind} is built from local files in it:\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    if kind != "phantoms" and not (manual_dir and Path(manual_dir).is_dir()):
        raise FileNotFoundError(f"--manual_dir {manual_dir}: no such directory; {what}" if manual_dir else
                                f"--manual_dir is required: {what}")
    if kind != "phantoms" and not any(Path(manual_dir).iterdir()):  # TFDS would assert with a traceback
        raise FileNotFoundError(f"--manual_dir {manual_dir} is empty; {what}")
    if not data_dir or (Path(data_dir).exists() and not Path(data_dir).is_dir()):
        raise ValueError(f"--data_dir {data_dir!r}: give a directory (new or holding other datasets)")
    known = [c.name for c in cls.BUILDER_CONFIGS]
    if unknown := [name for name in configs if name is not None and name not in known]:
        raise ValueError(f"{kind} has no config {', '.join(unknown)}; its configs are {', '.join(known) or 'none'}")
    download = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    report = {}
    for name in configs:
        builder = cls(config=name, data_dir=data_dir) if name else cls(data_dir=data_dir)
        rebuild = "delete that directory to build it again from --manual_dir"
        if builder.is_prepared():  # TFDS would reuse it and report its old counts as if just built
            if not keep_built:
                raise ValueError(f"{builder.data_path}: {builder.info.full_name} is already built there; {rebuild}, "
                                 "or use another --data_dir")
            print(f"kept {builder.info.full_name}, already built in {builder.data_path} ({rebuild})")
            continue
        builder.download_and_prepare(download_config=download)
        metadata = builder.info.metadata or {}
        report[name or "default"] = metadata.get("counts", {})
        print(f"built {builder.info.full_name} in {data_dir}: "
              f"{ {s: v.num_examples for s, v in builder.info.splits.items()} }")
        if "selection" in metadata:  # the stage-2 images: the original's pickle, or reconstructed without it
            print(f"  its images: {metadata['selection']}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmcxr_jax.data.build", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("--data_dir", required=True, help="where the ArrayRecord datasets go")
    parser.add_argument("--manual_dir", help="the local source files (not needed for phantoms)")
    parser.add_argument("--config", action="append",
                        help="builder config(s), repeatable; default: " + ", ".join(
                            f"{'+'.join(configs)} for {kind}" for kind, (_, _, configs) in BUILDERS.items()
                            if None not in configs) + " (dolly has no configs)")
    args = parser.parse_args(argv)
    configs = args.config or list(BUILDERS[args.kind][2])
    try:
        counts = build(args.kind, args.data_dir, args.manual_dir, configs, keep_built=args.config is None)
    except (OSError, ValueError) as e:  # missing or unusable source files (a directory for a file…): say which
        sys.exit(f"error: {e}")
    print(json.dumps({"skipped_and_kept": counts}, indent=2, default=str))


if __name__ == "__main__":
    main()
