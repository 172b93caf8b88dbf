"""Mutation round 3: the bench commands' number arguments (``emma_mamba.bench.record``).

``non_negative_float`` takes a number >= 0 and refuses anything else, NaN included (NaN compares false with
everything, so "not below 0" would let it through).
"""

from __future__ import annotations

import argparse
import math

import pytest

from emma_mamba.bench.record import non_negative_float, non_negative_int


@pytest.mark.parametrize("text, want", [("0", 0.0), ("2.5", 2.5), ("1e-3", 0.001), ("inf", math.inf)])
def test_non_negative_float_accepts(text, want):
    assert non_negative_float(text) == want


@pytest.mark.parametrize("text", ["nan", "NaN", "-0.5", "-inf", "abc", ""])
def test_non_negative_float_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        non_negative_float(text)


def test_non_negative_int():
    assert non_negative_int("0") == 0 and non_negative_int("7") == 7
    for text in ("-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            non_negative_int(text)
