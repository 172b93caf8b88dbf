"""Mutation round 3: counts and settings a run reports, against hand computations.

* warmup from ``train.warmup_ratio``: rounded up (``ceil(ratio * total)``, the HF Trainer's rule), so a short run
  with a small ratio still warms up one step.
* a float setting written in exponent notation (``1e-3``) is a number; text that only starts like one
  (``1e-3x``) is refused by name as not a float, never a traceback.
* ``data lrv``: the per-file counts are the records written, the skipped ones counted apart.
* ``plot``: the default running-mean window is about 1/50 of the longest run's logged steps.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from emma_mamba.config import ConfigError, apply_overrides
from emma_mamba.training.optim import warmup_steps


def _sched_cfg(ratio):
    return type("C", (), {"warmup_steps": None, "warmup_ratio": ratio, "schedule": "cosine", "min_lr_ratio": 0.0})


@pytest.mark.parametrize("ratio, total, want", [(0.25, 10, 3), (0.01, 50, 1), (0.5, 10, 5), (0.0, 10, 0)])
def test_warmup_ratio_rounds_up(ratio, total, want):
    assert warmup_steps(_sched_cfg(ratio), total) == want


def test_warmup_ratio_rounded_up_in_the_schedule():
    import torch

    from emma_mamba.training.optim import build_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = build_scheduler(opt, _sched_cfg(0.25), 10)  # 2.5 -> 3 warmup steps: 1/3, 2/3, 1
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0])


@dataclasses.dataclass
class _C:
    x: float = 0.0


def test_exponent_text_is_a_float_and_other_text_is_refused_by_name():
    assert apply_overrides(_C(), {"x": "1e-3"}).x == 0.001
    assert apply_overrides(_C(), {"x": "2E+1"}).x == 20.0
    for text in ("1e-3x", "1e-3 lr", "3e2e1"):
        with pytest.raises(ConfigError, match=r"x: expected float"):
            apply_overrides(_C(), {"x": text}, source="run.yaml")


def test_lrv_counts_are_the_records_written(tmp_path):
    from emma_mamba.data.lrv import convert

    lrv = tmp_path / "lrv"
    (lrv / "lrv-vg").mkdir(parents=True)
    for i in (1, 2, 4):
        Image.new("RGB", (4, 4)).save(lrv / "lrv-vg" / f"{i}.jpg")
    recs = [{"image_id": i, "question": f"q{i}?", "answer": f"a{i}"} for i in (1, 2, 3)]  # 3.jpg missing
    (lrv / "filter_cap1.json").write_text(json.dumps(recs))
    (lrv / "filter_cap_more1.json").write_text(json.dumps([{"image_id": 4, "question": "q4?", "answer": "a4"}]))
    out, counts = convert(lrv, chart_file=None, skip_missing=True)
    assert len(out) == 3
    assert counts == {"filter_cap1.json": 2, "filter_cap_more1.json": 1, "missing_images_skipped": 1}


@pytest.mark.parametrize("n, want", [(500, 10), (120, 2), (30, 1)])
def test_plot_default_smoothing_is_a_fiftieth_of_the_longest_run(tmp_path, monkeypatch, n, want):
    pytest.importorskip("matplotlib")
    from emma_mamba.cli import main
    from emma_mamba.training import cli_plot

    windows = []
    real = cli_plot.running_mean
    monkeypatch.setattr(cli_plot, "running_mean", lambda v, w: windows.append(w) or real(v, w))
    runs = []
    for name, steps in (("long", n), ("short", 7)):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                 for s in range(1, steps + 1)))
        runs.append(str(d))
    assert main(["plot", *runs, "--keys", "loss", "--out", str(tmp_path / "c.png")]) == 0
    if want == 1:
        assert windows == []  # 30 // 50 = 0 -> 1: raw curves only
    else:
        assert windows and set(windows) == {want}


def test_epoch_rows_steps_and_fill_by_hand():
    from types import SimpleNamespace

    from emma_mamba.data.cli_check import _epoch

    cfg = SimpleNamespace(train=SimpleNamespace(seed=0, global_batch_size=2, micro_batch_size=1))
    # one sample a row: 5 rows, ceil(5 / 2) = 3 optimizer steps; micro-batches of one sample pad nothing
    r = _epoch(cfg, SimpleNamespace(packing=False, max_length=8), [3, 8, 5, 1, 2])
    assert (r["rows_per_epoch"], r["steps_per_epoch"], r["fill"], r["packing"]) == (5, 3, 1.0, False)
    # packed, but every sample fills a whole row: 5 rows, all positions used
    r = _epoch(cfg, SimpleNamespace(packing=True, max_length=8), [8] * 5)
    assert (r["rows_per_epoch"], r["steps_per_epoch"], r["fill"]) == (5, 3, 1.0)
    assert _epoch(cfg, SimpleNamespace(packing=True, max_length=8), [])["steps_per_epoch"] == 0


def test_plot_leaves_out_points_whose_x_is_not_finite():
    from emma_mamba.training.cli_plot import curve_points

    rows = [{"step": 1, "total_tokens": 100, "loss": 3.0}, {"step": 2, "total_tokens": float("nan"), "loss": 2.0},
            {"step": 3, "total_tokens": float("inf"), "loss": float("nan")}, {"step": 4, "total_tokens": 400, "loss": 1.0}]
    dropped = []
    pts = curve_points(rows, "loss", "total_tokens", lines=[1, 2, 3, 4], dropped=dropped)
    assert pts == [(100, 3.0), (400, 1.0)]
    assert [(line, field) for line, field, _ in dropped] == [(2, "total_tokens"), (3, "loss"), (3, "total_tokens")]
