"""benchmarks/prefill_chunk_memory.py runs end to end (each setting in its own process, a short prompt) and writes
its JSON: every setting picked the same first token (the script checks)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_prefill_chunk_memory_smoke(tmp_path):
    from benchmarks import prefill_chunk_memory

    out = tmp_path / "r.json"
    assert prefill_chunk_memory.main(["--seqlen", "96", "--chunks", "0", "32", "--threads", "1",
                                      "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["prefill_chunk"] for row in r["rows"]] == [0, 32]
    assert all(row["seconds"] > 0 and row["peak_above_start_mib"] >= 0 for row in r["rows"])
