"""`emma-mamba generate --checkpoint DIR --image FILE`: the streamed text is the model's greedy answer."""

import os

import pytest
import skimage

from emma_mamba import cli
from emma_mamba.config import get_preset
from emma_mamba.models.vlm import EmmaMamba, answer, load

IMAGE = os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm")
    EmmaMamba(get_preset("tiny")).save(d)
    return d


def test_streamed_answer_equals_direct_greedy_answer(ckpt, capsys):
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--image", IMAGE, "--prompt", "What is shown?",
                   "--max-new-tokens", "6"])
    assert rc == 0
    streamed = capsys.readouterr().out
    expected = answer(load(ckpt), IMAGE, "What is shown?", max_new_tokens=6)
    assert streamed == expected + "\n"


@pytest.mark.parametrize("argv,needle", [
    (["--image", "/no/such.png"], "--image /no/such.png: no such file"),
    ([], "--checkpoint needs --image"),
    (["--image", __file__], "cannot read image file"),
])
def test_bad_inputs_are_named(ckpt, capsys, argv, needle):
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi"] + argv)
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_image_with_text_only_lm_is_an_error(capsys):
    rc = cli.main(["generate", "--random-init", "tiny", "--image", IMAGE, "--prompt", "hi"])
    assert rc == 2 and "--image needs an EMMA-Mamba --checkpoint" in capsys.readouterr().err
