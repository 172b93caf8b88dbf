"""open_clip vision encoder with multi-layer patch-token taps, and image loading/preprocessing.

The encoder is any open_clip ViT built by ``open_clip.create_model(name, pretrained=<local file or None>)``:
random init or a local checkpoint file, never a download (a ``pretrained`` that is not an existing file is an
error here, because open_clip would otherwise treat it as a hub tag). The taps come from open_clip's own
``visual.forward_intermediates(x, indices=[...], intermediates_only=True, output_fmt='NLC', stop_early=True)``,
which exists for both the native CLIP ``VisionTransformer`` and the timm-wrapped towers (SigLIP, ...). Both
drop the prefix tokens themselves (CLIP's class token; timm's ``num_prefix_tokens`` class/register tokens,
zero for SigLIP), so every tap is exactly the ``grid_h * grid_w`` patch tokens in raster order. A tap index
``i`` is the *output of block i* (0-based; -2 = the penultimate block, LLaVA/Cobra's feature layer); open_clip
returns the taps in block order, so they are kept sorted ascending and the last tap is the deepest.

Preprocessing is open_clip's own eval transform (``open_clip.image_transform`` with the model's preprocess
config, or the config of a named pretrained tag, e.g. SigLIP's 0.5 mean/std and 'squash' resize). Before it,
``load_image`` turns anything PIL can open into RGB: EXIF rotation applied, alpha (RGBA, LA, palette with
transparency) composited on white rather than dropped to whatever colour the transparent pixels hold,
16-bit and float grayscale rescaled to 8 bits, CMYK/YCbCr/1-bit converted. A missing or unreadable file is an
error naming the file.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from emma_mamba.config import ConfigError, VisionConfig

if TYPE_CHECKING:  # PIL is imported where images are loaded
    from PIL import Image

__all__ = ["build_open_clip", "VisionEncoder", "load_image", "ImageProcessor"]

log = logging.getLogger(__name__)


def _deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_open_clip(cfg: VisionConfig, device: torch.device | str | None = None, load_weights: bool = True):
    """Builds the full open_clip model (vision + text towers) of ``cfg``; returns it with its preprocess config.

    ``device='meta'`` builds shapes only (no memory, no weights loaded) for parameter reports.
    """
    import open_clip

    base = open_clip.get_model_config(cfg.model_name)
    if base is None:
        raise ConfigError(f"vision.model_name: {cfg.model_name!r} is not an open_clip architecture; see "
                          f"open_clip.list_models() (e.g. ViT-L-14-336-quickgelu, ViT-SO400M-14-SigLIP-384)")
    unknown = set(cfg.open_clip_overrides) - set(base) - {"quick_gelu", "init_logit_bias", "custom_text"}
    if unknown:
        raise ConfigError(f"vision.open_clip_overrides: unknown open_clip model-config keys {sorted(unknown)}; "
                          f"{cfg.model_name} has {sorted(base)}")
    merged = _deep_merge(base, cfg.open_clip_overrides)

    device = torch.device(device) if device is not None else torch.device("cpu")
    on_meta = device.type == "meta"
    pretrained = cfg.pretrained if (load_weights and not on_meta) else None
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ConfigError(f"vision.pretrained: {pretrained!r} is not an existing file (only local checkpoint "
                          f"files are accepted; download open_clip weights beforehand)")

    force_preprocess = None
    if cfg.preprocess_tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(cfg.model_name, cfg.preprocess_tag)
        if not tag_cfg:
            raise ConfigError(f"vision.preprocess_tag: {cfg.preprocess_tag!r} is not a pretrained tag of "
                              f"{cfg.model_name}; known: {open_clip.list_pretrained_tags_by_model(cfg.model_name)}")
        force_preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}

    # The overrides go in as whole top-level sections (create_model's **model_kwargs replace, not merge).
    kwargs = {k: merged[k] for k in cfg.open_clip_overrides}
    # open_clip warns on the root logger whenever no weights are loaded; here random init is deliberate (a
    # test model, a meta build, or weights that emma_mamba.load copies in right after), so say it once, ours.
    quiet = _DropRecords("No pretrained weights loaded") if pretrained is None else None
    root = logging.getLogger()
    if quiet is not None:
        root.addFilter(quiet)
    try:
        with torch.device(device) if on_meta else _nullcontext():
            model = open_clip.create_model(
                cfg.model_name, pretrained=pretrained, device=device, pretrained_image=False,
                pretrained_text=False, force_preprocess_cfg=force_preprocess, **kwargs)
    finally:
        if quiet is not None:
            root.removeFilter(quiet)
    if pretrained is None:
        log.debug("open_clip %s built without pretrained weights", cfg.model_name)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return model, preprocess_cfg


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _vit_layout(visual: nn.Module) -> dict[str, Any]:
    """Block count, width, patch size and grid of an open_clip vision tower (native CLIP ViT or timm ViT)."""
    if hasattr(visual, "transformer") and hasattr(visual, "grid_size"):  # open_clip.transformer.VisionTransformer
        return dict(n_blocks=len(visual.transformer.resblocks), width=visual.transformer.width,
                    patch_size=tuple(visual.patch_size), grid=tuple(visual.grid_size), prefix_tokens=1)
    trunk = getattr(visual, "trunk", None)  # open_clip.timm_model.TimmModel
    if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        return dict(n_blocks=len(trunk.blocks), width=trunk.embed_dim,
                    patch_size=tuple(trunk.patch_embed.patch_size), grid=tuple(trunk.patch_embed.grid_size),
                    prefix_tokens=int(getattr(trunk, "num_prefix_tokens", 0)))
    raise ConfigError(f"vision.model_name: the vision tower {type(visual).__name__} is not a ViT with patch tokens "
                      f"(only open_clip ViTs and timm ViTs are supported)")


class VisionEncoder(nn.Module):
    """An open_clip vision tower returning the patch tokens of K blocks.

    forward(pixel_values (b, 3, H, W)) -> list of K tensors (b, grid_h * grid_w, width), ascending block order.
    """

    def __init__(self, visual: nn.Module, cfg: VisionConfig, preprocess_cfg: dict):
        super().__init__()
        self.visual = visual
        layout = _vit_layout(visual)
        n = layout["n_blocks"]
        for t in cfg.taps:
            if not -n <= t < n:
                raise ConfigError(f"vision.taps: block index {t} is out of range for {cfg.model_name}, which has "
                                  f"{n} blocks (valid: {-n}..{n - 1})")
        taps = sorted({t % n for t in cfg.taps})
        if len(taps) != len(cfg.taps):
            raise ConfigError(f"vision.taps: {cfg.taps} name the same block twice ({n} blocks)")
        self.taps: list[int] = taps
        self.n_blocks = n
        self.width: int = layout["width"]
        self.patch_size: tuple[int, int] = layout["patch_size"]
        self.grid: tuple[int, int] = layout["grid"]
        self.num_tokens: int = self.grid[0] * self.grid[1]
        self.num_prefix_tokens: int = layout["prefix_tokens"]
        self.preprocess_cfg = preprocess_cfg
        size = preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.frozen = cfg.freeze
        if self.frozen:
            self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True):
        # A frozen tower stays in eval mode (no patch dropout, frozen norm statistics) under model.train().
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (batch, 3, H, W), got {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])} but the encoder takes "
                             f"{self.image_size}; preprocess images with the model's ImageProcessor")
        dtype = next(self.visual.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.visual.forward_intermediates(
                pixel_values.to(dtype), indices=self.taps, stop_early=True, intermediates_only=True,
                output_fmt="NLC")
        feats = out["image_intermediates"]  # K x (b, grid_h * grid_w, width): prefix tokens already removed
        assert len(feats) == len(self.taps) and feats[0].shape[1] == self.num_tokens, (
            f"open_clip returned {len(feats)} taps of {feats[0].shape[1]} tokens; expected {len(self.taps)} "
            f"of {self.num_tokens}")
        return list(feats)


# ------------------------------------------------------------------------------------------------ images

def _to_rgb(img, name: str):
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High-bit-depth grayscale: PIL's convert('L') clips at 255, turning most 16-bit images white.
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            scale = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        else:
            scale = 65535.0 if a.size and a.max() > 255 else 255.0
        a = np.clip(np.nan_to_num(a / scale), 0.0, 1.0)
        return Image.fromarray((a * 255.0 + 0.5).astype(np.uint8), mode="L").convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"image {name}: cannot convert mode {mode!r} to RGB: {e}") from None


def load_image(image) -> "Image.Image":
    """An RGB PIL image from a path, a PIL image or an (H, W[, C]) uint8/float array; see the module docstring."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as f:
                f.load()  # decode now, so a truncated file fails here with its name
                img = f.copy()  # keeps .info (palette transparency, EXIF)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image file {path}: {e}") from None
        return _to_rgb(img, str(path))
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(a.astype(np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        return _to_rgb(Image.fromarray(a), "<array>")
    if isinstance(image, Image.Image):
        return _to_rgb(image, "<PIL image>")
    raise TypeError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")


class ImageProcessor:
    """open_clip's eval transform for one encoder: ``processor(images) -> (n, 3, H, W)`` float tensor.

    ``unnormalize(pixel_values)`` inverts the mean/std step, giving the resized RGB image in [0, 1] (the
    alignment head's pixel target).
    """

    def __init__(self, preprocess_cfg: dict):
        import open_clip

        self.cfg = dict(preprocess_cfg)
        self.transform = open_clip.image_transform(
            self.cfg["size"], is_train=False, mean=self.cfg["mean"], std=self.cfg["std"],
            resize_mode=self.cfg.get("resize_mode"), interpolation=self.cfg.get("interpolation"),
            fill_color=self.cfg.get("fill_color", 0))
        self.mean = torch.tensor(self.cfg["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(self.cfg["std"], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: Sequence | Any) -> torch.Tensor:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.transform(load_image(im)) for im in images])

    def unnormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(pixel_values.device, pixel_values.dtype)
        std = self.std.to(pixel_values.device, pixel_values.dtype)
        return pixel_values * std + mean
