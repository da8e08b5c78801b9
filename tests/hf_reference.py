"""Tiny random Hugging Face GPT-NeoX models: the PyTorch reference our model and converter are proven against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers


def tiny_hf_config(**overrides) -> transformers.GPTNeoXConfig:
    fields = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                  rotary_pct=0.25, max_position_embeddings=128, use_parallel_residual=True,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    return transformers.GPTNeoXConfig(**fields)


def tiny_hf_model(seed: int = 0, **overrides) -> transformers.GPTNeoXForCausalLM:
    """A random model whose LayerNorm and bias parameters are perturbed too, so a mis-mapped one shows up."""
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "layernorm" in name or "layer_norm" in name:
                p.normal_(1.0, 0.1)
    return model


def save_hf(model: transformers.PreTrainedModel, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray, attention_mask: np.ndarray | None = None):
    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()  # copies: jax's arrays are read-only
