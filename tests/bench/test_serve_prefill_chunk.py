"""benchmarks/serve_prefill_chunk.py runs end to end (a tiny random LM) and writes its JSON: the streams' tokens
were equal with and without chunking (the script checks), and the long prompt went in the chunks asked for."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_serve_prefill_chunk_smoke(tmp_path, monkeypatch):
    from benchmarks import serve_prefill_chunk
    from emma_mamba.models import mamba

    monkeypatch.setattr(mamba.MambaConfig, "from_preset",  # random_lm builds it: tiny shapes for the test
                        classmethod(lambda cls, name: cls(d_model=32, n_layer=2, vocab_size=50280, d_state=4)))
    out = tmp_path / "r.json"
    # the long prompt arrives right after the streams' third step (submitted from the decoder's thread): the streams
    # decode 36 more steps, enough for its 5 chunks to land between steps
    assert serve_prefill_chunk.main(["--streams", "2", "--new-tokens", "40", "--warm-steps", "3", "--long-prompt",
                                     "40", "--chunks", "0", "8", "--runs", "1", "--threads", "1",
                                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    whole, chunked = r["runs"][0]
    assert (whole["prefill_chunk"], chunked["prefill_chunk"]) == (0, 8)
    assert whole["long_prompt_prefill_chunks"] == 1 and chunked["long_prompt_prefill_chunks"] == 5
    # a step runs between consecutive chunks (4 for 5 chunks), none inside a whole prefill (the request arrives
    # between two steps; when a polling thread submitted it, one more counted if it landed during a step: a race)
    assert chunked["steps_while_prefilling"] == 4
    assert whole["steps_while_prefilling"] == 0
    assert set(r["median"]) == {"0", "8"}
