"""`emma-mamba visualize` (emma_mamba.inference.visualize): the activation maps against the training forward
(forward hooks on the LM's blocks, the images placed by the training splice), layer indexing, the CLI's files."""

from __future__ import annotations

import json
import os

import pytest
import skimage
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.visualize import activation_maps, default_layers
from emma_mamba.models.vlm import EmmaMamba, build_chat_prompt

IMAGE = os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.instruction.enabled = True
    return EmmaMamba(cfg, for_training=False).eval()


def test_maps_equal_the_training_forwards_residual_stream(model):
    prompt = "Where is the cat?"
    n = model.lm.config.n_layer
    maps = activation_maps(model, IMAGE, prompt, layers=[0, 1, -1])
    assert sorted(maps) == [0, 1, n]
    # oracle: the training forward (its own splice of the image), the residual stream read by hooks on the blocks
    seen = {}
    hooks = [b.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i + 1, out))
             for i, b in enumerate(model.lm.layers)]
    hooks.append(model.lm.layers[0].register_forward_pre_hook(lambda mod, inp: seen.__setitem__(0, inp[0])))
    try:
        ids = torch.tensor([model.tokenizer.encode(build_chat_prompt(prompt, 1, model.config.image_token))])
        with torch.no_grad():
            out = model(ids, model.image_processor([IMAGE]), instruction_ids=model.tokenize_instructions([prompt]))
    finally:
        for h in hooks:
            h.remove()
    rows, starts = out.image_positions
    s, (gh, gw) = int(starts[0]), model.vision.grid
    for layer in (0, 1, n):
        want = seen[layer][0, s:s + gh * gw].float().norm(dim=-1).reshape(gh, gw)
        torch.testing.assert_close(maps[layer], want, rtol=1e-5, atol=1e-5)
    assert default_layers(64) == [0, 16, 32, 48, 64] and default_layers(2) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"layer 5 is outside 0..2"):
        activation_maps(model, IMAGE, prompt, layers=[5])
    with pytest.raises(ValueError, match=r"layers 2 and -1 both name depth 2"):  # one map was drawn for both
        activation_maps(model, IMAGE, prompt, layers=[0, 2, -1])


def test_cli_writes_the_figure_and_the_values(model, tmp_path, capsys):
    from emma_mamba.cli import main

    model.save(tmp_path / "ck")
    out = tmp_path / "figs" / "maps.png"
    assert main(["visualize", "--checkpoint", str(tmp_path / "ck"), "--image", IMAGE, "--layers", "0", "-1",
                 "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 1000
    doc = json.loads(out.with_suffix(".json").read_text())
    grid = doc["grid"]
    assert list(doc["maps"]) == ["0", str(model.lm.config.n_layer)] and len(doc["maps"]["0"]) == grid[0]
    want = activation_maps(model, IMAGE, "Describe the image in detail.", [0])[0]
    torch.testing.assert_close(torch.tensor(doc["maps"]["0"]), want, rtol=1e-5, atol=1e-6)
    assert main(["visualize", "--checkpoint", str(tmp_path / "ck"), "--image", str(tmp_path / "nope.png")]) == 2
    assert "cannot read the image" in capsys.readouterr().err


def test_the_figures_image_is_the_part_the_maps_cover(model, tmp_path, monkeypatch):
    """A wide photo under CLIP's resize and centre crop: the maps cover the central square, and the figure's first
    panel is that square as the encoder sees it (it was the whole file, a red square at its far left included, so
    a map cell sat beside another part of the picture)."""
    import numpy as np
    from PIL import Image

    import emma_mamba.inference.visualize as vis
    from emma_mamba.cli import main

    wide = np.full((100, 300, 3), 255, np.uint8)
    wide[30:70, 5:45] = (255, 0, 0)  # a red square at the far left: outside the centre crop
    wide[35:65, 135:165] = (0, 0, 255)  # a blue square in the centre
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    shown = {}
    real = vis.plot_maps
    monkeypatch.setattr(vis, "plot_maps", lambda image, *a, **k: (shown.setdefault("image", image), real(image, *a,
                                                                                                       **k))[1])
    model.save(tmp_path / "ck")
    assert main(["visualize", "--checkpoint", str(tmp_path / "ck"), "--image", str(path), "--layers", "0",
                 "--out", str(tmp_path / "maps.png")]) == 0
    img = shown["image"]
    H, W = model.vision.image_size
    assert isinstance(img, torch.Tensor) and tuple(img.shape) == (H, W, 3)
    want = model.image_processor.unnormalize(model.image_processor([str(path)]))[0].permute(1, 2, 0).clamp(0, 1)
    torch.testing.assert_close(img, want.float())
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)
    blue = (img[..., 2] > 0.8) & (img[..., 0] < 0.2)
    assert not red.any() and blue.any()


def test_cli_decodes_the_image_as_training_does(model, tmp_path):
    """A transparent PNG: the CLI's maps are the maps of the picture the training pipeline makes of that file
    (transparency on white, :func:`emma_mamba.models.vision.load_image`), not of its hidden colours."""
    import numpy as np
    from PIL import Image

    from emma_mamba.cli import main

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (30, 90, 200, 255)
    rgba[:, 32:] = (255, 0, 0, 0)  # transparent, red underneath
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    model.save(tmp_path / "ck")
    out = tmp_path / "maps.png"
    assert main(["visualize", "--checkpoint", str(tmp_path / "ck"), "--image", str(path), "--layers", "0",
                 "--out", str(out)]) == 0
    got = torch.tensor(json.loads(out.with_suffix(".json").read_text())["maps"]["0"])
    want = activation_maps(model, str(path), "Describe the image in detail.", [0])[0]  # path: the training loader
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    dropped = activation_maps(model, Image.open(path).convert("RGB"), "Describe the image in detail.", [0])[0]
    assert not torch.allclose(dropped, want, rtol=1e-3, atol=1e-3)  # the test can tell the two decodings apart


def test_reconstruction_puts_the_heads_patches_back_in_place(tmp_path, capsys):
    """With the head's output replaced by the true next patches (normalised as its targets), the reconstruction is
    the image the encoder sees, patch 0 grey: the shift, the de-normalisation and the patch layout are right. The
    CLI draws it for a checkpoint with the head's weights and refuses one without."""
    from emma_mamba.cli import main
    from emma_mamba.inference.visualize import reconstruction
    from emma_mamba.models.align_head import normalize_patches, patchify

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    assert cfg.align.enabled and cfg.align.norm_pix
    m = EmmaMamba(cfg, for_training=True).eval()
    head = m.align_head
    seen = m.image_processor.unnormalize(m.image_processor([IMAGE])).float().clamp(0, 1)
    target = normalize_patches(patchify(seen, head.patch_size, head.grid))[0]
    real_predict = head.predict
    head.predict = lambda hidden: torch.cat([target[1:], target[:1]])[None]  # token i -> true patch i + 1
    try:
        rec, img = reconstruction(m, IMAGE)
    finally:
        head.predict = real_predict
    (gh, gw), (ph, pw) = head.grid, head.patch_size
    assert rec.shape == img.shape == (gh * ph, gw * pw, 3)
    torch.testing.assert_close(img, seen[0, :, :gh * ph, :gw * pw].permute(1, 2, 0))
    torch.testing.assert_close(rec[ph:], img[ph:], atol=2e-3, rtol=0)  # rows below the first patch row
    torch.testing.assert_close(rec[:ph, pw:], img[:ph, pw:], atol=2e-3, rtol=0)
    assert torch.all(rec[:ph, :pw] == 0.5)  # patch 0 is never predicted
    m.save(tmp_path / "train_ck")
    out = tmp_path / "r.png"
    assert main(["visualize", "--checkpoint", str(tmp_path / "train_ck"), "--image", IMAGE, "--reconstruction",
                 "--out", str(out)]) == 0 and out.is_file()
    EmmaMamba(cfg, for_training=False).save(tmp_path / "infer_ck")
    assert main(["visualize", "--checkpoint", str(tmp_path / "infer_ck"), "--image", IMAGE, "--reconstruction",
                 "--out", str(out)]) == 2
    assert "holds no alignment-head weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="this model has no alignment head"):
        reconstruction(EmmaMamba(cfg, for_training=False), IMAGE)


def test_cli_out_names_the_files_it_writes_and_refuses_a_format_it_cannot_write(model, tmp_path, capsys):
    """--out without a suffix: the figure is a PNG and the printed path is the file written (matplotlib adds
    .png); --out maps.json (the values' own name) or another format matplotlib cannot write: exit 2 naming --out,
    no traceback, nothing written."""
    from emma_mamba.cli import main

    model.save(tmp_path / "ck")
    args = ["visualize", "--checkpoint", str(tmp_path / "ck"), "--image", IMAGE, "--layers", "0"]
    assert main(args + ["--out", str(tmp_path / "a" / "maps")]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == f"wrote {tmp_path / 'a' / 'maps.png'} and {tmp_path / 'a' / 'maps.json'}", printed
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["maps.json", "maps.png"]
    for bad in ("maps.json", "maps.docx"):
        assert main(args + ["--out", str(tmp_path / "b" / bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"emma-mamba visualize: --out {tmp_path / 'b' / bad}:") and "Traceback" not in err
    assert not (tmp_path / "b").exists()
