"""Mutation round 3: the latency bench's statistics against hand computations.

* ``find_crossover``: "faster" is strict (its rule: median step(ours) < transformer's); a tie is not a win.
* ``decode_latency``: the reported step time is the median of the timed steps (not the mean) and tokens/s is
  batch / that median; checked with a scripted clock, so no real time is measured.
"""

from __future__ import annotations

import statistics

import torch

from emma_mamba.bench.latency import decode_latency, find_crossover


def test_a_tie_is_not_a_win():
    # ours slower at 256, equal at 512: ours is faster at no measured context
    r = find_crossover([256, 512], [2.0, 1.0], [1.0, 1.0])
    assert r["ours_faster_from_context"] is None
    assert r["ours_faster_at_none"] is True and r["ours_faster_at_all_measured"] is False
    # equal everywhere: never faster
    r = find_crossover([256, 512, 1024], [1.0] * 3, [1.0] * 3)
    assert r["ours_faster_from_context"] is None and r["ours_faster_at_none"] is True
    # a tie at the smallest context, strictly faster from 512 on: the crossover is 512, not 256
    r = find_crossover([256, 512, 1024], [1.0, 1.0, 1.0], [1.0, 2.0, 4.0])
    assert r["ours_faster_from_context"] == 512 and r["ours_faster_at_all_measured"] is False


class _Runner:
    """A stand-in LM: argmax of its logits is always token 0; counts its steps."""

    name = "fake"

    def __init__(self, vocab):
        self.vocab, self.steps = vocab, 0

    def prefill(self, ids=None, embeds=None, max_len=None):
        return torch.zeros(ids.shape[0], self.vocab), {"n": ids.shape[1]}

    def step(self, cache, tok):
        self.steps += 1
        cache["n"] += 1
        return torch.zeros(tok.shape[0], self.vocab), cache

    @staticmethod
    def state_bytes(cache, context=None):
        return 123


class _ScriptedClock:
    """Runs the timed function and reports the next scripted duration (seconds)."""

    def __init__(self, durations):
        self.durations = list(durations)

    def time(self, fn):
        return fn(), self.durations.pop(0)


def test_decode_step_time_is_the_median_and_tokens_per_s_uses_it():
    durations = [0.010, 0.011, 0.200, 0.012, 0.900]  # two outliers: mean 0.2266, median 0.012
    runner = _Runner(vocab=7)
    rows = decode_latency([runner], _ScriptedClock(durations), batch=4, context=9, steps=5, warmup=2, vocab=7,
                          generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    row = rows["fake"]
    assert runner.steps == 2 + 5  # warm-up steps untimed, then the timed ones
    assert row["steps_s"] == durations
    assert row["median_s"] == 0.012 == statistics.median(durations)
    assert abs(row["tokens_per_s"] - 4 / 0.012) < 1e-9  # batch / median step: 333.3 tokens/s
    assert row["context"] == 9 and row["batch"] == 4 and row["state_bytes"] == 123
