"""A taming-transformers-compatible VQ-GAN in Flax NNX: the image tokenizer of LLM-CXR."""
