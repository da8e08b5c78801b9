"""LLM-CXR stage 2: seeded from stage 1's workdir; PA/AP earliest-study images, IMPRESSION-only reports.

    python -m llmcxr_jax.train --config configs/stage2.py --workdir runs/stage2 \
        --config.init.workdir=runs/stage1 --config.data.data_dir=/path/to/tfds

Stage 2 restores stage 1's parameters only (fresh optimizer and step) after checking that vocabulary, token
layout and VQ-GAN fingerprint match. Variants as in stage1.py.
"""

import importlib.util
from pathlib import Path


def _stage1():
    spec = importlib.util.spec_from_file_location("llmcxr_stage1_config", Path(__file__).with_name("stage1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    c = _stage1().get_config(arg)
    c.stage = 2
    c.data.mimic_builder = "mimic_cxr_llmcxr/stage2"
    return c
