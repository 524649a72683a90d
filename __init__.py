"""sgljax: a JAX/XLA inference engine for Qwen and Llama models."""

__version__ = "0.1.0"
