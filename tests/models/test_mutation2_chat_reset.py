"""Mutation round 2: ``ChatSession.reset`` (its docstring: "start the next one about ``image`` (None: keep the
current image)"). After ``reset()`` the next first turn must again hold the session's image: the oracle is a
fresh session on the same image, whose first turn prefills the image's visual tokens too."""
from __future__ import annotations

import os

import pytest
import skimage
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.chat import ChatSession
from emma_mamba.inference.generate import GenerationConfig
from emma_mamba.models.vlm import EmmaMamba

DATA = os.path.dirname(skimage.data.__file__)
CAT = os.path.join(DATA, "chelsea.png")
ASTRONAUT = os.path.join(DATA, "astronaut.png")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


@torch.no_grad()
def test_reset_without_an_image_keeps_the_current_image(model):
    cfg = GenerationConfig(max_new_tokens=3)
    session = ChatSession(model, CAT, config=cfg)
    session.ask("What animal is this?")
    session.ask("And its colour?")
    session.reset()
    assert session.image == CAT
    again = session.ask("What animal is this?")
    fresh = ChatSession(model, CAT, config=cfg)
    want = fresh.ask("What animal is this?")
    # the image's visual tokens are in the prefill (each counts one position), as in the fresh session
    text_only = len(model.tokenizer.encode(model.build_prompt("What animal is this?", 0)))
    assert fresh.stats[0].prompt_tokens >= text_only + model.vision.num_tokens - 1
    assert session.stats[0].prompt_tokens == fresh.stats[0].prompt_tokens
    assert again == want and session.context_tokens == fresh.context_tokens
    # reset(image=...) switches to the new image: as a fresh session on it
    session.reset(image=ASTRONAUT)
    other = session.ask("What animal is this?")
    assert other == ChatSession(model, ASTRONAUT, config=cfg).ask("What animal is this?")
