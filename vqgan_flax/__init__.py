"""A taming-transformers-compatible VQ-GAN in Flax NNX: the image tokenizer of LLM-CXR."""
from vqgan_flax.checkpoint import load, save
from vqgan_flax.config import VQGANConfig
from vqgan_flax.model import VQGAN

__all__ = ["VQGAN", "VQGANConfig", "load", "save"]
