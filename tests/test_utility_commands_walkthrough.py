"""A user's walkthrough of `emma-mamba info`, `plot` and `visualize`: the numbers against independent counts
and the files' own values, and the errors a mistyped path or option gets."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from emma_mamba.cli import main


# ------------------------------------------------------------------------------------------------- info

def _oracle_trained(recipe_path) -> int:
    """What the trainer trains for a recipe: set_stage with its train.trainable, LoRA applied as the trainer
    applies it, the parameters with requires_grad counted once each."""
    from emma_mamba.models.lora import apply_lora
    from emma_mamba.models.vlm import EmmaMamba
    from emma_mamba.training.config import load_run_config

    rc = load_run_config(recipe_path)
    m = EmmaMamba(rc.model, for_training=True, device=torch.device("meta"))
    m.set_stage(rc.stage, rc.train.trainable)
    lo = rc.train.lora
    if lo.r:
        apply_lora(m.lm, lo.r, 2.0 * lo.r, lo.targets)
        if lo.train_embeddings:
            m.lm.embeddings.requires_grad_(True)
            if m.lm.lm_head is not None:
                m.lm.lm_head.requires_grad_(True)
    return sum(p.numel() for p in {id(p): p for p in m.parameters() if p.requires_grad}.values())


@pytest.mark.parametrize("text", [
    # no stage: key (pretrain, RunConfig's default) was read as a model config: "unknown config key 'data'"
    "model: tiny\ndata: {json: d.json}\ntrain: {trainable: [mff, projector, lm]}\n",
    # train.trainable and train.lora used to be ignored: the report showed the stage's default modules only
    "stage: finetune\nmodel: tiny\ndata: {json: d.json}\ntrain: {lora: {r: 4}}\n",
    "stage: finetune\nmodel: tiny\ndata: {json: d.json}\n"
    "train: {trainable: [mff, projector, lm], lora: {r: 4, targets: [in_proj], train_embeddings: true}}\n",
])
def test_info_reports_what_a_recipe_trains(tmp_path, capsys, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["info", "--config", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["recipe"]["trained"] == _oracle_trained(path)
    # and the module rows against the built model's own top-level modules
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    m = EmmaMamba(get_preset("tiny"), for_training=True, device=torch.device("meta"))
    for name, mod in m.named_children():
        n = sum(p.numel() for p in {id(p): p for p in mod.parameters()}.values())
        got = sum(r["total"] for k, r in rep["modules"].items() if k.split(".")[0] == name)
        assert got == n, name
    assert rep["total"]["total"] == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def test_info_names_a_quickstart_config(capsys):
    assert main(["info", "--config", "quickstart_fast"]) == 2
    assert "a quickstart config" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- plot

def _capture(monkeypatch):
    import matplotlib.figure

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    return figs


def test_plot_leaves_non_finite_values_out_of_the_curves_and_names_their_lines(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    d = tmp_path / "r"
    d.mkdir()
    rows = []
    for s in range(1, 21):
        rows.append({"step": s, "loss": 1.0 + s, "grad_norm": 2.0})
        if s == 5:
            rows[-1]["loss"] = float("nan")
        if s == 8:
            rows[-1]["grad_norm"] = float("inf")
        if s == 10:
            rows.append({"step": s, "val_loss": 0.5})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN / Infinity, as json writes
    figs = _capture(monkeypatch)
    assert main(["plot", str(d), "--smooth", "3"]) == 0
    err = capsys.readouterr().err
    path = d / "metrics.jsonl"
    assert f"{path}: 2 non-finite value(s) left out of the curves (line 5: loss nan, line 8: grad_norm inf)" in err
    panels = {ax.get_title().split(" ")[0]: ax for ax in figs[0].axes}
    # oracle: the file's finite values and their running mean over 3, computed here
    want = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    ys = [y for _, y in want]
    mean = [sum(ys[max(0, i - 2):i + 1]) / len(ys[max(0, i - 2):i + 1]) for i in range(len(ys))]
    raw, smooth, val = panels["loss"].get_lines()
    assert list(raw.get_xdata()) == [x for x, _ in want] and list(raw.get_ydata()) == ys
    assert list(smooth.get_ydata()) == pytest.approx(mean)  # was NaN from step 5 on
    assert list(val.get_ydata()) == [0.5]
    assert panels["loss"].get_yscale() == "log"  # all finite values > 0 (a NaN used to turn it off)
    _, gsmooth = panels["grad_norm"].get_lines()
    assert all(math.isfinite(v) for v in gsmooth.get_ydata()) and len(gsmooth.get_ydata()) == 19


def test_plot_out_problems_are_named_without_a_traceback(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    assert main(["plot", str(d), "--out", str(tmp_path / "afile" / "c.png")]) == 2  # was FileExistsError
    assert f"{tmp_path / 'afile'} is a file" in capsys.readouterr().err
    assert main(["plot", str(d), "--out", str(tmp_path / "adir.png")]) == 2  # was IsADirectoryError
    assert "is a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- visualize

def test_visualize_out_problems_are_named_before_the_model_runs(tmp_path, capsys, monkeypatch):
    import skimage

    from emma_mamba.inference import visualize

    image = os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png")
    calls = []
    monkeypatch.setattr(visualize, "activation_maps", lambda *a, **k: calls.append(a))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "m.json").mkdir()
    ck = str(tmp_path / "no_checkpoint_needed")
    for out, msg in ((tmp_path / "afile" / "m.png", f"{tmp_path / 'afile'} is a file"),
                     (tmp_path / "adir.png", "is a directory"),
                     (tmp_path / "v" / "m.png", f"the values' file {tmp_path / 'v' / 'm.json'} is a directory")):
        assert main(["visualize", "--checkpoint", ck, "--image", image, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert not calls
