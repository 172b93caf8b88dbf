"""benchmarks/serve_prefill_memory.py runs end to end (each request in its own process, short prompts) and writes
its JSON; the echoed prompt's summed log-probability is the model's (a full forward computes it here)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_serve_prefill_memory_smoke(tmp_path):
    from benchmarks import serve_prefill_memory
    from benchmarks._common import random_lm

    out = tmp_path / "r.json"
    assert serve_prefill_memory.main(["--seqlen", "80", "--echo-seqlen", "70", "--threads", "1",
                                      "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    prefill, echo = r["rows"]
    assert (prefill["seqlen"], echo["seqlen"]) == (80, 70)
    assert all(row["seconds"] > 0 and row["peak_above_start_mib"] >= 0 for row in r["rows"])
    lm, _ = random_lm("mamba-130m", 1)
    ids = torch.randint(0, lm.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = torch.log_softmax(lm(ids[None]).logits[0, :-1, :lm.config.vocab_size].double(), -1)
    assert echo["prompt_logprob_sum"] == pytest.approx(float(lp.gather(1, ids[1:, None]).sum()), rel=1e-5)
