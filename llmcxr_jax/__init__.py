"""LLM-CXR in JAX: a GPT-NeoX that reads chest X-rays into reports and writes reports into X-ray image tokens."""

__version__ = "0.1.0"
