"""Mutation round 2: image preparation details that a near-miss would get past a loose tolerance.

Oracles: LLaVA-1.5's ``image_aspect_ratio: pad`` fills the square with ``int(x * 255)`` of each channel of the
image processor's mean (truncation, not rounding); for CLIP's mean (0.48145466, 0.4578275, 0.40821073) that is
122.77 -> 122, 116.75 -> 116, 104.09 -> 104, worked out by hand. ``load_image`` (its docstring) reads an integer
array as 8-bit when its maximum is at most 255 (255 included), else as 16-bit.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from emma_mamba.config import get_preset
from emma_mamba.models.vision import ImageProcessor, build_open_clip, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
LLAVA_PAD = (122, 116, 104)  # int(255 * m) of CLIP_MEAN, by hand


def _letterbox_processor() -> ImageProcessor:
    cfg = get_preset("tiny").vision
    cfg.image_resize = "letterbox"
    _, pp = build_open_clip(cfg)
    assert tuple(pp["mean"]) == CLIP_MEAN  # the tiny preset is a CLIP tower: the oracle's mean
    return ImageProcessor(pp)


def test_letterbox_fill_is_llavas_truncated_mean_colour():
    proc = _letterbox_processor()
    size = proc.cfg["size"][0] if isinstance(proc.cfg["size"], (tuple, list)) else proc.cfg["size"]
    # a wide black image: the top and bottom quarters of the square are padding only
    img = Image.new("RGB", (4 * size, 2 * size), (0, 0, 0))
    px = proc.unnormalize(proc(img))[0] * 255  # back to 0-255 values
    band = px[:, : size // 4 - 2]  # rows well inside the top padding band, clear of the resize's reach
    want = torch.tensor(LLAVA_PAD, dtype=torch.float32).view(3, 1, 1).expand_as(band)
    torch.testing.assert_close(band, want, atol=0.3, rtol=0)  # one 8-bit level apart would be 1.0 off
    bottom = px[:, -(size // 4 - 2):]
    torch.testing.assert_close(bottom, want.expand_as(bottom), atol=0.3, rtol=0)
    assert float(px[:, size // 2].abs().max()) < 0.3  # the image itself (black) is in the middle


def test_integer_array_with_maximum_255_is_read_as_8_bit():
    rng = np.random.default_rng(3)
    a8 = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    a8[0, 0, 0] = 255  # the boundary: still 8-bit
    a8[1, 1, 1] = 0
    for dtype in (np.uint16, np.int32, np.int64):
        got = np.asarray(load_image(a8.astype(dtype)))
        assert np.array_equal(got, a8), dtype
    # one step beyond 255 makes it 16-bit: 256 -> round(256 * 255 / 65535) = 1, 65535 -> 255
    a16 = np.array([[0, 256, 65535]], dtype=np.uint16)
    assert np.asarray(load_image(a16))[0, :, 0].tolist() == [0, 1, 255]


def test_a_float_array_overshooting_1_a_little_is_still_0_to_1():
    """A float image in 0-1 with one resampled pixel at 1.004 (skimage / torchvision resizes overshoot): read as
    0-1, that pixel clipped to 255, the rest as round(255 x); it was read as 0-255 (a black image). Above 1.5: 0-255."""
    rng = np.random.default_rng(5)
    f = rng.random((4, 6, 3))
    want = np.clip(np.round(f * 255), 0, 255).astype(np.uint8)
    f[0, 0, 0] = 1.004
    want[0, 0, 0] = 255
    assert np.array_equal(np.asarray(load_image(f)), want)
    g = np.array([[[0.0, 1.6, 200.4]]])  # a 0-255 float image (max 200.4)
    assert np.asarray(load_image(g))[0, 0].tolist() == [0, 2, 200]
