"""`emma-mamba serve`'s streamed log-probabilities (``logprobs`` with ``stream: true``, chat and legacy completions,
as OpenAI and vLLM stream them), against the same request without ``stream`` (the oracle: the chunks' entries,
joined, must be its entries) and the model's own log-softmax: each chunk carries exactly the tokens whose text it
carries, a token held back by the detokenizer (a UTF-8 character split over byte tokens, text that may start a
stop string) comes in the chunk with its text, ``n`` choices each with their own, ``echo`` with the prompt's
scores; through the official ``openai`` client too. Also: a stop counts as cut off only the requests whose answer
was not completely written.

The model is a small random Mamba LM with a planted bigram: a few scripted token chains (written into its LM head,
its mixers damped, not removed) that greedy decoding follows, so the answers hold the split characters and stop
strings the tests need, whatever the random weights."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.request

import pytest
import torch

from emma_mamba.inference.generate import GenerationConfig
from emma_mamba.inference.server import ChatService, _Turn, conversation_ids, make_server
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.models.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "Say something."}]
CHAIN_TEXT = " Hi 😀 there 日本語 done"  # 😀 and 語 are each split over two byte tokens by GPT-NeoX's BPE
STOP_PROMPT, STOP_TEXT = "Now tell me;", " Hello world. Stop here now again"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _scripted_lm(tok, chains):
    """A random MambaLM whose LM head maps each chain token's (normalised) embedding onto the next chain token,
    far above the rest: greedy decoding follows the chains. The mixers are damped (x0.2), so the state still
    moves the logits (prefill, decode steps and the cache matter) without breaking the chains."""
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=len(tok), d_state=8, tie_embeddings=False)).eval()
    nxt = {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            assert nxt.setdefault(a, b) == b, "a token with two successors: its chain is ambiguous"
    with torch.no_grad():
        for m in lm.modules():
            if hasattr(m, "out_proj"):
                m.out_proj.weight.mul_(0.2)
        for a, b in nxt.items():
            lm.lm_head.weight[b] += 2.0 * lm.embeddings.weight[a] / lm.embeddings.weight[a].norm()
    return lm


@pytest.fixture(scope="module")
def setup(tok):
    chat_prompt = conversation_ids(tok, [_Turn(MESSAGES[0]["content"], [])], "<image>")[0]
    chain = tok.encode(CHAIN_TEXT)
    stop_prompt, stop_chain = tok.encode(STOP_PROMPT), tok.encode(STOP_TEXT)
    assert len(set(chain + stop_chain + chat_prompt[-1:] + stop_prompt[-1:])) == len(chain + stop_chain) + 2
    # the split characters this file is about: each over two byte tokens, which decode alone to U+FFFD
    assert sum("\ufffd" in tok.decode([t]) for t in chain) == 4
    lm = _scripted_lm(tok, [chat_prompt[-1:] + chain + [tok.eos_token_id], stop_prompt[-1:] + stop_chain])
    svc = ChatService(lm, tokenizer=tok, defaults=GenerationConfig(max_new_tokens=16), model_name="scripted",
                      state_cache=0, max_batch=4)
    srv = make_server(svc, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{srv.server_port}", "lm": lm, "svc": svc, "srv": srv,
           "chat_prompt": chat_prompt, "chain": chain, "stop_prompt": stop_prompt, "stop_chain": stop_chain}
    srv.shutdown()
    srv.server_close()
    svc.close()


def post(url, path, body) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type":
                                                                                      "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def stream(url, path, body) -> list[dict]:
    """The chunks of a streamed request (server-sent events up to ``[DONE]``)."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        events = [e[len("data: "):] for e in r.read().decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    return chunks


def oracle(lm, ids: list[int], n_prompt: int) -> torch.Tensor:
    """log-softmax over the real vocabulary after each prompt + answer position (one full forward): row k is the
    distribution the answer's token k was picked from."""
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0, :, :lm.config.vocab_size].double()
    return torch.log_softmax(logits, -1)[n_prompt - 1:]


def _same_chat_entries(got: list[dict], want: list[dict]) -> None:
    assert [(e["token"], e["bytes"]) for e in got] == [(e["token"], e["bytes"]) for e in want]
    assert [[(a["token"], a["bytes"]) for a in e["top_logprobs"]] for e in got] == \
        [[(a["token"], a["bytes"]) for a in e["top_logprobs"]] for e in want]
    assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], abs=1e-5)
    assert [a["logprob"] for e in got for a in e["top_logprobs"]] == \
        pytest.approx([a["logprob"] for e in want for a in e["top_logprobs"]], abs=1e-5)


def chat_pieces(chunks: list[dict], index: int = 0) -> list[tuple[str, list]]:
    """(content, logprobs.content) of each content chunk of choice ``index``; the role and finish chunks checked
    to carry ``logprobs: null``."""
    pieces = []
    for c in chunks:
        for ch in c["choices"]:
            if ch["index"] != index:
                continue
            assert "logprobs" in ch
            if "content" in ch["delta"] and "role" not in ch["delta"]:
                assert ch["finish_reason"] is None and ch["logprobs"] is not None
                pieces.append((ch["delta"]["content"], ch["logprobs"]["content"]))
            else:  # the role chunk, the finish chunk
                assert ch["logprobs"] is None and not ch["delta"].get("content")
    return pieces


def check_pieces(tok, pieces: list[tuple[str, list]], ids: list[int] | None = None) -> None:
    """Each piece's tokens are that piece's text: joined, where no token is part of a split character (U+FFFD
    alone); with the answer's token ``ids`` known, their decode, for every piece but the last, which may also hold
    tokens no text shows (cut with a stop string, an end of sequence): there its text begins their decode."""
    at = 0
    for k, (text, entries) in enumerate(pieces):
        tokens = [e["token"] if isinstance(e, dict) else e for e in entries]
        last = k == len(pieces) - 1
        assert tokens or last, f"piece {k} ({text!r}) carries no token"
        if not last and "\ufffd" not in "".join(tokens):
            assert "".join(tokens) == text, (k, text, tokens)
        if ids is not None:
            mine = tok.decode(ids[at:at + len(tokens)])
            assert mine == text if not last else mine.startswith(text), (k, text, mine)
        at += len(tokens)
    if ids is not None:
        assert at == len(ids)


def test_chat_stream_splits_characters_with_their_byte_tokens(setup, tok):
    """The answer holds two characters split over byte tokens, and ends with an end of sequence: each split
    character comes in one chunk with both its tokens; the end of sequence (scored, no text) in a last chunk
    of its own; joined, the chunks' entries are the plain answer's, which are the model's log-softmax."""
    url, chain, eos = setup["url"], setup["chain"], tok.eos_token_id
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    plain = post(url, "/v1/chat/completions", body)["choices"][0]
    assert plain["message"]["content"] == CHAIN_TEXT and plain["finish_reason"] == "stop"
    chunks = stream(url, "/v1/chat/completions", body)
    pieces = chat_pieces(chunks)
    assert "".join(t for t, _ in pieces) == CHAIN_TEXT
    streamed = [e for _, es in pieces for e in es]
    _same_chat_entries(streamed, plain["logprobs"]["content"])
    check_pieces(tok, pieces, chain + [eos])
    # one token per chunk, but each split character's two byte tokens together, and the end of sequence alone
    assert [(t, len(es)) for t, es in pieces] == [(" Hi", 1), (" 😀", 2), (" there", 1), (" ", 1), ("日本", 1),
                                                  ("語", 2), (" done", 1), ("", 1)]
    assert pieces[1][1][1]["token"] == "\ufffd" and pieces[-1][1][0]["token"] == "<|endoftext|>"
    # bytes are each token's own (OpenAI's, for joining split characters): joined, the answer's UTF-8, where the
    # tokens' texts hold U+FFFD for each piece of a split character
    assert bytes(b for e in streamed[:-1] for b in e["bytes"]) == CHAIN_TEXT.encode()
    assert streamed[-1]["bytes"] == list(b"<|endoftext|>")
    assert bytes(b for e in plain["logprobs"]["content"][:-1] for b in e["bytes"]) == CHAIN_TEXT.encode()
    # the independent oracle: the model's own distribution at each answer position
    lp = oracle(setup["lm"], setup["chat_prompt"] + chain, len(setup["chat_prompt"]))
    for k, (e, t) in enumerate(zip(streamed, chain + [eos])):
        assert e["logprob"] == pytest.approx(float(lp[k, t]), abs=1e-4)
        top = lp[k].topk(3)
        assert [a["token"] for a in e["top_logprobs"]] == [tok.decode([i], skip_special_tokens=False)
                                                           for i in top.indices.tolist()]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("extra,content", [
    # text that may start a stop string is held back across five tokens, a split character among them, until
    # " d" shows it is no stop: those tokens come in that one chunk
    ({"stop": "re 日本語 x"}, CHAIN_TEXT),
    # a stop string ending inside a token ("日本"): the tokens it cuts come in the chunk with the last text
    ({"stop": ["ere 日", "zzz"]}, " Hi 😀 th"),
    # the answer cut by max_tokens inside a character: its first byte token with the replacement text
    ({"max_tokens": 2}, " Hi \ufffd"),
], ids=["held-back", "stop", "length-mid-character"])
def test_chat_stream_held_back_text_brings_its_tokens(setup, tok, extra, content):
    url, chain = setup["url"], setup["chain"]
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True, **extra}
    plain = post(url, "/v1/chat/completions", body)["choices"][0]
    assert plain["message"]["content"] == content
    chunks = stream(url, "/v1/chat/completions", body)
    pieces = chat_pieces(chunks)
    assert "".join(t for t, _ in pieces) == content
    _same_chat_entries([e for _, es in pieces for e in es], plain["logprobs"]["content"])
    n = len(plain["logprobs"]["content"])
    ids = (chain + [tok.eos_token_id])[:n]
    check_pieces(tok, pieces, ids)
    shape = [(t, [e["token"] for e in es]) for t, es in pieces]
    if extra.get("stop") == "re 日本語 x":  # " there", " ", "日本", the two byte tokens of 語 and " done" at once
        assert shape[2:] == [(" there 日本語 done", [" there", " ", "日本", "\ufffd", "\ufffd", " done"]),
                             ("", ["<|endoftext|>"])]
    elif "stop" in extra:  # " th" is shown; " there" and the tokens the stop string cut come with it
        assert shape[2:] == [(" th", [" there", " ", "日本"])]
    else:
        assert shape == [(" Hi", [" Hi"]), (" \ufffd", [" \ufffd"])]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


def test_chat_stream_n_choices_each_carry_their_own(setup, tok):
    """n sampled choices (seed + i each): every choice's chunks carry that choice's tokens, equal to the plain
    request's; the sampling is hot enough that the choices leave the script and differ."""
    url = setup["url"]
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 2.0, "seed": 11, "n": 3, "logprobs": True,
            "top_logprobs": 2}
    plain = post(url, "/v1/chat/completions", body)["choices"]
    chunks = stream(url, "/v1/chat/completions", body)
    assert len({c["message"]["content"] for c in plain}) > 1
    for c in plain:
        pieces = chat_pieces(chunks, c["index"])
        assert "".join(t for t, _ in pieces) == c["message"]["content"]
        _same_chat_entries([e for _, es in pieces for e in es], c["logprobs"]["content"])
        check_pieces(tok, pieces)


def test_chat_stream_usage_chunk_and_bare_logprobs(setup):
    """``top_logprobs`` left out: entries with no alternatives; ``stream_options.include_usage``: its usage chunk
    has no choices, and the completion tokens count the entries."""
    url = setup["url"]
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True,
            "stream_options": {"include_usage": True}}
    chunks = stream(url, "/v1/chat/completions", body)
    entries = [e for _, es in chat_pieces(chunks) for e in es]
    assert len(entries) == 4 and all(e["top_logprobs"] == [] for e in entries)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    plain = post(url, "/v1/chat/completions", {k: v for k, v in body.items() if k != "stream_options"})
    _same_chat_entries(entries, plain["choices"][0]["logprobs"]["content"])


def completion_pieces(chunks: list[dict], index: int = 0) -> list[tuple[str, dict]]:
    pieces = []
    for c in chunks:
        for ch in c["choices"]:
            if ch["index"] == index and ch["finish_reason"] is None:
                assert ch["logprobs"] is not None
                pieces.append((ch["text"], ch["logprobs"]))
            elif ch["index"] == index:
                assert ch["logprobs"] is None and ch["text"] == ""
    return pieces


def joined(pieces: list[tuple[str, dict]]) -> dict:
    return {k: [x for _, lp in pieces for x in lp[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                 "text_offset")}


def _same_completion_logprobs(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
    assert [v is None for v in got["token_logprobs"]] == [v is None for v in want["token_logprobs"]]
    assert [v for v in got["token_logprobs"] if v is not None] == \
        pytest.approx([v for v in want["token_logprobs"] if v is not None], abs=1e-5)
    assert [None if t is None else sorted(t) for t in got["top_logprobs"]] == \
        [None if t is None else sorted(t) for t in want["top_logprobs"]]
    for g, w in zip(got["top_logprobs"], want["top_logprobs"]):
        if w is not None:
            assert [g[k] for k in sorted(w)] == pytest.approx([w[k] for k in sorted(w)], abs=1e-5)


def test_completions_stream_with_stop_strings(setup, tok):
    """A stop string held back inside a token (" world": its "rld" may start "rld!") then released, and one
    straddling two tokens (" here now"), hit: the chunks' lists joined equal the plain answer's (text_offset
    counted the same, from the prompt's length), each chunk's tokens are its text but the last, which brings the
    tokens cut with the stop string."""
    url, chain = setup["url"], setup["stop_chain"]
    body = {"prompt": STOP_PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 3, "stop": ["rld!", "ere n"]}
    plain = post(url, "/v1/completions", body)["choices"][0]
    assert plain["text"] == " Hello world. Stop h" and plain["finish_reason"] == "stop"
    chunks = stream(url, "/v1/completions", body)
    pieces = completion_pieces(chunks)
    assert "".join(t for t, _ in pieces) == plain["text"]
    _same_completion_logprobs(joined(pieces), plain["logprobs"])
    assert plain["logprobs"]["text_offset"][0] == len(STOP_PROMPT)
    check_pieces(tok, [(t, lp["tokens"]) for t, lp in pieces], chain[:len(plain["logprobs"]["tokens"])])
    # " world" was held back whole (not " wo" now and "rld" later): it comes with "."
    assert (" world.", [" world", "."]) in [(t, lp["tokens"]) for t, lp in pieces]
    assert pieces[-1][1]["tokens"][-2:] == [" here", " now"]
    # the model's own log-probabilities, and each alternative list holds the picked (greedy) token
    lp = oracle(setup["lm"], setup["stop_prompt"] + chain, len(setup["stop_prompt"]))
    got = joined(pieces)
    for k, t in enumerate(chain[:len(got["tokens"])]):
        assert got["token_logprobs"][k] == pytest.approx(float(lp[k, t]), abs=1e-4)
        assert got["top_logprobs"][k][got["tokens"][k]] == pytest.approx(got["token_logprobs"][k], abs=1e-6)


def test_completions_text_offsets_point_into_the_text(setup, tok):
    """text_offset is each token's character offset in prompt + completion: after a character split over byte
    tokens (two tokens whose texts are each U+FFFD) the next tokens' offsets still point at their text (adding
    the pieces' texts' lengths put them one character late per split character); streamed the same."""
    url, prompt = setup["url"], setup["chat_prompt"]
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 0}
    plain = post(url, "/v1/completions", body)["choices"][0]
    assert plain["text"] == CHAIN_TEXT
    lp, start = plain["logprobs"], len(tok.decode(prompt, skip_special_tokens=False))
    text = tok.decode(prompt, skip_special_tokens=False) + plain["text"]
    whole = [(t, o) for t, o in zip(lp["tokens"], lp["text_offset"]) if "\ufffd" not in t and t != "<|endoftext|>"]
    assert [t for t, _ in whole] == [" Hi", " there", " ", "日本", " done"] and lp["text_offset"][0] == start
    for t, o in whole:  # every token that is whole text stands at its offset (those after 😀 and 語 too)
        assert text[o:o + len(t)] == t, (t, o)
    # the split characters' pieces: " 😀" as " \ufffd" at the space, then "\ufffd" at 😀; "語" as two at 語
    pieces_at = [(t, text[o]) for t, o in zip(lp["tokens"], lp["text_offset"]) if "\ufffd" in t]
    assert pieces_at == [(" \ufffd", " "), ("\ufffd", "😀"), ("\ufffd", "語"), ("\ufffd", "語")]
    pieces = completion_pieces(stream(url, "/v1/completions", body))
    assert joined(pieces)["text_offset"] == lp["text_offset"]


def test_completions_stream_echo_and_n(setup, tok):
    """``echo`` + ``logprobs`` + ``n`` streamed: each choice's first chunk echoes the prompt with its tokens'
    scores (the first token's null, as in the plain answer), then its own answer's; joined they equal the plain
    request's, for two prompts (one given as token ids) and two choices each."""
    url = setup["url"]
    ids = tok.encode("Here: 😀 ok;")
    body = {"prompt": [STOP_PROMPT, ids], "max_tokens": 6, "temperature": 1.5, "seed": 3, "n": 2, "logprobs": 2,
            "echo": True}
    plain = post(url, "/v1/completions", body)["choices"]
    chunks = stream(url, "/v1/completions", body)
    assert [c["index"] for c in plain] == [0, 1, 2, 3]
    for c in plain:
        pieces = completion_pieces(chunks, c["index"])
        prompt = STOP_PROMPT if c["index"] < 2 else tok.decode(ids)
        assert pieces[0][0] == prompt and pieces[0][1]["token_logprobs"][0] is None
        assert len(pieces[0][1]["tokens"]) == len(tok.encode(STOP_PROMPT) if c["index"] < 2 else ids)
        assert "".join(t for t, _ in pieces) == c["text"]
        _same_completion_logprobs(joined(pieces), c["logprobs"])
        assert c["logprobs"]["text_offset"][0] == 0
    # the prompt's own scores: the model's log-softmax
    lp = oracle(setup["lm"], ids, 1)
    echoed = completion_pieces(chunks, 2)[0][1]["token_logprobs"][1:]
    assert echoed == pytest.approx([float(lp[k, t]) for k, t in enumerate(ids[1:])], abs=1e-4)


def test_completions_stream_echo_without_new_tokens(setup, tok):
    """``max_tokens`` 0 with echo (lm-evaluation-harness's scoring request, streamed): one chunk, the prompt with
    its scores, then the finish."""
    url = setup["url"]
    body = {"prompt": STOP_PROMPT, "max_tokens": 0, "logprobs": 1, "echo": True}
    plain = post(url, "/v1/completions", body)["choices"][0]
    pieces = completion_pieces(stream(url, "/v1/completions", body))
    assert [t for t, _ in pieces] == [STOP_PROMPT] == [plain["text"]]
    _same_completion_logprobs(joined(pieces), plain["logprobs"])


def test_openai_client_streams_logprobs(setup):
    """The official client, ``stream=True, logprobs=True, top_logprobs=2``: every chunk validates against the
    client's schema, and the chunks' ``logprobs.content`` joined equals the plain answer's."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=setup["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        kw = {"model": "scripted", "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True,
              "top_logprobs": 2}
        plain = client.chat.completions.create(**kw).choices[0]
        chunks = list(client.chat.completions.create(stream=True, **kw))
        for c in chunks:
            type(c).model_validate(c.to_dict())
        content = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
        assert all(ch.logprobs is not None and ch.logprobs.content for ch in content)
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert "".join(ch.delta.content for ch in content) == plain.message.content == CHAIN_TEXT
        assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in plain.logprobs.content]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in plain.logprobs.content],
                                                              abs=1e-5)
        assert all([a.token for a in e.top_logprobs] == [a.token for a in w.top_logprobs] and len(e.top_logprobs)
                   == 2 for e, w in zip(streamed, plain.logprobs.content))
        # the legacy endpoint through the client too
        kw = {"model": "scripted", "prompt": STOP_PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2}
        plain = client.completions.create(**kw).choices[0]
        chunks = list(client.completions.create(stream=True, **kw))
        lp = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
        assert [t for x in lp for t in x.tokens] == plain.logprobs.tokens
        assert [t for x in lp for t in x.text_offset] == plain.logprobs.text_offset
        assert "".join(c.choices[0].text for c in chunks) == plain.text
    finally:
        client.close()


def test_a_stop_counts_only_answers_not_completely_written(setup, monkeypatch):
    """The "request(s) in progress are cut off" count of a stop (``serve``'s Ctrl-C / SIGTERM): an answer whose
    last byte was written while its handler still runs is not cut off; a stream still open is. The handler is
    held at its request's end (after the answer) and a stream in the middle of its answer, by events."""
    srv, svc = setup["srv"], setup["svc"]
    assert srv.wait_for_requests(timeout=60) == 0  # the earlier tests' handlers have ended
    at_end, release = threading.Event(), threading.Event()
    real_end = srv.end_request

    def held_end(connection):
        at_end.set()
        release.wait(60)
        real_end(connection)

    monkeypatch.setattr(srv, "end_request", held_end)
    c = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=60)
    try:
        c.request("GET", "/health")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"  # the whole answer, by its length
        assert at_end.wait(60)
        assert srv.active_requests() == 1 and srv.unanswered_requests() == 0
        release.set()
        assert srv.wait_for_requests(timeout=60) == 0
    finally:
        release.set()
        c.close()
    monkeypatch.setattr(srv, "end_request", real_end)

    # a stream whose answer is on its way: held after its first chunk of text
    mid, go_on = threading.Event(), threading.Event()
    real_answer = svc.answer

    def slow_answer(prepared, streamer=None, on_chunk=None, client_gone=None):
        on_chunk(0, "partial")
        mid.set()
        go_on.wait(60)
        return real_answer(prepared, streamer=streamer, on_chunk=on_chunk, client_gone=client_gone)

    monkeypatch.setattr(svc, "answer", slow_answer)
    c = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=60)
    try:
        c.request("POST", "/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": 2,
                                                              "stream": True}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        assert mid.wait(60)
        assert srv.active_requests() == 1 and srv.unanswered_requests() == 1
        go_on.set()
        assert r.read().decode().endswith("data: [DONE]\n\n")
    finally:
        go_on.set()
        c.close()
    assert srv.wait_for_requests(timeout=60) == 0 and srv.unanswered_requests() == 0
