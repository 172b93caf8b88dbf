"""`emma-mamba plot`: curves of runs' metrics.jsonl as one PNG; panels chosen from what was logged."""

import json

import pytest

from emma_mamba.cli import main
from emma_mamba.training.cli_plot import read_metrics, running_mean

pytest.importorskip("matplotlib")


def _run(d, n, align=False, torn=False):
    d.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 3.0 / s, "lm_loss": 3.0 / s, "align_loss": 0.1 if align else 0.0,
                         "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0, "total_tokens": 100 * s})
             for s in range(1, n + 1)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + ("\n{\"step\": 9" if torn else "\n"))
    return d


def test_running_mean_by_hand():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], 1) == [2.0, 4.0]


def test_plot_two_runs(tmp_path, capsys):
    from PIL import Image

    a, b = _run(tmp_path / "x" / "stage1", 40, torn=True), _run(tmp_path / "y" / "stage1", 25)
    assert len(read_metrics(a / "metrics.jsonl")) == 40  # the torn last line of a killed run is skipped
    out = tmp_path / "c.png"
    assert main(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(out), "--smooth", "5"]) == 0
    cap = capsys.readouterr()
    msg = cap.out
    # the skipped line is said, with its file and line number (41: after the 40 records)
    assert f"{a / 'metrics.jsonl'}: 1 line(s) left out: line 41: the last line, not complete JSON" in cap.err
    assert str(b / "metrics.jsonl") not in cap.err
    # align_loss is zero throughout: left out of the default panels
    assert "(loss, lm_loss, lr, grad_norm, tokens_per_s; 65 logged steps from 2 run(s))" in msg
    with Image.open(out) as im:
        assert im.size[0] > 500 and im.size[1] > 300
    assert main(["plot", str(a), "--keys", "align_loss", "--x", "total_tokens"]) == 0
    assert (a / "curves.png").is_file()


def test_lines_that_are_not_records_are_named(tmp_path, capsys):
    d = _run(tmp_path / "r", 3)
    with open(d / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n" + json.dumps({"step": 4, "loss": 0.5}) + "\n7\n")
    assert main(["plot", str(d), "--keys", "loss", "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert "2 line(s) left out: line 4: a JSON list, not an object; line 6: a JSON int, not an object" in err


def test_plot_errors(tmp_path, capsys):
    a = _run(tmp_path / "r", 3)
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "no such run directory or metrics file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(a), "--keys", "accuracy"]) == 2
    err = capsys.readouterr().err
    assert "--keys ['accuracy'] were not logged; the runs have: align_loss, grad_norm, lm_loss, loss, lr" in err


def test_validation_records_are_drawn_over_their_training_metric(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    d = _run(tmp_path / "r", 30)
    val = [{"step": s, "epoch": s / 10, "total_tokens": 100 * s, "val_loss": 2.0 / s, "val_lm_loss": 1.5 / s,
            "val_align_loss": 0.0, "val_token_acc": s / 40} for s in (10, 20, 30)]
    with (d / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(v) + "\n" for v in val))
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    assert main(["plot", str(d), "--smooth", "4"]) == 0
    assert "(loss, lm_loss, lr, grad_norm, tokens_per_s, val_token_acc;" in capsys.readouterr().out
    panels = {ax.get_title(): ax for ax in figs[0].axes}
    for key, vkey in (("loss", "val_loss"), ("lm_loss", "val_lm_loss")):
        ax = panels[f"{key} (- - val)"]
        (line,) = [ln for ln in ax.get_lines() if ln.get_label().endswith("(val)")]
        assert list(line.get_xdata()) == [10, 20, 30] and list(line.get_ydata()) == [v[vkey] for v in val]
        # the training curve (raw, faint) has the 30 training points only
        assert max(len(ln.get_xdata()) for ln in ax.get_lines()) == 30
    (acc,) = panels["val_token_acc"].get_lines()  # few points: drawn raw, not smoothed
    assert list(acc.get_ydata()) == [v["val_token_acc"] for v in val]


def test_profiled_steps_are_left_out_of_the_timing_curves_only(tmp_path, monkeypatch):
    import matplotlib.figure

    d = tmp_path / "r"
    d.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "tokens_per_s": 50.0 if s in (4, 5) else 1000.0, "total_tokens": s}
            for s in range(1, 9)]
    for r in rows[3:5]:
        r["profiled"] = True
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    assert main(["plot", str(d), "--smooth", "1"]) == 0
    panels = {ax.get_title(): ax for ax in figs[0].axes}
    assert "profiled" not in panels
    (tps,) = panels["tokens_per_s"].get_lines()
    assert list(tps.get_xdata()) == [1, 2, 3, 6, 7, 8] and set(tps.get_ydata()) == {1000.0}
    (loss,) = panels["loss"].get_lines()
    assert list(loss.get_xdata()) == list(range(1, 9))


def test_an_x_axis_a_run_did_not_log_is_named(tmp_path, capsys):
    # a CLIP stage-0 run logs step only: --x epoch used to write a PNG with every panel empty (exit 0)
    d = tmp_path / "clip"
    d.mkdir()
    (d / "clip_metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3}) + "\n"
                                                  for s in (1, 2, 3)))
    assert main(["plot", str(d), "--x", "epoch"]) == 2
    assert "--x epoch: not logged in" in capsys.readouterr().err and not (d / "curves.png").exists()
    a = _run(tmp_path / "r", 3)  # beside a run that has it: its lines would be missing without a word
    assert main(["plot", str(a), str(d), "--x", "total_tokens", "--out", str(tmp_path / "o.png")]) == 2
    assert "clip_metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(a), str(d), "--out", str(tmp_path / "o.png")]) == 0
