"""How strongly the LM carries each image patch through its layers: visual-token activation maps.

The EMMA-Mamba paper's Figure 1 shows, for a Mamba MLLM answering about an image, the magnitude of the visual
features at intermediate LM layers: in Cobra they blur and lose the picture's structure in deeper layers, with
EMMA's alignment they keep it. :func:`activation_maps` computes the same view for a checkpoint: the prompt (image
placeholder, then the instruction, in the chat template) is run through the LM once, and for each asked layer the
L2 norm of the residual stream at every visual token is laid out on the encoder's patch grid (layer 0: the LM's
input, i.e. the projected visual tokens; layer i: after block i). ``emma-mamba visualize`` draws them beside the
image and writes the values as JSON.

:func:`reconstruction` shows what the pixel-wise alignment head reads back from the same forward: a training
checkpoint's head predicts from visual token i the pixels of patch i + 1; with ``align.norm_pix`` its output is a
per-patch normalised patch, shown (as MAE shows its reconstructions) with the true patch's mean and spread put back,
patch 0 (never predicted) grey.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["activation_maps", "default_layers", "encoder_input", "plot_maps", "reconstruction", "write_maps"]


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
        if k in picked:  # one map would be drawn for both, silently
            same = layers[picked.index(k)]
            raise ValueError(f"layers {same} and {layer} both name depth {k} (this LM has {n} blocks; negative "
                             f"counts from {n}): give each depth once")
        picked.append(k)
    hidden, start = _visual_hidden(model, image, prompt)
    gh, gw = model.vision.grid
    N = gh * gw
    return {k: hidden[k][0, start:start + N].float().norm(dim=-1).reshape(gh, gw).cpu() for k in picked}


def _visual_hidden(model, image, prompt: str):
    """The LM's hidden states (all depths) of the prompt about ``image`` and where its visual tokens start."""
    ids = model.tokenizer.encode(model.build_prompt(prompt, 1))
    start = ids.index(model.image_token_id)  # the placeholder becomes the visual tokens, in place
    embeds = model.embeds_from_ids(ids, [image], [prompt] if model.instruction is not None else None)
    return model.lm(inputs_embeds=embeds, output_hidden_states=True, num_last_tokens=1).hidden_states, start


@torch.no_grad()
def reconstruction(model, image, prompt: str = "Describe the image in detail.") -> tuple[torch.Tensor, torch.Tensor]:
    """(the alignment head's next-patch reconstruction, the image as the encoder sees it), both (H, W, 3) fp32 in
    [0, 1] over the patch grid (module docstring). Needs a model with its alignment head (``load(...,
    for_training=True)`` of a checkpoint trained with ``align.enabled``)."""
    from emma_mamba.models.align_head import patchify

    head = model.align_head
    if head is None:
        raise ValueError("this model has no alignment head: load a checkpoint trained with align.enabled with "
                         "for_training=True (emma-mamba visualize --reconstruction does)")
    hidden, start = _visual_hidden(model, image, prompt)
    N = head.num_tokens
    pred = head.predict([hidden[i][:, start:start + N] for i in model.config.align.lm_layers]).float()[0]
    seen = model.image_processor.unnormalize(model.image_processor([image]).to(pred.device)).float().clamp(0, 1)
    truth = patchify(seen, head.patch_size, head.grid)[0]  # (N, patch_dim) RGB in [0, 1]
    rec = torch.full_like(truth, 0.5)
    nxt = pred[:-1]  # token i predicts patch i + 1
    if head.norm_pix:
        t = truth[1:]
        nxt = nxt * (t.var(dim=-1, keepdim=True) + 1e-6).sqrt() + t.mean(dim=-1, keepdim=True)
    rec[1:] = nxt
    (gh, gw), (ph, pw) = head.grid, head.patch_size

    def image_of(patches):
        x = patches.reshape(gh, gw, ph, pw, 3).permute(0, 2, 1, 3, 4).reshape(gh * ph, gw * pw, 3)
        return x.clamp(0, 1).cpu()

    return image_of(rec), image_of(truth)


def encoder_input(model, image) -> torch.Tensor:
    """``image`` as the vision encoder sees it (resized and cropped or squashed by the model's preprocessing): the
    picture the heat maps' patch grid covers, (H, W, 3) fp32 in [0, 1]."""
    seen = model.image_processor.unnormalize(model.image_processor([image])).float().clamp(0, 1)
    return seen[0].permute(1, 2, 0).cpu()


def plot_maps(image, maps: dict[int, torch.Tensor], out: str | Path, title: str | None = None,
              extra: dict[str, torch.Tensor] | None = None) -> Path:
    """The image, any ``extra`` (H, W, 3) pictures by name, and one heat map per layer (each scaled to its own
    range), side by side, as a PNG. ``image``: the picture the maps cover, an (H, W, 3) tensor in [0, 1] (what the
    encoder sees: :func:`encoder_input`, resized and cropped), or a file or PIL image shown as decoded."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("drawing the maps needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from emma_mamba.models.vision import load_image

    img = image.numpy() if isinstance(image, torch.Tensor) else load_image(image)
    extra = extra or {}
    k = 1 + len(extra)
    fig, axes = plt.subplots(1, len(maps) + k, figsize=(2.4 * (len(maps) + k), 2.6))
    axes[0].imshow(img)
    axes[0].set_title("encoder input" if isinstance(image, torch.Tensor) else "image", fontsize=9)
    for ax, (name, pic) in zip(axes[1:k], extra.items()):
        ax.imshow(pic.numpy())
        ax.set_title(name, fontsize=9)
    for ax, (layer, m) in zip(axes[k:], maps.items()):
        ax.imshow(m.numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}" if layer else "LM input", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    if not out.suffix:  # savefig writes a PNG there, named with .png: return the file written
        out = out.with_suffix(".png")
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
