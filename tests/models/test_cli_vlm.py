"""`emma-mamba generate --checkpoint DIR --image FILE`: the streamed text is the model's greedy answer; a bad
image or prompt is a clear error, not a traceback."""

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
    captured = capsys.readouterr()
    res = answer(load(ckpt), IMAGE, "What is shown?", max_new_tokens=6, return_result=True)
    assert captured.out == res.texts[0] + "\n"
    # the count is of the tokens generated (a random model's 6 tokens may re-encode to more or fewer)
    assert f"[{len(res.sequences[0])} answer tokens ({res.finish_reasons[0]})" in captured.err
    assert len(res.sequences[0]) <= 6


@pytest.mark.parametrize("argv,needle", [
    (["--image", "/no/such.png"], "--image /no/such.png: no such file"),
    (["--image", "/tmp"], "--image /tmp: is a directory, not an image file"),
    ([], "--checkpoint needs --image"),
    (["--image", __file__], "cannot read image file"),
])
def test_bad_inputs_are_named(ckpt, capsys, argv, needle):
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi"] + argv)
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_a_checkpoint_file_is_named_with_its_folder(ckpt, capsys):
    """--checkpoint DIR/model.safetensors said "no such directory" of a path that exists."""
    rc = cli.main(["generate", "--checkpoint", str(ckpt / "model.safetensors"), "--image", IMAGE, "--prompt", "hi"])
    assert rc == 2
    assert f"model.safetensors is a file; give its directory: {ckpt}" in capsys.readouterr().err


def test_image_with_text_only_lm_is_an_error(capsys):
    rc = cli.main(["generate", "--random-init", "tiny", "--image", IMAGE, "--prompt", "hi"])
    assert rc == 2 and "--image needs an EMMA-Mamba --checkpoint" in capsys.readouterr().err


def test_a_decompression_bomb_image_is_a_named_error(ckpt, tmp_path, capsys):
    # 20000 x 10000 1-bit pixels in a ~24 KB PNG: more than twice PIL's default MAX_IMAGE_PIXELS
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--image", str(bomb), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "emma-mamba generate: error:" in err and str(bomb) in err, err
    assert "decompression-bomb limit" in err and "MAX_IMAGE_PIXELS" in err


@pytest.mark.parametrize("stdin", [False, True])
def test_a_prompt_holding_the_image_placeholder_is_refused(ckpt, capsys, monkeypatch, stdin):
    # "<image>" is the placeholder token (training data's text uses it that way): typed by the user it would be
    # a second image slot for one image, reported as a placeholder count the user did not write
    import io

    prompt = "<image> what shape"
    if stdin:
        monkeypatch.setattr("sys.stdin", io.StringIO(prompt))
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--image", IMAGE, "--prompt", "-" if stdin else prompt])
    err = capsys.readouterr().err
    where = "the prompt (stdin)" if stdin else "--prompt"
    assert rc == 2 and f"{where} holds '<image>'" in err and "reserved" in err, err
    assert "placeholder(s)" not in err


def test_the_placeholder_text_is_plain_text_to_a_text_only_lm(capsys):
    # a text-only LM's tokenizer has no placeholder token: the same words are an ordinary prompt there
    rc = cli.main(["generate", "--random-init", "tiny", "--prompt", "<image> what shape", "--max-new-tokens", "2",
                   "--seed", "0"])
    assert rc == 0 and capsys.readouterr().out.startswith("<image> what shape")


def test_the_wrong_kind_of_directory_names_the_right_flag(ckpt, tmp_path, capsys):
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    lm_dir = tmp_path / "lm"
    MambaLM(MambaConfig.from_preset("tiny")).save_pretrained(lm_dir, layout="hf")
    assert cli.main(["generate", "--checkpoint", str(lm_dir), "--image", IMAGE, "--prompt", "hi"]) == 2
    assert f"use --lm {lm_dir} for text continuation" in capsys.readouterr().err
    assert cli.main(["generate", "--lm", str(ckpt), "--prompt", "hi"]) == 2
    assert f"use --checkpoint {ckpt} (and --image)" in capsys.readouterr().err
