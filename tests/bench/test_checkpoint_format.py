"""benchmarks/checkpoint_format.py runs end to end (2 FSDP processes under torchrun, a small LM): every layout
restores every parameter shard and AdamW moment bit for bit into a fresh model, the sharded ones write a shard file
per rank and gather nothing (no model.safetensors); a background write returns before it is complete."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _run(tmp_path, formats):
    from benchmarks import checkpoint_format

    out = tmp_path / "r.json"
    assert checkpoint_format.main(["--d-model", "64", "--n-layer", "2", "--repeats", "1", "--out", str(out),
                                   "--formats", *formats]) == 0
    r = json.loads(out.read_text())
    runs = {run["format"]: run for run in r["runs"]}
    assert set(runs) == set(formats) and r["params"] > 0
    for run in runs.values():
        assert [x["rank"] for x in run["ranks"]] == [0, 1]
        assert all(x["restored_bitwise"] and x["save_s"] > 0 and x["load_s"] > 0 for x in run["ranks"])
    for fmt in {"sharded", "sharded-async"} & set(runs):
        sharded = runs[fmt]["files"]
        assert "model.safetensors" not in sharded
        assert {"state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp", "trainer_state.pt"} <= set(sharded)
    return runs


def test_checkpoint_format_smoke(tmp_path):
    """One torchrun (~15 s of process start-up): the background-written layout, the one with the most code of
    its own (the full layout is the trainer's default, in most checkpoint tests; all three: the slow test below)."""
    runs = _run(tmp_path, ["sharded-async"])
    assert all(x["blocked_s"] <= x["save_s"] for x in runs["sharded-async"]["ranks"])


@pytest.mark.slow
def test_checkpoint_format_every_layout(tmp_path):
    runs = _run(tmp_path, ["full", "sharded", "sharded-async"])
    assert "model.safetensors" in runs["full"]["files"] and "trainer_state.pt" in runs["full"]["files"]
