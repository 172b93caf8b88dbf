"""benchmarks/checkpoint_format.py runs end to end (2 FSDP processes under torchrun, a small LM): every layout
restores every parameter shard and AdamW moment bit for bit into a fresh model, the sharded ones write a shard file
per rank and gather nothing (no model.safetensors); a background write returns before it is complete."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_checkpoint_format_smoke(tmp_path):
    from benchmarks import checkpoint_format

    out = tmp_path / "r.json"
    # (the synchronous sharded write is the async one's without the background thread: tested elsewhere)
    assert checkpoint_format.main(["--d-model", "64", "--n-layer", "2", "--repeats", "1", "--out", str(out),
                                   "--formats", "full", "sharded-async"]) == 0
    r = json.loads(out.read_text())
    runs = {run["format"]: run for run in r["runs"]}
    assert set(runs) == {"full", "sharded-async"} and r["params"] > 0
    for run in runs.values():
        assert [x["rank"] for x in run["ranks"]] == [0, 1]
        assert all(x["restored_bitwise"] and x["save_s"] > 0 and x["load_s"] > 0 for x in run["ranks"])
    assert "model.safetensors" in runs["full"]["files"] and "trainer_state.pt" in runs["full"]["files"]
    sharded = runs["sharded-async"]["files"]
    assert "model.safetensors" not in sharded
    assert {"state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp", "trainer_state.pt"} <= set(sharded)
    assert all(x["blocked_s"] <= x["save_s"] for x in runs["sharded-async"]["ranks"])
