"""Stop strings that straddle a token boundary, when the stop string is the only (so the longest) one.

Found by mutation testing: the existing stop-string test passes a 14-character second stop string, which widens
both windows that depend on the longest stop string (where the search for a new stop string starts, and how much
of the text's tail the stream holds back), so shrinking either window by one character went unnoticed:

* searching from ``old_len - max_stop + 2`` instead of ``+ 1`` misses a stop string whose last character is the
  first character of the newest token (generation then runs to max_new_tokens);
* holding back ``max_stop - 2`` instead of ``max_stop - 1`` characters streams the first two characters of a
  3-character stop string before the token that completes it arrives (the stream then differs from the text).

Oracle: the documented result, ``texts`` = the free-running text cut before the first occurrence of the stop
string, finish reason ``stop``, and the concatenated stream equal to that text; the text and the token
boundaries come from the tokenizer's own ``decode`` of the free-running (stop-less) greedy generation.
"""

from __future__ import annotations

from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.models.tokenizer import load_tokenizer
from tests.models.test_sampling_oracle import _lm  # a small random LM whose greedy text does not collapse

N = 30


def _straddling_stop(tok, seq: list[int], text: str) -> tuple[str, int]:
    """A 3-character stop string whose first two characters end one token and whose last character starts the
    next token, occurring first there; and its offset in ``text``."""
    for i in range(2, len(seq) - 1):
        head, nxt = tok.decode(seq[:i]), tok.decode(seq[:i + 1])
        p = len(head)
        if not (text.startswith(nxt) and nxt.startswith(head) and len(nxt) > p and p >= 2):
            continue
        stop = text[p - 2:p + 1]
        if stop.isascii() and stop.isprintable() and text.find(stop) == p - 2 and len(set(stop)) == 3 \
                and len(tok.decode(seq[i - 1:i])) >= 2:  # the token before holds both first characters
            return stop, p - 2
    raise AssertionError("no token boundary to put a stop string across")


def test_a_stop_string_across_a_token_boundary_stops_and_never_reaches_the_stream():
    tok = load_tokenizer()
    lm = _lm(5, 50277)
    prompt = tok.encode("The weather today")
    free = generate(lm, input_ids=prompt, config=GenerationConfig(max_new_tokens=N, eos_token_id=None),
                    tokenizer=tok)
    seq, text = free.sequences[0], free.texts[0]
    assert text == tok.decode(seq) and len(seq) == N
    stop, at = _straddling_stop(tok, seq, text)

    chunks: list[str] = []
    res = generate(lm, input_ids=prompt, config=GenerationConfig(max_new_tokens=N, eos_token_id=None,
                                                                stop_strings=[stop]),
                   tokenizer=tok, streamer=chunks.append)
    assert res.finish_reasons == ["stop"], (stop, text)
    assert res.texts[0] == text[:at]
    assert "".join(chunks) == text[:at]  # not a character of the stop string was streamed
    assert len(res.sequences[0]) < N
