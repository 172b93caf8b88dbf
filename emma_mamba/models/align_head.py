"""Pixel-wise autoregressive alignment head (the structural alignment of EMMA-Mamba, Xing et al. 2024).

Training only: it is built when ``align.enabled`` and the model is built for training, and a model loaded
for inference neither holds its weights nor runs it.

From the LM hidden states at the N visual-token positions of one image (optionally several LM layers,
each LayerNorm-ed and mixed with learned softmax weights, as the paper's code fuses layers), a small causal
transformer decoder predicts, for visual token i, the pixels of image patch i + 1 in raster order
(next-patch prediction: the LM is causal, so its state at token i holds visual tokens 0..i and none after;
each visual token still carries some context of the whole image, as the ViT attends across all patches, which
the paper's design accepts; so can instruction fusion's token mixer, a Linear over the token axis trained in stage 2
under this loss, which could learn to move patch i + 1's token to position i: an audit found no such shift learnt,
150 steps of head + mixer on noise images ending at the head-only losses). The patch
grid is the visual-token grid: the ViT's ``grid_h x grid_w`` patches of ``patch_size`` pixels, taken from the
preprocessed image with the mean/std normalisation undone (RGB in [0, 1]). Pixels the ViT's patch embedding
never sees (SigLIP-384 with 14-px patches covers 378 of 384 pixels) are cropped off. Targets are normalised
per patch as in MAE (He et al. 2022, ``norm_pix_loss``): ``(x - mean) / sqrt(var + 1e-6)`` over the patch's
``patch_h * patch_w * 3`` values. The loss is the MSE averaged over all predicted elements; the caller
multiplies it by ``align.loss_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["PixelAlignHead", "patchify", "normalize_patches"]


def patchify(images: torch.Tensor, patch_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(n, 3, H, W) -> (n, grid_h * grid_w, ph * pw * 3), raster order, pixels in (ph, pw, c) order."""
    ph, pw = patch_size
    gh, gw = grid
    if images.shape[-2] < gh * ph or images.shape[-1] < gw * pw:
        raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than the {gh}x{gw} grid of "
                         f"{ph}x{pw} patches")
    images = images[..., : gh * ph, : gw * pw]  # what the ViT's strided patch conv actually sees
    return rearrange(images, "n c (gh ph) (gw pw) -> n (gh gw) (ph pw c)", ph=ph, pw=pw)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE per-patch normalisation over the last dim (unbiased variance, as MAE's reference code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


class PixelAlignHead(nn.Module):
    """Next-patch pixel prediction from LM hidden states at the visual positions."""

    def __init__(self, lm_dim: int, num_lm_layers: int, grid: tuple[int, int], patch_size: tuple[int, int],
                 d_model: int = 512, n_layer: int = 2, num_heads: int = 8, norm_pix: bool = True,
                 device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.grid, self.patch_size, self.norm_pix = tuple(grid), tuple(patch_size), norm_pix
        self.num_tokens = self.grid[0] * self.grid[1]
        if self.num_tokens < 2:
            raise ValueError(f"next-patch prediction needs at least 2 patches, the grid is {self.grid}")
        self.patch_dim = self.patch_size[0] * self.patch_size[1] * 3
        self.in_norms = nn.ModuleList(nn.LayerNorm(lm_dim, **fk) for _ in range(num_lm_layers))
        self.layer_logits = nn.Parameter(torch.zeros(num_lm_layers, **fk)) if num_lm_layers > 1 else None
        self.in_proj = nn.Linear(lm_dim, d_model, **fk)
        self.pos_embed = nn.Parameter(torch.zeros(self.num_tokens, d_model, **fk))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True, **fk)
            for _ in range(n_layer))
        self.out_norm = nn.LayerNorm(d_model, **fk)
        self.out = nn.Linear(d_model, self.patch_dim, **fk)
        nn.init.normal_(self.pos_embed, std=0.02)

    def predict(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """K x (n, N, lm_dim) LM hidden states -> (n, N, patch_dim) predicted (normalised) pixels of the
        *next* patch."""
        if len(hidden) != len(self.in_norms):
            raise ValueError(f"PixelAlignHead built for {len(self.in_norms)} LM layers, got {len(hidden)}")
        if hidden[0].shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} visual tokens per image, got {hidden[0].shape[1]}")
        dtype = self.in_proj.weight.dtype
        normed = [norm(h.to(dtype)) for norm, h in zip(self.in_norms, hidden)]
        if self.layer_logits is None:
            x = normed[0]
        else:
            w = torch.softmax(self.layer_logits.float(), dim=0).to(dtype)
            x = torch.einsum("k,knsd->nsd", w, torch.stack(normed))
        x = self.in_proj(x) + self.pos_embed  # (n, N, d_model)
        mask = nn.Transformer.generate_square_subsequent_mask(self.num_tokens, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.out(self.out_norm(x))

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) un-normalised RGB in [0, 1] -> (n, N, patch_dim) fp32 pixel targets."""
        patches = patchify(images.float(), self.patch_size, self.grid)
        return normalize_patches(patches) if self.norm_pix else patches

    def no_weight_decay(self) -> set[str]:
        """The position embedding is not decayed, as timm's / open_clip's ViTs exempt theirs (optim.py reads it)."""
        return {"pos_embed"}

    def forward(self, hidden: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Unweighted pixel loss: MSE between the prediction at token i and the target patch i + 1."""
        pred = self.predict(hidden).float()
        target = self.targets(images)
        return F.mse_loss(pred[:, :-1], target[:, 1:])
