"""Mutation round 2: ``data.sources`` ``repeat`` fractions (emma_mamba.data.llava.repeat_indices).

The documented rule (its docstring, README "Several files"): a file's n usable samples appear ``int(repeat)``
times, then a fixed subset of ``round(frac(repeat) * n)`` distinct ones, in file order. The expected counts
below are that rule evaluated by hand, on fractions whose product with n is not a half (no rounding tie).
"""
import pytest

from emma_mamba.data.llava import repeat_indices


@pytest.mark.parametrize("n, repeat, whole, part", [
    (3, 0.9, 0, 3),     # 0.9 * 3 = 2.7 -> 3 (rounded, not truncated to 2)
    (10, 0.27, 0, 3),   # 2.7 -> 3
    (7, 1.8, 1, 6),     # 0.8 * 7 = 5.6 -> 6
    (9, 2.3, 2, 3),     # 0.3 * 9 = 2.7 -> 3
    (4, 0.4, 0, 2),     # 1.6 -> 2
    (10, 0.04, 0, 0),   # 0.4 -> 0: none taken
])
def test_repeat_takes_round_of_the_fraction_times_n(n, repeat, whole, part):
    got = repeat_indices(n, repeat, 0)
    assert len(got) == whole * n + part
    assert got[:whole * n] == list(range(n)) * whole       # every sample int(repeat) times, in file order
    sub = got[whole * n:]
    assert sub == sorted(set(sub)) and all(0 <= i < n for i in sub)  # distinct samples, in file order
