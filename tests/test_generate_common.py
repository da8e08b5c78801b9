"""Shared builders for the generation tests (no tests here): a small LLM-CXR tokenizer and tiny random LMs."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hf_reference import save_hf, tiny_hf_model
from llmcxr_jax import prompts
from llmcxr_jax.model import GPTNeoX, pad_vocab
from llmcxr_jax.tokenizer import LlmCxrTokenizer

REPORTS = [
    f"FINDINGS: {a} {b}\nIMPRESSION: {c}"
    for a in ("The lungs are clear.", "There is a small left pleural effusion.", "Mild cardiomegaly is present.")
    for b in ("No pneumothorax.", "The heart size is normal.", "Bony structures are intact.")
    for c in ("No acute process.", "Small effusion.", "Cardiomegaly without edema.")
]
# The prompt text is in the corpus so that prompts stay short (tens of tokens, not hundreds of bytes).
CORPUS = REPORTS + [prompts.INTRO_BLURB, *prompts.CXR_VQ_INPUT_INSTRUCTION_LIST,
                    *prompts.CXR_VQ_OUTPUT_INSTRUCTION_LIST] * 3


def small_tokenizer(num_image_codes: int) -> LlmCxrTokenizer:
    return LlmCxrTokenizer.train_small(CORPUS, vocab_size=400, num_image_codes=num_image_codes)


def hf_dir(directory: Path, tokenizer: LlmCxrTokenizer, seed: int = 0) -> Path:
    """A random HF GPT-NeoX whose vocabulary is the tokenizer's text ids + image codes, saved with the tokenizer.

    Initialised with std 0.3 rather than 0.02, so that greedy continuations vary instead of repeating one token.
    """
    model = tiny_hf_model(seed, vocab_size=tokenizer.vocab_size, max_position_embeddings=1024, initializer_range=0.3)
    save_hf(model, directory)
    tokenizer.save(directory)
    return directory


def constant_logits(model: GPTNeoX, logits: np.ndarray) -> GPTNeoX:
    """Make every position's logits equal `logits`: final LayerNorm scale 0, bias e0, embed_out row 0 = logits.

    Such a model draws i.i.d. tokens from a known distribution, which the sampling loop must reproduce.
    """
    hidden = model.config.hidden_size
    model.final_ln_scale[...] = jnp.zeros((hidden,))
    model.final_ln_bias[...] = jnp.zeros((hidden,)).at[0].set(1.0)
    row0 = jnp.zeros((hidden, model.config.vocab_size)).at[0].set(jnp.asarray(logits, jnp.float32))
    model.embed_out[...] = pad_vocab(row0, model.config.table_rows, 1)
    return model
