"""How strongly the LM carries each image patch through its layers: visual-token activation maps.

The EMMA-Mamba paper's Figure 1 shows, for a Mamba MLLM answering about an image, the magnitude of the visual
features at intermediate LM layers: in Cobra they blur and lose the picture's structure in deeper layers, with
EMMA's alignment they keep it. :func:`activation_maps` computes the same view for a checkpoint: the prompt (image
placeholder, then the instruction, in the chat template) is run through the LM once, and for each asked layer the
L2 norm of the residual stream at every visual token is laid out on the encoder's patch grid (layer 0: the LM's
input, i.e. the projected visual tokens; layer i: after block i). ``emma-mamba visualize`` draws them beside the
image and writes the values as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["activation_maps", "default_layers", "plot_maps"]


def default_layers(n_layer: int) -> list[int]:
    """The input and four evenly spaced depths: 0, L/4, L/2, 3L/4, L."""
    return sorted({round(n_layer * k / 4) for k in range(5)})


@torch.no_grad()
def activation_maps(model, image, prompt: str = "Describe the image in detail.",
                    layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """{layer: (grid_h, grid_w) fp32 norms of the visual tokens' residual stream} for ``image`` (a path or a PIL
    image) asked ``prompt`` by ``model`` (an EmmaMamba). ``layers``: 0 (the LM input) to n_layer (after the last
    block), negative counting from n_layer; default :func:`default_layers`."""
    n = model.lm.config.n_layer
    layers = default_layers(n) if layers is None else list(layers)
    picked = []
    for layer in layers:
        k = layer + n + 1 if layer < 0 else layer
        if not 0 <= k <= n:
            raise ValueError(f"layer {layer} is outside 0..{n} (this LM has {n} blocks; negative counts from {n})")
        picked.append(k)
    ids = model.tokenizer.encode(model.build_prompt(prompt, 1))
    start = ids.index(model.image_token_id)  # the placeholder becomes the visual tokens, in place
    embeds = model.embeds_from_ids(ids, [image], [prompt] if model.instruction is not None else None)
    hidden = model.lm(inputs_embeds=embeds, output_hidden_states=True, num_last_tokens=1).hidden_states
    gh, gw = model.vision.grid
    N = gh * gw
    return {k: hidden[k][0, start:start + N].float().norm(dim=-1).reshape(gh, gw).cpu() for k in picked}


def plot_maps(image, maps: dict[int, torch.Tensor], out: str | Path, title: str | None = None) -> Path:
    """The image and one heat map per layer (each scaled to its own range), side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    img = Image.open(image).convert("RGB") if not hasattr(image, "convert") else image.convert("RGB")
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.4 * (len(maps) + 1), 2.6))
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=9)
    for ax, (layer, m) in zip(axes[1:], maps.items()):
        ax.imshow(m.numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}" if layer else "LM input", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_maps(maps: dict[int, torch.Tensor], path: str | Path, **meta) -> Path:
    """The maps as JSON: ``{..meta, "maps": {layer: [[...], ...]}}``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({**meta, "maps": {str(k): v.tolist() for k, v in maps.items()}}) + "\n")
    return p
