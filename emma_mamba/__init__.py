"""EMMA-Mamba: a Mamba-based multimodal LLM on its own selective-scan kernels."""

__version__ = "0.1.0"
