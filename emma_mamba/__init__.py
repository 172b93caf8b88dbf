"""EMMA-Mamba: a Mamba-based multimodal LLM on its own selective-scan kernels."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load an EmmaMamba checkpoint directory written by ``save`` (inference by default: no alignment head).

    Keyword arguments go to :func:`emma_mamba.models.vlm.load` (``for_training``, ``device``, ``dtype``).
    """
    from emma_mamba.models.vlm import load as _load  # imported here so `import emma_mamba` stays light

    return _load(path, **kwargs)


def save(model, path):
    """Write ``model`` (an EmmaMamba) to directory ``path``: config.yaml, model.safetensors, tokenizer.json."""
    return model.save(path)
