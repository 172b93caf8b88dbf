"""Mutation round 3: ``bench kernels``' ratio columns and its exp-floor measurement, by hand.

* ``fwd_vs_exp_floor`` is ours / the floor (how many floors our forward costs); the mambapy speedups are over
  the *best* (fastest) mambapy scan timed, forward and forward+backward apart; the reference speedups are
  reference / ours.
* The exp floor times ``torch.exp`` over b·d·l·n elements (the discretisation ``exp(delta * A)``'s size, the
  module docstring), into a preallocated output.
"""

from __future__ import annotations

import pytest
import torch

from emma_mamba.bench import kernels


def test_ratios_by_hand():
    row = {"fwd_s": {"ours": 2.0, "mambapy_pscan": 6.0, "mambapy_seq": 10.0, "ref": 20.0},
           "fwd_bwd_s": {"ours": 4.0, "mambapy_pscan": 8.0, "ref": 40.0},  # mambapy_seq's backward not timed
           "exp_floor_s": 0.5}
    r = kernels._ratios(row)
    assert r == pytest.approx({"fwd_vs_exp_floor": 4.0,              # 2 / 0.5
                               "fwd_speedup_vs_best_mambapy": 3.0,   # min(6, 10) / 2
                               "fwd_bwd_speedup_vs_best_mambapy": 2.0,  # 8 / 4
                               "fwd_speedup_vs_ref": 10.0, "fwd_bwd_speedup_vs_ref": 10.0})
    assert set(r) == {"fwd_vs_exp_floor", "fwd_speedup_vs_best_mambapy", "fwd_bwd_speedup_vs_best_mambapy",
                      "fwd_speedup_vs_ref", "fwd_bwd_speedup_vs_ref"}
    # the fastest mambapy may be the sequential one
    row["fwd_s"]["mambapy_seq"] = 1.0
    assert kernels._ratios(row)["fwd_speedup_vs_best_mambapy"] == pytest.approx(0.5)


def test_exp_floor_covers_b_d_l_n_elements(monkeypatch):
    seen = []
    real_exp = torch.exp

    def spy(x, *a, **kw):
        seen.append((tuple(x.shape), "out" in kw))
        return real_exp(x, *a, **kw)

    monkeypatch.setattr(kernels, "_time", lambda fn, repeats, max_seconds: (fn(), {"median": 1.0, "runs": [1.0],
                                                                                     "cut": False})[1])
    monkeypatch.setattr(torch, "exp", spy)
    b, d, n, l = 2, 3, 5, 7
    res = kernels.time_exp_floor(b, d, n, l, repeats=1, max_seconds=1.0)
    assert res["median"] == 1.0
    assert len(seen) == 1
    shape, into_out = seen[0]
    assert int(torch.Size(shape).numel()) == b * d * l * n == 210 and into_out
