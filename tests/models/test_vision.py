"""Vision encoder: taps against forward hooks on open_clip's own blocks, preprocessing against open_clip's
own transform, odd images against hand-computed pixels, and the clear errors."""

from __future__ import annotations

import os

import numpy as np
import open_clip
import pytest
import skimage
import torch
from PIL import Image

from emma_mamba.config import ConfigError, VisionConfig, get_preset
from emma_mamba.models.vision import ImageProcessor, VisionEncoder, build_open_clip, load_image

DATA = os.path.dirname(skimage.data.__file__)
ASTRONAUT = os.path.join(DATA, "astronaut.png")  # RGB 512x512
CHELSEA = os.path.join(DATA, "chelsea.png")  # RGB 451x300
CAMERA = os.path.join(DATA, "camera.png")  # L 512x512
LOGO = os.path.join(DATA, "logo.png")  # RGBA 500x500
GIF = os.path.join(DATA, "no_time_for_that_tiny.gif")  # P 14x25

TINY_TEXT = {"width": 32, "heads": 2, "layers": 1, "context_length": 16}


def tiny_vision_cfg(**kw) -> VisionConfig:
    cfg = get_preset("tiny").vision
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_vision_cfg(taps=[0, -2, -1])
    clip, pp = build_open_clip(cfg)
    return VisionEncoder(clip.visual, cfg, pp), pp


def _hooked_blocks(blocks, x_fn):
    """Runs x_fn() with forward hooks on every block; returns each block's output (the oracle)."""
    outs = {}
    handles = [b.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o)) for k, b in enumerate(blocks)]
    try:
        x_fn()
    finally:
        for h in handles:
            h.remove()
    return outs


def test_clip_taps_equal_block_outputs(tiny):
    enc, pp = tiny
    assert enc.taps == [0, 1, 2]  # 3 blocks: 0, -2 -> 1, -1 -> 2, kept ascending
    x = ImageProcessor(pp)([ASTRONAUT, CHELSEA])
    feats = enc(x)
    # Independent oracle: the visual tower's ordinary forward with hooks on its residual blocks.
    visual = enc.visual
    outs = _hooked_blocks(visual.transformer.resblocks, lambda: visual(x))
    for tap, f in zip(enc.taps, feats):
        ref = outs[tap]
        ref = ref if visual.transformer.batch_first else ref.transpose(0, 1)
        assert f.shape == (2, 16, 32)
        torch.testing.assert_close(f, ref[:, 1:], rtol=0, atol=0)  # class token dropped, 4x4 patch grid


@pytest.mark.parametrize("timm_name,prefix", [("vit_tiny_patch16_224", 1), ("vit_wee_patch16_reg1_gap_256", 1)])
def test_timm_taps_drop_prefix_tokens(timm_name, prefix):
    # timm-based towers (the SigLIP path): class and register tokens are prefix tokens to drop.
    size = 224 if "224" in timm_name else 256
    cfg = VisionConfig(model_name="ViT-B-16-SigLIP", taps=[1, -2], open_clip_overrides={
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": timm_name, "image_size": size},
        "text_cfg": {**TINY_TEXT, "vocab_size": 100}})
    clip, pp = build_open_clip(cfg)
    enc = VisionEncoder(clip.visual, cfg, pp)
    trunk = clip.visual.trunk
    assert trunk.num_prefix_tokens == prefix and enc.num_prefix_tokens == prefix
    n = len(trunk.blocks)
    assert enc.taps == [1, n - 2]
    x = ImageProcessor(pp)([CHELSEA])
    feats = enc(x)
    outs = _hooked_blocks(trunk.blocks, lambda: trunk.forward_features(x))
    grid = (size // 16) ** 2
    for tap, f in zip(enc.taps, feats):
        assert f.shape == (1, grid, trunk.embed_dim)
        torch.testing.assert_close(f, outs[tap][:, prefix:], rtol=0, atol=0)


def _siglip_wee_cfg(taps):
    return VisionConfig(model_name="ViT-B-16-SigLIP", taps=taps, freeze=False, open_clip_overrides={
        "embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_wee_patch16_reg1_gap_256", "image_size": 256},
        "text_cfg": {**TINY_TEXT, "vocab_size": 100}})


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
def test_unfrozen_encoder_trains_exactly_what_the_taps_run(kind):
    # Oracle: autograd. Every parameter the taps' backward reaches is trainable, every other one is not (the
    # blocks after the deepest tap, the final norm, the pooling and projection heads never run).
    cfg = tiny_vision_cfg(taps=[0], freeze=False) if kind == "open_clip" else _siglip_wee_cfg([1])
    torch.manual_seed(0)
    clip, pp = build_open_clip(cfg)
    enc = VisionEncoder(clip.visual, cfg, pp).train()
    x = torch.randn(1, 3, *enc.image_size)
    for p in enc.parameters():  # the oracle's view: every parameter asked
        p.requires_grad_(True)
    feats = enc.visual.forward_intermediates(x, indices=enc.taps, stop_early=True, intermediates_only=True,
                                             output_fmt="NLC")["image_intermediates"]
    params = dict(enc.named_parameters())
    grads = torch.autograd.grad(sum(f.sum() for f in feats), list(params.values()), allow_unused=True)
    reached = {n for (n, _), g in zip(params.items(), grads) if g is not None}
    enc.set_frozen(False)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == reached
    assert len(reached) < len(params)  # the oracle had something to exclude: taps end before the last block
    assert enc.trainable_numel(enc.visual) == sum(params[n].numel() for n in reached)
    enc.requires_grad_(True)  # as EmmaMamba.set_stage calls it
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == reached
    enc.set_frozen(True)
    assert not any(p.requires_grad for p in enc.parameters())


def test_a_tower_unfrozen_by_plain_requires_grad_trains():
    """model.requires_grad_(True) (nn.Module's: it sets each parameter, never calling the encoder's own) on a
    frozen encoder: the ViT parameters the taps run get gradients and the tower trains under .train(); the tower
    ran under no_grad by the vision.freeze flag alone (an optimizer over them silently never moved them)."""
    torch.manual_seed(0)
    cfg = tiny_vision_cfg(taps=[0])
    clip, pp = build_open_clip(cfg)
    enc = VisionEncoder(clip.visual, cfg, pp)
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    for p in enc.parameters():
        p.requires_grad_(True)
    enc.train()
    assert enc.visual.training
    sum(f.sum() for f in enc(torch.randn(1, 3, *enc.image_size))).backward()
    got = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert {"visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"} <= got
    for p in enc.parameters():
        p.requires_grad_(False)
    enc.train()
    assert not enc.visual.training  # frozen again: eval under train()
    with torch.enable_grad():
        assert not any(f.requires_grad for f in enc(torch.randn(1, 3, *enc.image_size)))


def test_frozen_and_stays_eval(tiny):
    enc, _ = tiny
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not enc.visual.training
    enc.eval()


def test_bad_taps_and_pixel_shapes(tiny):
    enc, _ = tiny
    clip, pp = build_open_clip(tiny_vision_cfg())
    with pytest.raises(ConfigError, match=r"vision.taps: block index 3 is out of range .* 3 blocks"):
        VisionEncoder(clip.visual, tiny_vision_cfg(taps=[3]), pp)
    with pytest.raises(ConfigError, match="same block twice"):
        VisionEncoder(clip.visual, tiny_vision_cfg(taps=[2, -1]), pp)
    with pytest.raises(ValueError, match=r"\(31, 32\) but the encoder takes \(32, 32\)"):
        enc(torch.zeros(1, 3, 31, 32))
    # raw 0..255 images (torchvision.io's uint8) ran, cast to float and never normalised
    with pytest.raises(ValueError, match=r"floating-point tensor, normalised by the model's ImageProcessor .*uint8"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_local_pretrained_file_and_no_download(tmp_path):
    cfg = tiny_vision_cfg()
    clip, _ = build_open_clip(cfg)
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded, _ = build_open_clip(tiny_vision_cfg(pretrained=str(path)))
    for (k, a), (_, b) in zip(clip.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    # a tag name is not a local file: refused instead of downloaded
    for bad in ("openai", str(tmp_path / "missing.pt")):
        with pytest.raises(ConfigError, match="vision.pretrained: .* is not an existing file"):
            build_open_clip(tiny_vision_cfg(pretrained=bad))


def test_unknown_model_and_tag():
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        build_open_clip(VisionConfig(model_name="ViT-Nope-1"), device="meta")
    with pytest.raises(ConfigError, match="preprocess_tag: 'nope'"):
        build_open_clip(VisionConfig(model_name="ViT-L-14-336-quickgelu", preprocess_tag="nope"), device="meta")


def test_siglip_preprocess_from_tag_on_meta():
    cfg = VisionConfig(model_name="ViT-SO400M-14-SigLIP-384", preprocess_tag="webli", taps=[-2])
    clip, pp = build_open_clip(cfg, device="meta")
    assert pp["mean"] == (0.5, 0.5, 0.5) and pp["std"] == (0.5, 0.5, 0.5) and pp["resize_mode"] == "squash"
    enc = VisionEncoder(clip.visual, cfg, pp)
    assert (enc.grid, enc.width, enc.num_prefix_tokens, enc.taps) == ((27, 27), 1152, 0, [25])
    assert next(enc.parameters()).is_meta


def test_processor_matches_open_clip_transform():
    # open_clip's own preprocess, built by its own factory for the same (tiny) model
    ov = get_preset("tiny").vision.open_clip_overrides
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", **ov)
    _, pp = build_open_clip(tiny_vision_cfg())
    proc = ImageProcessor(pp)
    for path in (ASTRONAUT, CHELSEA):
        assert torch.equal(proc(path)[0], preprocess(Image.open(path)))


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # transparent: white, not (10, 20, 30)
    rgba[0, 2, 3] = 128  # half: 10 * a + 255 * (1 - a)
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    a = 128 / 255
    expect = [round(c * a + 255 * (1 - a)) for c in (10, 20, 30)]
    assert all(abs(int(o) - e) <= 1 for o, e in zip(out[0, 2], expect))


def test_sixteen_bit_grayscale_is_rescaled(tmp_path):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (1, 3, 3)
    assert list(out[0, :, 0]) == [0, 128, 255]  # not clipped to white as convert('L') would


def test_image_arrays_are_read_by_their_bit_depth(tmp_path):
    """A uint16 array (skimage.img_as_uint, imageio, tifffile) is the same picture as that array saved as a 16-bit
    PNG and read from its path (the oracle); it was clipped at 255, all white. Integers 0-255 of any dtype are
    8-bit values; bool is 0 / 255; floats 0-1 or 0-255; values no bit depth explains are refused."""
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, size=(5, 7), dtype=np.uint16)
    a16[0, 0] = 65535
    path = tmp_path / "g16.png"
    Image.fromarray(a16).save(path)
    want = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image(a16)), want)
    assert np.array_equal(np.asarray(load_image(a16.astype(np.int32))), want)
    a8 = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    for dtype in (np.int64, np.uint16, np.int16, np.uint32):
        assert np.array_equal(np.asarray(load_image(a8.astype(dtype))), a8), dtype
    assert np.array_equal(np.asarray(load_image(a8 / 255.0)), a8)
    mask = rng.random((4, 4)) > 0.5
    assert np.array_equal(np.asarray(load_image(mask))[..., 0], mask.astype(np.uint8) * 255)
    for bad, msg in ((np.array([[-1, 3]]), r"values -1\.\.3: expected 0-255"),
                     (np.array([[0, 70000]]), r"values 0\.\.70000"),
                     (np.array([["a", "b"]]), "must hold integers, floats or bools")):
        with pytest.raises(ValueError, match=msg):
            load_image(bad)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (200, 0, 0)


def test_odd_images_all_preprocess(tmp_path):
    _, pp = build_open_clip(tiny_vision_cfg())
    proc = ImageProcessor(pp)
    big = Image.open(ASTRONAUT).resize((4000, 3000))
    one = Image.new("RGB", (1, 1), (255, 0, 0))
    cmyk = Image.open(CHELSEA).convert("CMYK")
    inputs = [CAMERA, LOGO, GIF, one, big, cmyk, np.asarray(Image.open(CAMERA)),
              np.asarray(Image.open(ASTRONAUT), dtype=np.float32) / 255.0]
    x = proc(inputs)
    assert x.shape == (len(inputs), 3, 32, 32) and torch.isfinite(x).all()
    # the 1x1 red image stays uniformly red after resizing
    red = proc.unnormalize(x[3])
    torch.testing.assert_close(red, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 32, 32),
                               atol=1e-5, rtol=0)
    # grayscale: three equal channels
    gray = proc.unnormalize(x[0])
    torch.testing.assert_close(gray[0], gray[1], atol=1e-5, rtol=0)


def test_missing_and_corrupt_files_are_named(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(missing)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.png"):
        load_image(bad)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(ASTRONAUT, "rb").read()[:5000])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        load_image(42)


def test_a_decompression_bomb_is_named_like_a_corrupt_file(tmp_path, monkeypatch):
    """PIL refuses an image of more than twice MAX_IMAGE_PIXELS with DecompressionBombError, which is not an
    OSError: load_image must turn it into its ValueError naming the file (what data check, pretrain, generate,
    chat and serve handle), saying why and how to allow it. A lowered limit makes a small file a 'bomb'."""
    from emma_mamba.data.llava import DataError, preprocess_image

    path = tmp_path / "bomb.png"
    Image.new("1", (100, 50)).save(path)  # 5,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above 2,000
    with pytest.raises(ValueError) as e:
        load_image(path)
    msg = str(e.value)
    assert "bomb.png" in msg and "decompression-bomb limit" in msg and "PIL.Image.MAX_IMAGE_PIXELS" in msg
    assert "5,000 pixels" in msg and "2,000 pixels" in msg
    # the data pipeline's path (data check, pretrain): a corrupt_image record error, not a crash
    _, pp = build_open_clip(tiny_vision_cfg())
    with pytest.raises(DataError, match="decompression-bomb limit") as e:
        preprocess_image(path, ImageProcessor(pp))
    assert e.value.reason == "corrupt_image"
    # the limit is the cause: raised as the message says, the same file loads
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(path).size == (100, 50)


def _oracle(img: Image.Image, pp: dict, size: int) -> torch.Tensor:
    """torchvision directly: bicubic resize of a PIL image to size x size, to tensor, normalised."""
    import torchvision.transforms.functional as TF

    out = TF.to_tensor(img.convert("RGB").resize((size, size), Image.BICUBIC))
    return TF.normalize(out, pp["mean"], pp["std"])


def test_image_resize_modes():
    """vision.image_resize on a 451 x 300 photograph: 'squash' equals resizing both sides, 'letterbox' equals
    LLaVA-1.5's expand2square (centred on a square of the mean colour, int(255 * mean)) then resizing, whose
    bands unnormalise to that colour; 'crop' equals the shorter side resized and the center cropped (open_clip's
    own CLIP transform); 'default' is the encoder's own."""
    import torchvision.transforms.functional as TF

    photo = Image.open(CHELSEA).convert("RGB")
    w, h = photo.size
    out = {}
    for mode in ("default", "crop", "squash", "letterbox"):
        _, pp = build_open_clip(tiny_vision_cfg(image_resize=mode))
        out[mode] = ImageProcessor(pp)(CHELSEA)[0]
    size = out["default"].shape[-1]
    # squash: both sides to `size`, aspect ratio not kept (torchvision's tensor path antialiases, PIL's too)
    squashed = TF.normalize(TF.resize(TF.to_tensor(photo), [size, size], TF.InterpolationMode.BICUBIC,
                                      antialias=True), pp["mean"], pp["std"])
    torch.testing.assert_close(out["squash"], squashed, atol=0.05, rtol=0)
    # letterbox: the photograph centred on a mean-coloured square, by hand
    fill = tuple(int(255 * m) for m in pp["mean"])
    canvas = Image.new("RGB", (w, w), fill)
    canvas.paste(photo, (0, (w - h) // 2))
    boxed = TF.normalize(TF.resize(TF.to_tensor(canvas), [size, size], TF.InterpolationMode.BICUBIC,
                                   antialias=True), pp["mean"], pp["std"])
    torch.testing.assert_close(out["letterbox"], boxed, atol=0.05, rtol=0)
    band = int(size * ((w - h) // 2) / w) - 1  # rows that are all padding after the resize
    top = ImageProcessor(pp).unnormalize(out["letterbox"])[:, :band]
    want = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1) / 255
    torch.testing.assert_close(top, want.expand_as(top), atol=1.5 / 255, rtol=0)
    assert not torch.allclose(out["letterbox"], out["squash"], atol=0.1)
    # crop: the tiny CLIP's default is open_clip's resize-shorter-side + center crop
    assert torch.equal(out["crop"], out["default"])
    cropped = TF.center_crop(TF.resize(TF.to_tensor(photo), size, TF.InterpolationMode.BICUBIC, antialias=True),
                             [size, size])
    torch.testing.assert_close(out["crop"], TF.normalize(cropped, pp["mean"], pp["std"]), atol=0.05, rtol=0)
    # a square image is the same under every mode
    sq = [ImageProcessor(build_open_clip(tiny_vision_cfg(image_resize=m))[1])(ASTRONAUT)[0]
          for m in ("crop", "squash", "letterbox")]
    assert torch.equal(sq[0], sq[1]) and torch.equal(sq[1], sq[2])


def test_bad_image_resize_is_named():
    from emma_mamba.config import config_from_dict

    with pytest.raises(ConfigError, match="image_resize") as e:
        config_from_dict({"preset": "tiny", "vision": {"image_resize": "pad"}})
    assert "letterbox" in str(e.value)  # the valid values are listed


_CLIP336 = {"size": 336, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def test_an_image_of_extreme_aspect_ratio_is_refused_not_resized_to_gigabytes():
    """Defect: a 1 x 10000 PNG (118 bytes) went through the 336-pixel 'shortest' resize as 336 x 3.36M pixels
    (+4.5 GB, 12 s) before the centre crop; far under PIL's bomb limit, nothing stopped it. Refused by name; an
    ordinary panorama (8:1) still goes through."""
    p = ImageProcessor(_CLIP336)
    with pytest.raises(ValueError, match=r"a 1x10000 image \(aspect ratio 10000:1\) would be resized to 336x3360000 "
                                         r"pixels before the encoder's 336-pixel centre crop"):
        p.one(Image.new("RGB", (1, 10000)))
    assert p.one(Image.new("RGB", (2400, 300))).shape == (3, 336, 336)
    assert ImageProcessor({**_CLIP336, "resize_mode": "squash"}).one(Image.new("RGB", (1, 10000))).shape == (3, 336,
                                                                                                          336)


def test_letterbox_of_a_huge_image_is_bounded_and_within_one_level_of_llavas():
    """Defect: letterbox padded a 1 x 20000 image to a 20000 x 20000 canvas (+1.5 GB). An image whose long side is
    over 4096 is shrunk to it first; oracle: LLaVA's pad-at-full-size then resize, within one 8-bit level."""
    from emma_mamba.models.vision import pad_to_square

    p = ImageProcessor({**_CLIP336, "pad_to_square": True})
    assert p.one(Image.new("RGB", (1, 20000), (10, 200, 30))).shape == (3, 336, 336)
    img = load_image(os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")).resize(
        (6000, 3000), Image.BICUBIC)
    got, llava = p.unnormalize(p.one(img)), p.unnormalize(p.transform(pad_to_square(img, p.fill)))
    assert (got - llava).abs().max().item() <= 1.01 / 255
    small = img.resize((600, 300), Image.BICUBIC)  # up to 4096 the two are the same
    assert torch.equal(p.one(small), p.transform(pad_to_square(small, p.fill)))


def test_building_an_encoder_leaves_the_root_loggers_handlers_alone():
    """open_clip's logging.info(...) calls basicConfig() on a root logger without handlers: the handler it left
    made a notebook's later logging.basicConfig(level=INFO, format=...) do nothing. Run in a fresh process (the
    test process's root logger is pytest's)."""
    import subprocess
    import sys

    code = ("import logging\n"
            "from emma_mamba.config import get_preset\n"
            "from emma_mamba.models.vision import build_open_clip\n"
            "build_open_clip(get_preset('tiny').vision)\n"
            "print(len(logging.getLogger().handlers))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stdout + out.stderr
