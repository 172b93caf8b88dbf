"""benchmarks/chat_turns.py on the tiny preset: the carried-state chat and the re-prefilled history answer the
same (the script checks it and exits otherwise), and the JSON holds one row per turn."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_chat_turns_script(tmp_path):
    out = tmp_path / "ct.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chat_turns.py"), "--preset", "tiny", "--turns",
                        "3", "--new-tokens", "3", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [x["turn"] for x in rows] == [1, 2, 3]
    ctx = [x["context_tokens"] for x in rows]
    assert ctx[0] < ctx[1] < ctx[2]
    # the session prefills the new turn only: far fewer tokens than the history from the second turn on
    assert all(x["session_prompt_tokens"] < x["context_tokens"] for x in rows[1:])
    assert res["state_bytes"] > 0
    from emma_mamba import ops

    # the record names the machine and the kernel backend the dispatch chose for CPU tensors
    assert res["device"] == "cpu" and res["threads"] == 1 and res["backend"] == ops.get_backend("cpu")
