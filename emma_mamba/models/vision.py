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

Dual encoder (``vision.second_encoder``, Prismatic / Cobra / the EMMA-Mamba paper's DINOv2 + SigLIP): a second
ViT from timm (``timm.create_model``, random init or a local checkpoint file, never a download) runs on the same
preprocessed image and its taps are concatenated with the open_clip tower's along the channel axis, pairwise
(the k-th smallest tap index of each), so every downstream module sees one token grid of width C1 + C2. The
image is resized once, by the open_clip tower's transform (Prismatic's "resize-naive" strategy resizes both
towers' inputs the same way), and re-normalised for the second tower with its own mean/std by an exact affine
map, ``x2 = x1 * std1 / std2 + (mean1 - mean2) / std2``; the two towers must agree on image size and patch grid.

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

from emma_mamba.config import ConfigError, SecondEncoderConfig, VisionConfig

if TYPE_CHECKING:  # PIL is imported where images are loaded
    from PIL import Image

__all__ = ["build_open_clip", "build_second_encoder", "VisionEncoder", "load_image", "ImageProcessor"]

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

    device, on_meta, pretrained = _device_and_weights(device, cfg.pretrained, load_weights, "vision.pretrained",
                                                      "open_clip")

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
    # open_clip logs through the root logger's module functions (logging.info), which call basicConfig() when
    # the root has no handler: a handler a user's later basicConfig(level=..., format=...) then defers to
    root_handlers = list(root.handlers)
    if quiet is not None:
        root.addFilter(quiet)
    try:
        with torch.device(device) if on_meta else _nullcontext():
            model = open_clip.create_model(
                cfg.model_name, pretrained=pretrained, device=device, pretrained_image=False,
                pretrained_text=False, force_preprocess_cfg=force_preprocess, **kwargs)
    except Exception as e:  # noqa: BLE001 - a weight file that is not this model's: name it, briefly
        if pretrained is None or isinstance(e, ConfigError):
            raise
        text = " ".join(str(e).split())
        raise ConfigError(f"vision.pretrained: {pretrained} could not be loaded into open_clip's {cfg.model_name} "
                          f"({type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''})") from None
    finally:
        if quiet is not None:
            root.removeFilter(quiet)
        for h in [h for h in root.handlers if h not in root_handlers]:
            root.removeHandler(h)
    if pretrained is None:
        log.debug("open_clip %s built without pretrained weights", cfg.model_name)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    if cfg.image_resize in ("crop", "squash"):
        preprocess_cfg["resize_mode"] = {"crop": "shortest", "squash": "squash"}[cfg.image_resize]
    elif cfg.image_resize == "letterbox":
        preprocess_cfg["pad_to_square"] = True
    return model, preprocess_cfg


def build_second_encoder(cfg: SecondEncoderConfig, device: torch.device | str | None = None,
                         load_weights: bool = True) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """The timm ViT of ``vision.second_encoder`` (classifier head removed) with its input mean and std.

    ``device='meta'`` builds shapes only. Weights come from ``cfg.pretrained``, a local file, through timm's own
    loader (which resamples the position embeddings to the configured image size); a file that does not fit the
    architecture is a ConfigError naming it.
    """
    import timm

    if cfg.timm_model is None:
        raise ValueError("vision.second_encoder.timm_model is null: there is no second encoder to build")
    if not timm.is_model(cfg.timm_model):
        close = timm.list_models(f"*{cfg.timm_model.split('.')[0][:12]}*")[:8]
        raise ConfigError(f"vision.second_encoder.timm_model: {cfg.timm_model!r} is not a timm model"
                          f"{'; similar: ' + ', '.join(close) if close else ''} (see timm.list_models())")
    device, on_meta, pretrained = _device_and_weights(device, cfg.pretrained, load_weights,
                                                      "vision.second_encoder.pretrained", "the timm")
    kwargs = {"num_classes": 0, **cfg.timm_kwargs}
    if pretrained is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": pretrained, "hf_hub_id": None, "url": None})
    try:
        with torch.device(device) if on_meta else _nullcontext():
            model = timm.create_model(cfg.timm_model, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if pretrained is not None:
            raise ConfigError(f"vision.second_encoder.pretrained: {pretrained} does not fit {cfg.timm_model} with "
                              f"timm_kwargs {cfg.timm_kwargs}: {first}") from None
        raise ConfigError(f"vision.second_encoder: timm cannot build {cfg.timm_model} with timm_kwargs "
                          f"{cfg.timm_kwargs}: {first}") from None
    except TypeError as e:
        raise ConfigError(f"vision.second_encoder.timm_kwargs: {cfg.timm_kwargs} not accepted by "
                          f"{cfg.timm_model}: {e}") from None
    if not on_meta:
        model.to(device)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in (cfg.mean if cfg.mean is not None else pcfg.get("mean", ())))
    std = tuple(float(v) for v in (cfg.std if cfg.std is not None else pcfg.get("std", ())))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"vision.second_encoder: timm has no 3-channel mean/std for {cfg.timm_model}; set "
                          f"vision.second_encoder.mean and .std")
    return model, mean, std


def _device_and_weights(device, pretrained: str | None, load_weights: bool, where: str, whose: str):
    """(device, on_meta, the weight file to load or None): no file on the meta device or when not loading; a
    configured file that does not exist is a ConfigError naming ``where`` (a hub tag is never downloaded)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_meta = device.type == "meta"
    path = pretrained if (load_weights and not on_meta) else None
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{where}: {path!r} is not an existing file (only local checkpoint files are accepted; "
                          f"download {whose} weights beforehand)")
    return device, on_meta, path


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


def _idle_parameters(layout: dict[str, Any], last_tap: int) -> list[nn.Parameter]:
    """The parameters of the tower of ``layout`` (:func:`_vit_layout`) that ``forward_intermediates(...,
    stop_early=True, intermediates_only=True)`` never reads when its deepest index is ``last_tap``: the blocks after
    it and the tower's ``tail`` (final norm, pooling, projection head). Listed by name, so a tower with other unused
    parts keeps them trainable (harmless: they get no gradient); the test checks this list against autograd."""
    out: list[nn.Parameter] = []
    for part in [*list(layout["blocks"])[last_tap + 1:], *layout["tail"]]:
        if isinstance(part, nn.Parameter):
            out.append(part)
        elif isinstance(part, nn.Module):
            out += list(part.parameters())
    return out


def _vit_layout(visual: nn.Module) -> dict[str, Any]:
    """Block count, width, patch size and grid of an open_clip vision tower (native CLIP ViT or timm ViT); its
    ``blocks`` and its ``tail``, the parts after them that the taps never run (None where a tower lacks one):
    open_clip's ``ln_post`` / ``proj`` / attention pools, timm's ``norm`` / ``fc_norm`` / ``attn_pool`` / ``head``
    and open_clip's TimmModel ``head``."""
    if hasattr(visual, "transformer") and hasattr(visual, "grid_size"):  # open_clip.transformer.VisionTransformer
        blocks = visual.transformer.resblocks
        tail = [getattr(visual, n, None) for n in ("ln_post", "proj", "attn_pool", "attn_pool_contrastive",
                                                   "ln_contrastive")]
        return dict(n_blocks=len(blocks), width=visual.transformer.width, patch_size=tuple(visual.patch_size),
                    grid=tuple(visual.grid_size), prefix_tokens=1, blocks=blocks, tail=tail)
    trunk = getattr(visual, "trunk", visual)  # open_clip.timm_model.TimmModel, or a timm ViT itself
    if hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        tail = [getattr(trunk, n, None) for n in ("norm", "fc_norm", "attn_pool", "head")]
        tail += [getattr(visual, "head", None)] if trunk is not visual else []
        return dict(n_blocks=len(trunk.blocks), width=trunk.embed_dim,
                    patch_size=tuple(trunk.patch_embed.patch_size), grid=tuple(trunk.patch_embed.grid_size),
                    prefix_tokens=int(getattr(trunk, "num_prefix_tokens", 0)), blocks=trunk.blocks, tail=tail)
    raise ConfigError(f"vision.model_name: the vision tower {type(visual).__name__} is not a ViT with patch tokens "
                      f"(only open_clip ViTs and timm ViTs are supported)")


class VisionEncoder(nn.Module):
    """An open_clip vision tower returning the patch tokens of K blocks.

    forward(pixel_values (b, 3, H, W)) -> list of K tensors (b, grid_h * grid_w, width), ascending block order.

    With a ``second`` (timm) ViT, each tap is the channel concatenation [open_clip tap k ; second tap k] and
    ``width`` is the sum of both widths; ``second_mean`` / ``second_std`` are its input normalisation.
    """

    def __init__(self, visual: nn.Module, cfg: VisionConfig, preprocess_cfg: dict, second: nn.Module | None = None,
                 second_mean: Sequence[float] = (), second_std: Sequence[float] = ()):
        super().__init__()
        self.visual = visual
        layout = _vit_layout(visual)
        n = layout["n_blocks"]
        self.taps: list[int] = _resolve_taps(cfg.taps, n, "vision.taps", cfg.model_name)
        self.n_blocks = n
        self.width: int = layout["width"]  # the fused features' (the open_clip tower's, + a second encoder's below)
        self.open_clip_width: int = layout["width"]
        self.patch_size: tuple[int, int] = layout["patch_size"]
        self.grid: tuple[int, int] = layout["grid"]
        self.num_tokens: int = self.grid[0] * self.grid[1]
        self.num_prefix_tokens: int = layout["prefix_tokens"]
        self.preprocess_cfg = preprocess_cfg
        size = preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.second = second
        self.second_taps: list[int] = []
        if second is not None:
            se = cfg.second_encoder
            lay2 = _vit_layout(second)
            self.second_taps = _resolve_taps(se.taps, lay2["n_blocks"], "vision.second_encoder.taps", se.timm_model)
            size2 = tuple(second.patch_embed.img_size)
            if size2 != self.image_size:
                raise ConfigError(f"vision.second_encoder: {se.timm_model} takes {size2[0]}x{size2[1]} images but "
                                  f"{cfg.model_name} takes {self.image_size[0]}x{self.image_size[1]}; set "
                                  f"vision.second_encoder.timm_kwargs.img_size: {self.image_size[0]}")
            if tuple(lay2["grid"]) != self.grid:
                raise ConfigError(f"vision.second_encoder: {se.timm_model}'s patch grid {lay2['grid']} differs from "
                                  f"{cfg.model_name}'s {self.grid}; the taps are fused token by token, so both "
                                  f"encoders need the same grid (patch size x grid = image size)")
            self.width += lay2["width"]
            # x2 = (x1 * std1 + mean1 - mean2) / std2, per channel, as one multiply-add; kept as Python floats
            # (not buffers, which model.to(bfloat16) would round to 3 digits), applied in fp32
            m1, s1 = preprocess_cfg["mean"], preprocess_cfg["std"]
            self.second_affine = ([a / b for a, b in zip(s1, second_std)],
                                  [(a - c) / b for a, c, b in zip(m1, second_mean, second_std)])
            self._affine_by_device: dict = {}  # device -> (scale, shift) tensors
        # what the taps never run (the blocks after the deepest tap, the heads): never trainable. Kept by name:
        # a load with assign=True (emma_mamba.load, a run's init_from) puts new Parameter objects in their place
        idle = {id(p) for p in _idle_parameters(layout, self.taps[-1])}
        if second is not None:
            idle |= {id(p) for p in _idle_parameters(lay2, self.second_taps[-1])}
        self._idle_names = [n for n, p in self.named_parameters(remove_duplicate=False) if id(p) in idle]
        self.set_frozen(cfg.freeze)

    @property
    def idle_parameters(self) -> list[nn.Parameter]:
        """The parameters the taps never run (the blocks after the deepest tap, the final norm and heads), as the
        module holds them now."""
        params = dict(self.named_parameters(remove_duplicate=False))
        return [params[n] for n in self._idle_names]

    def set_frozen(self, frozen: bool) -> "VisionEncoder":
        """Freeze the towers (no gradients, eval mode under model.train()) or let them train (vision.freeze)."""
        self.frozen = bool(frozen)
        self.requires_grad_(not self.frozen)
        for tower in self.towers():
            tower.train(self.training and not self.frozen)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "VisionEncoder":
        """As nn.Module's, except that :attr:`idle_parameters` (never run by the taps) stay frozen: an unfrozen
        ViT does not list weights in the optimizer that can get no gradient."""
        super().requires_grad_(requires_grad)
        for p in self.idle_parameters:
            p.requires_grad_(False)
        return self

    def trainable_numel(self, tower: nn.Module) -> int:
        """Parameters of ``tower`` the taps run (those an unfrozen encoder trains)."""
        idle = {id(p) for p in self.idle_parameters}
        return sum(p.numel() for p in {id(p): p for p in tower.parameters()}.values() if id(p) not in idle)

    def _second_affine_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The re-normalisation's (3, 1, 1) fp32 scale and shift on ``device``, made once per device (not a copy
        to the device on every forward)."""
        if device not in self._affine_by_device:
            self._affine_by_device[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1)
                                                   for v in self.second_affine)
        return self._affine_by_device[device]

    def towers(self) -> list[nn.Module]:
        """The ViTs: the open_clip tower, and the second encoder when there is one."""
        return [self.visual] if self.second is None else [self.visual, self.second]

    def train(self, mode: bool = True):
        # A frozen tower stays in eval mode (no patch dropout, frozen norm statistics) under model.train(); one a
        # user unfroze by requires_grad_ (not set_frozen) trains as set_frozen(False) would have it
        super().train(mode)
        for tower in self.towers():
            if self.frozen and not _trains(tower):
                tower.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (batch, 3, H, W), got {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():  # e.g. torchvision.io's uint8 images: not normalised
            raise ValueError(f"pixel_values must be a floating-point tensor, normalised by the model's "
                             f"ImageProcessor (model.image_processor), got {pixel_values.dtype}")
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])} but the encoder takes "
                             f"{self.image_size}; preprocess images with the model's ImageProcessor")
        dtype = next(self.visual.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(self.visual)):
            out = self.visual.forward_intermediates(
                pixel_values.to(dtype), indices=self.taps, stop_early=True, intermediates_only=True,
                output_fmt="NLC")
        feats = out["image_intermediates"]  # K x (b, grid_h * grid_w, width): prefix tokens already removed
        assert len(feats) == len(self.taps) and feats[0].shape[1] == self.num_tokens, (
            f"open_clip returned {len(feats)} taps of {feats[0].shape[1]} tokens; expected {len(self.taps)} "
            f"of {self.num_tokens}")
        if self.second is None:
            return list(feats)
        dtype2 = next(self.second.parameters()).dtype
        scale, shift = self._second_affine_on(pixel_values.device)
        x2 = pixel_values.float() * scale + shift  # its own mean/std
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(self.second)):
            feats2 = self.second.forward_intermediates(
                x2.to(dtype2), indices=self.second_taps, stop_early=True, intermediates_only=True, output_fmt="NLC")
        assert len(feats2) == len(feats) and feats2[0].shape[1] == self.num_tokens, (
            f"the second encoder returned {len(feats2)} taps of {feats2[0].shape[1]} tokens; expected "
            f"{len(feats)} of {self.num_tokens}")
        return [torch.cat([a, b.to(a.dtype)], dim=-1) for a, b in zip(feats, feats2)]  # K x (b, N, C1 + C2)


def _resolve_taps(taps: Sequence[int], n: int, where: str, model_name: str) -> list[int]:
    """Block indices in [0, n), ascending; a ConfigError naming ``where`` for an index out of range or a repeat."""
    for t in taps:
        if not -n <= t < n:
            raise ConfigError(f"{where}: block index {t} is out of range for {model_name}, which has {n} blocks "
                              f"(valid: {-n}..{n - 1})")
    resolved = sorted({t % n for t in taps})
    if len(resolved) != len(taps):
        raise ConfigError(f"{where}: {list(taps)} name the same block twice ({n} blocks)")
    return resolved


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


def _bomb_message(path, err: Exception) -> str:
    """The error for an image PIL refuses as a decompression bomb: the file, its size in pixels, PIL's limit and
    how to lift it (the limit guards against small files that decode to gigabytes, so it is not lifted here)."""
    import re

    from PIL import Image

    # PIL refuses outright above twice MAX_IMAGE_PIXELS (between the two it only warns); its message carries
    # the image's pixel count, which the exception has no attribute for
    m = re.search(r"\((\d+) pixels\)", str(err))
    has = f"has {int(m.group(1)):,} pixels, " if m else "is "
    limit = f" ({2 * Image.MAX_IMAGE_PIXELS:,} pixels)" if Image.MAX_IMAGE_PIXELS else ""
    return (f"cannot read image file {path}: the image {has}more than PIL's decompression-bomb limit{limit}; "
            f"if it is meant to be this large, set PIL.Image.MAX_IMAGE_PIXELS higher before loading it (the limit "
            f"is twice that value; None turns the check off), or downscale the image")


def _trains(tower: nn.Module) -> bool:
    """Whether any parameter of ``tower`` requires a gradient now (set_frozen's, set_stage's, or a user's own
    requires_grad_): the tower's forward then records its graph; a frozen one runs without (no activations kept)."""
    return any(p.requires_grad for p in tower.parameters())


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    """An image array as uint8, by the rules of a 16-bit file (``_to_rgb``): uint8 as it is; other integers
    (uint16 from ``skimage.img_as_uint``, imageio, tifffile) 0-255 when their maximum is at most 255, else
    0-65535; floats 0-1 when their maximum is at most 1.5 (resampling overshoots 1 a little: clipped; a 0-255
    image that dark is black either way), else 0-255 (clipped); bool 0 / 255. Integers outside 0-65535 are refused
    (no bit depth to read them by)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"image array of {a.dtype} holds values {lo}..{hi}: expected 0-255 (8-bit) or "
                             f"0-65535 (16-bit)")
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        return np.clip(a.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"image array must hold integers, floats or bools, got {a.dtype}")
    f = np.nan_to_num(a.astype(np.float64))
    return np.clip(f * (255.0 if f.size and f.max() <= _FLOAT_UNIT_MAX else 1.0), 0, 255).round().astype(np.uint8)


_FLOAT_UNIT_MAX = 1.5  # a float image array up to this maximum is 0-1 (clipped), above it 0-255


def load_image(image) -> "Image.Image":
    """An RGB PIL image from a path, a PIL image or an (H, W[, C]) array (uint8; uint16 and other integers,
    0-255 or 0-65535 by their maximum; float 0-1 or 0-255; bool); see the module docstring.
    A missing file raises FileNotFoundError; one that cannot be decoded, or that PIL refuses as a decompression
    bomb (more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels), ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as f:
                f.load()  # decode now, so a truncated file fails here with its name
                img = f.copy()  # keeps .info (palette transparency, EXIF)
        except Image.DecompressionBombError as e:
            # not an OSError: without this clause a tiny file declaring a huge size escaped every caller's
            # "unreadable image" handling (data check, pretrain, generate, chat) as a raw traceback
            raise ValueError(_bomb_message(path, e)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image file {path}: {e}") from None
        return _to_rgb(img, str(path))
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
        return _to_rgb(Image.fromarray(_array_to_uint8(a)), "<array>")
    if isinstance(image, Image.Image):
        return _to_rgb(image, "<PIL image>")
    raise TypeError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def pad_to_square(img: "Image.Image", fill: tuple[int, ...]) -> "Image.Image":
    """``img`` centred on a square canvas of its longer side filled with ``fill`` (LLaVA-1.5's 'pad')."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _within(img: "Image.Image", max_side: int) -> "Image.Image":
    """``img`` shrunk (bicubic, aspect ratio kept, each side at least 1) so that its long side is at most
    ``max_side``; unchanged when it already is."""
    from PIL import Image

    w, h = img.size
    if max(w, h) <= max_side:
        return img
    k = max_side / max(w, h)
    return img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BICUBIC)


class ImageProcessor:
    """open_clip's eval transform for one encoder: ``processor(images) -> (n, 3, H, W)`` float tensor; with
    ``pad_to_square`` in the config (``vision.image_resize: letterbox``) each image is first padded to a square
    with the mean colour (as LLaVA-1.5: ``int(255 * mean)`` per channel).

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
        self.fill = tuple(int(255 * m) for m in self.cfg["mean"]) if self.cfg.get("pad_to_square") else None

    def __call__(self, images: Sequence | Any) -> torch.Tensor:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.one(im) for im in images])

    MAX_RESIZED_PIXELS = 1 << 24
    """The most pixels the encoder's resize may make of an image before its centre crop (resize_mode "shortest":
    the short side to the encoder's, the long side by the same factor): an image of extreme aspect ratio (a 1 x
    10000 PNG of 118 bytes) would otherwise become gigabytes (336 x 3.36M pixels)."""
    LETTERBOX_MAX_SIDE = 4096
    """Letterbox pads to a square of the image's long side, then resizes to the encoder's: an image whose long
    side is longer is first shrunk to it (keeping its aspect ratio), so the square stays bounded (a 1 x 20000 image
    made a 20000 x 20000 canvas). LLaVA pads at full size; for images up to this side the two are the same."""

    def one(self, image) -> torch.Tensor:
        """(3, H, W) of one image (anything :func:`load_image` takes)."""
        img = load_image(image)
        if self.fill is not None:
            return self.transform(pad_to_square(_within(img, self.LETTERBOX_MAX_SIDE), self.fill))
        self.check_size(img.size, str(image) if isinstance(image, (str, os.PathLike)) else "an image")
        return self.transform(img)

    def check_size(self, size: tuple[int, int], name: str = "an image") -> None:
        """Refuse (ValueError naming ``name``) an image of ``size`` (w, h) that the encoder's resize would make
        larger than :attr:`MAX_RESIZED_PIXELS` (resize_mode "shortest"; the other modes and letterbox are bounded
        by the encoder's size)."""
        if self.fill is not None or (self.cfg.get("resize_mode") or "shortest") != "shortest":
            return
        s = self.cfg["size"]
        side = max(s) if isinstance(s, (tuple, list)) else int(s)
        w, h = size
        scale = side / max(1, min(w, h))
        rw, rh = round(w * scale), round(h * scale)
        if rw * rh > self.MAX_RESIZED_PIXELS:
            raise ValueError(f"{name}: a {w}x{h} image (aspect ratio {max(w, h) / max(1, min(w, h)):.0f}:1) would be "
                             f"resized to {rw}x{rh} pixels before the encoder's {side}-pixel centre crop (more than "
                             f"{self.MAX_RESIZED_PIXELS:,}); crop it nearer to square, or use vision.image_resize: "
                             f"letterbox or squash")

    def unnormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(pixel_values.device, pixel_values.dtype)
        std = self.std.to(pixel_values.device, pixel_values.dtype)
        return pixel_values * std + mean
