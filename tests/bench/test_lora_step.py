"""benchmarks/lora_step.py runs end to end on tiny shapes and writes its JSON: LoRA trains far fewer parameters
than full fine-tuning, with gradients and AdamW state in proportion (counted by hand)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_lora_step_smoke(tmp_path):
    from benchmarks import lora_step

    out = tmp_path / "r.json"
    assert lora_step.main(["--d-model", "32", "--n-layer", "2", "--vocab", "64", "--seqlen", "16", "--rank", "4",
                           "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    d, di, n_layer = 32, 64, 2
    dt_rank, n = 2, 16  # ceil(32 / 16), the default d_state
    adapters = n_layer * 4 * ((d + 2 * di) + (di + dt_rank + 2 * n) + (di + d))
    assert r["rows"]["lora"]["trainable_params"] == adapters
    for k in ("full", "lora"):
        row = r["rows"][k]
        assert row["grad_mib"] * 2**20 == 4 * row["trainable_params"]  # fp32 gradients
        assert row["adamw_state_mib"] * 2**20 == 8 * row["trainable_params"]  # two fp32 moments
    assert r["rows"]["full"]["trainable_params"] > r["rows"]["lora"]["trainable_params"]
