"""EMMA-Mamba: a Mamba-based multimodal LLM on its own selective-scan kernels."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `import emma_mamba` stays light (no torch)
    from emma_mamba.models.vlm import EmmaMamba

__version__ = "0.1.0"


def load(path: str | os.PathLike, **kwargs) -> EmmaMamba:
    """Load an EmmaMamba checkpoint directory written by ``save`` (inference by default: no alignment head).

    Keyword arguments go to :func:`emma_mamba.models.vlm.load` (``for_training``, ``device``, ``dtype``).
    """
    from emma_mamba.models.vlm import load as _load  # imported here so `import emma_mamba` stays light

    return _load(path, **kwargs)


def save(model: EmmaMamba, path: str | os.PathLike):
    """Write ``model`` (an EmmaMamba) to directory ``path``: config.yaml, model.safetensors, tokenizer.json."""
    return model.save(path)
