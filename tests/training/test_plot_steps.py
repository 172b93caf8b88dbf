"""`emma-mamba plot` counts training steps only and names steps a metrics file logs more than once."""

import json

import pytest

from emma_mamba.cli import main

pytest.importorskip("matplotlib")


def _write(d, rows):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _train(s, lr=1e-3):
    return {"step": s, "loss": 3.0 / s, "lr": lr, "total_tokens": 100 * s}


def _val(s):
    return {"step": s, "total_tokens": 100 * s, "val_loss": 2.0 / s, "val_token_acc": 0.1}


def test_validation_records_are_not_counted_as_logged_steps(tmp_path, capsys):
    d = _write(tmp_path / "r", [_train(s) for s in range(1, 21)] + [_val(10), _val(20)])
    assert main(["plot", str(d), "--smooth", "1"]) == 0
    out, err = capsys.readouterr()
    # was: "22 logged steps" (the 2 validation records counted as steps)
    assert "; 20 logged steps and 2 validation records from 1 run(s))" in out, out
    assert "warning" not in err


def test_steps_logged_twice_are_named_in_a_warning(tmp_path, capsys):
    # two runs writing one output_dir at once: every step twice, lr alternating (the zigzag the plot would draw)
    rows = [r for s in range(1, 6) for r in (_train(s), _train(s, lr=1e-4))] + [_train(6)] + [_val(5), _val(5)]
    d = _write(tmp_path / "r", rows)
    assert main(["plot", str(d), "--smooth", "1"]) == 0
    out, err = capsys.readouterr()
    assert (f"warning: {d / 'metrics.jsonl'}: training step(s) 1-5 logged more than once; validation step(s) 5 "
            f"logged more than once (two runs wrote into this output_dir?") in err, err
    assert "; 11 logged steps and 2 validation records" in out
