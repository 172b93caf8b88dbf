"""benchmarks/serve_concurrency.py runs end to end (a tiny random LM, 3 clients) and writes its JSON: the batched
server answered every request as the one-at-a-time server did (the script checks), and batched them."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_serve_concurrency_smoke(tmp_path, monkeypatch):
    from benchmarks import serve_concurrency
    from emma_mamba.models import mamba

    monkeypatch.setattr(mamba.MambaConfig, "from_preset",  # random_lm builds it: tiny shapes for the test
                        classmethod(lambda cls, name: cls(d_model=32, n_layer=2, vocab_size=50280, d_state=4)))
    out = tmp_path / "r.json"
    assert serve_concurrency.main(["--clients", "3", "--requests", "2", "--new-tokens", "4", "--runs", "1",
                                   "--max-batch", "3", "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    run = r["runs"][0]
    assert run["one_at_a_time"]["completion_tokens"] == run["batched"]["completion_tokens"] == 3 * 2 * 4
    assert run["one_at_a_time"]["max_batch_rows"] == 1 and run["batched"]["max_batch_rows"] >= 1
    assert r["median_throughput_ratio"] == run["throughput_ratio"] > 0
