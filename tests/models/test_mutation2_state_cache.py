"""Mutation round 2: ``serve``'s prefix-state cache (ChatService ``state_cache``) must only be reused for the
very same history: the module doc keys a stored state by the history's token ids and its images' pixels. Two
images of the same size and mode that differ in their pixels (a photograph and its mirror image) are different
histories: the follow-up must miss and answer exactly as a service without any state cache (the oracle: the
whole conversation prefilled from scratch).
"""
from __future__ import annotations

import base64
import io
import os

import pytest
import skimage
import torch
from PIL import Image, ImageOps

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig
from emma_mamba.inference.server import ChatService
from emma_mamba.models.vlm import EmmaMamba

CAT = os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png")


def _url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


def _user(text, url=None):
    parts = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _kept(svc, messages):
    """The first seeded answer the service stored a state for (its text tokenises back to its tokens)."""
    for seed in range(40):
        before = list(svc.states)
        out = svc.complete({"messages": messages, "temperature": 1.0, "seed": seed, "max_tokens": 4})
        if list(svc.states) != before:
            return out["choices"][0]["message"]["content"]
    raise AssertionError("no seed gave an answer the state cache keeps")


def test_a_history_with_another_image_of_the_same_size_misses(model):
    photo = Image.open(CAT).convert("RGB")
    mirrored = ImageOps.mirror(photo)
    assert mirrored.size == photo.size and mirrored.mode == photo.mode and mirrored.tobytes() != photo.tobytes()
    cached = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), state_cache=4)
    plain = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), state_cache=0)
    a1 = _kept(cached, [_user("What animal is this?", _url(photo))])
    same = [_user("What animal is this?", _url(photo)), {"role": "assistant", "content": a1}, _user("And now?")]
    other = [_user("What animal is this?", _url(mirrored)), {"role": "assistant", "content": a1}, _user("And now?")]
    body = {"temperature": 1.0, "seed": 7, "max_tokens": 4}
    # the other picture first (a wrong hit would also not disturb the check of the right one after it)
    got = cached.complete({"messages": other, **body})
    assert got["emma_mamba"]["state_cache"] == "miss"
    assert got["choices"] == plain.complete({"messages": other, **body})["choices"]
    # the same picture: a hit, the same answer as prefilling everything
    hit = cached.complete({"messages": same, **body})
    assert hit["emma_mamba"]["state_cache"] == "hit"
    assert hit["choices"] == plain.complete({"messages": same, **body})["choices"]


def test_the_second_turns_image_is_part_of_the_key(model):
    """A state stored after a two-image conversation continues that conversation only: the third turn of a
    history whose second image differs (same size) misses; of the same history, it hits."""
    photo = Image.open(CAT).convert("RGB")
    second, other_second = ImageOps.flip(photo), ImageOps.mirror(photo)
    cached = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), state_cache=8)
    plain = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), state_cache=0)
    t1 = [_user("What animal is this?", _url(photo))]
    a1 = _kept(cached, t1)
    t2 = t1 + [{"role": "assistant", "content": a1}, _user("And this one?", _url(second))]
    a2 = _kept(cached, t2)
    body = {"temperature": 1.0, "seed": 11, "max_tokens": 3}
    t3 = t2 + [{"role": "assistant", "content": a2}, _user("Compare them.")]
    t3_other = [*t1, {"role": "assistant", "content": a1}, _user("And this one?", _url(other_second)),
                {"role": "assistant", "content": a2}, _user("Compare them.")]
    got = cached.complete({"messages": t3_other, **body})
    assert got["emma_mamba"]["state_cache"] == "miss"
    assert got["choices"] == plain.complete({"messages": t3_other, **body})["choices"]
    hit = cached.complete({"messages": t3, **body})
    assert hit["emma_mamba"]["state_cache"] == "hit"
    assert hit["choices"] == plain.complete({"messages": t3, **body})["choices"]
