"""Mutation round 5: ``emma-mamba serve``'s request handling (emma_mamba.inference.server) where the earlier tests
left plausible bugs unnoticed.

Oracles: :func:`emma_mamba.inference.generate.generate` on the same prompt alone (the chat prompt built by
:func:`emma_mamba.models.vlm.build_chat_prompt`, which ``test_server`` checks against training's tokenisation);
a service without a state cache (an independent path: every request prefilled whole); the OpenAI / vLLM
conventions where the server follows them (noted per test). The LM is a random MambaLM whose weights are noisy
enough that its sampled text depends on every prompt token (a random tiny model's answer is the same few tokens
for any prompt, which hid these bugs).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading

import pytest
import torch

from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.inference.server import ChatService, make_server
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.models.tokenizer import load_tokenizer
from emma_mamba.models.vlm import build_chat_prompt
from tests.models.test_server import _first_kept_answer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=len(tok), d_state=8, tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return lm


def _service(lm, tok, **kw):
    defaults = kw.pop("defaults", GenerationConfig(max_new_tokens=8))
    return ChatService(lm, tokenizer=tok, defaults=defaults, **kw)


def _alone(lm, tok, question: str, **cfg):
    """generate() on the chat prompt of one user turn: (text, token ids, finish reason)."""
    ids = tok.encode(build_chat_prompt(question, 0))
    res = generate(lm, input_ids=ids, config=GenerationConfig(eos_token_id=tok.eos_token_id, **cfg), tokenizer=tok)
    return res.texts[0], res.sequences[0], res.finish_reasons[0]


def _answer(out: dict, i: int = 0) -> str:
    return out["choices"][i]["message"]["content"]


def test_text_parts_of_a_message_are_its_lines(lm, tok):
    """Guards against a user message's text parts being joined with a space (or nothing) instead of a newline:
    the model must read the parts as lines, as vLLM's chat template rendering joins them ("\\n".join)."""
    svc = _service(lm, tok, state_cache=0)
    try:
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is"},
                                                          {"type": "text", "text": "in the box?"}]}],
                "temperature": 1.0, "seed": 5, "max_tokens": 8}
        want, _, _ = _alone(lm, tok, "What is\nin the box?", max_new_tokens=8, temperature=1.0, seed=5)
        other, _, _ = _alone(lm, tok, "What is in the box?", max_new_tokens=8, temperature=1.0, seed=5)
        assert want != other  # the joining character matters to this model: the check below can fail
        assert _answer(svc.complete(body)) == want
    finally:
        svc.close()


def test_max_completion_tokens_wins_over_max_tokens(lm, tok):
    """Guards against ``max_tokens`` taking precedence when both are sent: OpenAI deprecated ``max_tokens`` for
    ``max_completion_tokens``, and vLLM reads ``max_completion_tokens or max_tokens``."""
    svc = _service(lm, tok, state_cache=0)
    try:
        out = svc.complete({"messages": [{"role": "user", "content": "Count"}], "max_tokens": 2,
                            "max_completion_tokens": 5})
        _, ids, reason = _alone(lm, tok, "Count", max_new_tokens=5)
        assert reason == "length" and len(ids) == 5
        assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"
    finally:
        svc.close()


def test_the_servers_default_stop_strings_apply_to_a_request_without_stop(lm, tok):
    """Guards against the server's default stop strings (``serve``'s defaults) being dropped when a request
    sends no ``stop``: the answer must be generate()'s with the same stop string."""
    free, _, _ = _alone(lm, tok, "Tell me", max_new_tokens=16)
    stop = free[6:9]
    assert len(stop) == 3 and free.find(stop) == 6  # a stop string first met inside the free-running text
    svc = _service(lm, tok, state_cache=0, defaults=GenerationConfig(max_new_tokens=16, stop_strings=(stop,)))
    try:
        out = svc.complete({"messages": [{"role": "user", "content": "Tell me"}]})
        want, _, reason = _alone(lm, tok, "Tell me", max_new_tokens=16, stop_strings=(stop,))
        assert reason == "stop" and want == free[:6]
        assert _answer(out) == want and out["choices"][0]["finish_reason"] == "stop"
    finally:
        svc.close()


def test_a_state_cache_hit_continues_with_the_pending_tokens(lm, tok):
    """Guards against a state-cache hit prefilling only the new turn and dropping the pending tokens (the
    answer's last token and the end of turn, which the stored state has not consumed): the follow-up's answer
    must be the one a service without a state cache gives (the whole history prefilled)."""
    cached, plain = _service(lm, tok, state_cache=4), _service(lm, tok, state_cache=0)
    try:
        first = [{"role": "user", "content": "Hello there"}]
        a, seed = _first_kept_answer(cached, first, max_tokens=4)
        follow = first + [{"role": "assistant", "content": _answer(a)}, {"role": "user", "content": "And then?"}]
        body = {"messages": follow, "temperature": 1.0, "seed": seed + 7, "max_tokens": 8}
        hit, ref = cached.complete(body), plain.complete(body)
        assert hit["emma_mamba"]["state_cache"] == "hit" and ref["emma_mamba"]["state_cache"] == "miss"
        assert hit["choices"] == ref["choices"]
    finally:
        cached.close()
        plain.close()


def test_a_state_cache_hit_makes_its_state_the_most_recent(lm, tok):
    """Guards against the state cache evicting in insertion order rather than least recently used: a state
    just continued (a hit) must outlive one stored after it but not used since (the documented LRU)."""
    cached = _service(lm, tok, state_cache=2)
    try:
        first = [{"role": "user", "content": "Hello there"}]
        a, _ = _first_kept_answer(cached, first, max_tokens=4)
        _first_kept_answer(cached, [{"role": "user", "content": "Good morning"}], max_tokens=4)
        follow = first + [{"role": "assistant", "content": _answer(a)}, {"role": "user", "content": "And then?"}]
        # a hit whose own answer is not kept (cut by a stop string): the cache still holds the same two states
        stops = list("abcdefghijklmnopqrstuvwxyz ")
        out = cached.complete({"messages": follow, "max_tokens": 4, "stop": stops})
        assert out["emma_mamba"]["state_cache"] == "hit" and len(cached.states) == 2
        _first_kept_answer(cached, [{"role": "user", "content": "Goodbye"}], max_tokens=4)  # evicts one
        again = cached.complete({"messages": follow, "max_tokens": 2})
        assert again["emma_mamba"]["state_cache"] == "hit"  # the morning's state went, not the one just used
    finally:
        cached.close()


def test_streamed_text_offsets_of_n_choices_of_several_prompts_start_after_their_own_prompt(lm, tok):
    """Guards against a streamed completion choice counting its ``text_offset`` from another prompt's length
    (choice index -> prompt mixed up with n > 1 and several prompts): without echo, OpenAI's first offset of a
    choice is its own prompt's length in characters."""
    svc = _service(lm, tok, state_cache=0)
    prompts = ["A short one", "A much longer prompt than the first"]
    try:
        chunks = []
        svc.stream_text_completion({"prompt": prompts, "n": 2, "max_tokens": 3, "logprobs": 1, "temperature": 1.0,
                                    "seed": 1, "stream": True}, lambda: None, chunks.append)
        first = {}
        for c in chunks:
            for ch in c["choices"]:
                if ch["logprobs"] and ch["logprobs"]["text_offset"]:
                    first.setdefault(ch["index"], ch["logprobs"]["text_offset"][0])
        assert first == {0: len(prompts[0]), 1: len(prompts[0]), 2: len(prompts[1]), 3: len(prompts[1])}
    finally:
        svc.close()


def test_completions_logprobs_may_be_20(lm, tok):
    """Guards against an off-by-one in ``logprobs``' documented range [0, 20]: 20 is accepted, and the picked
    token's log-probability and its 20 alternatives are the model's (one independent full forward)."""
    from emma_mamba.inference.server import RequestError

    svc = _service(lm, tok, state_cache=0)
    ids = tok.encode("The weather today")
    try:
        out = svc.text_completion({"prompt": ids, "max_tokens": 1, "logprobs": 20})
        with pytest.raises(RequestError, match="logprobs"):
            svc.text_completion({"prompt": ids, "max_tokens": 1, "logprobs": 21})
    finally:
        svc.close()
    with torch.no_grad():
        lp = torch.log_softmax(lm(torch.tensor([ids])).logits[0, -1, :len(tok)].float(), -1)
    vals, alts = lp.topk(20)
    got = out["choices"][0]["logprobs"]
    assert got["tokens"] == [tok.decode([int(alts[0])], skip_special_tokens=False)]  # greedy: the top token
    assert got["token_logprobs"][0] == pytest.approx(float(vals[0]), abs=1e-4)
    want = {}
    for i, v in zip(alts.tolist(), vals.tolist()):
        want.setdefault(tok.decode([i], skip_special_tokens=False), v)  # (keyed by text, as OpenAI's)
    assert got["top_logprobs"][0].keys() == want.keys()
    assert got["top_logprobs"][0] == pytest.approx(want, abs=1e-4)


def test_a_prompt_of_exactly_max_prompt_positions_is_accepted(lm, tok):
    """Guards against an off-by-one in the prompt length limit: only a prompt *longer* than
    ``max_prompt_positions`` is refused (400 naming ``prompt``; ``messages`` for a chat)."""
    from emma_mamba.inference.server import RequestError

    svc = _service(lm, tok, state_cache=0, max_prompt_positions=12)
    try:
        ids = tok.encode("one two three four five six seven eight nine ten eleven twelve thirteen")[:12]
        assert len(ids) == 12
        assert svc.text_completion({"prompt": ids, "max_tokens": 1})["usage"]["prompt_tokens"] == 12
        with pytest.raises(RequestError) as e:
            svc.text_completion({"prompt": ids + ids[:1], "max_tokens": 1})
        assert e.value.param == "prompt"
    finally:
        svc.close()


def test_detokenize_refuses_the_id_one_past_the_vocabulary(lm, tok):
    """Guards against an off-by-one in ``/detokenize``'s id check: the tokenizer's ids are 0 .. len(tok) - 1, so
    ``len(tok)`` is a 400 naming ``tokens``, not passed to the decoder."""
    from emma_mamba.inference.server import RequestError

    svc = _service(lm, tok, state_cache=0)
    try:
        last = len(tok) - 1
        assert svc.detokenize({"tokens": [last]}) == {"prompt": tok.decode([last])}
        with pytest.raises(RequestError) as e:
            svc.detokenize({"tokens": [len(tok)]})
        assert e.value.param == "tokens"
    finally:
        svc.close()


@contextlib.contextmanager
def _http(lm, tok, **kw):
    """The service over HTTP on a free port for the block: the server (stopped after)."""
    svc = _service(lm, tok, state_cache=0, defaults=GenerationConfig(max_new_tokens=2))
    srv = make_server(svc, "127.0.0.1", 0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        svc.close()


def _request(srv, method: str, path: str, body: bytes | None = None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def test_cors_origins_match_whatever_the_case_of_the_host(lm, tok):
    """Guards against the request's ``Origin`` being compared case-sensitively with the allowed (lower-cased)
    origins: scheme and host are case-insensitive (RFC 6454's origin comparison after URL normalisation), so
    ``https://APP.example`` is the allowed ``https://app.example``; another host is still not allowed."""
    with _http(lm, tok, cors_origins=["https://app.example"]) as srv:
        r, _ = _request(srv, "GET", "/v1/models", headers={"Origin": "https://APP.example"})
        assert r.status == 200 and r.getheader("Access-Control-Allow-Origin") == "https://APP.example"
        r, _ = _request(srv, "OPTIONS", "/v1/chat/completions",
                        headers={"Origin": "https://App.Example", "Access-Control-Request-Method": "POST"})
        assert r.status == 204 and r.getheader("Access-Control-Allow-Origin") == "https://App.Example"
        r, _ = _request(srv, "GET", "/v1/models", headers={"Origin": "https://other.example"})
        assert r.status == 200 and r.getheader("Access-Control-Allow-Origin") is None


def test_a_body_of_exactly_max_body_bytes_is_read(lm, tok):
    """Guards against an off-by-one in the body size limit: only a body *more than* ``max_body_bytes`` is a
    413; one of exactly that size is read and answered."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    with _http(lm, tok) as srv:
        srv.RequestHandlerClass.max_body_bytes = len(body)  # (the server's own handler class: this server only)
        r, data = _request(srv, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
        assert r.status == 200 and json.loads(data)["object"] == "text_completion"
        r, _ = _request(srv, "POST", "/v1/completions", body + b" ", {"Content-Type": "application/json"})
        assert r.status == 413


def test_logprobs_are_over_the_real_vocabulary_only(lm, tok):
    """Guards against log-probabilities normalised over the padded vocabulary (the embedding's rows past
    ``vocab_size``, which no token has and generation never samples): with large padded logits the reported
    log-probabilities must still be the real vocabulary's (an independent log-softmax over ``[:vocab_size]``), and
    no alternative is a padding id."""
    import copy

    padded = copy.deepcopy(lm)
    V = padded.config.vocab_size
    assert padded.lm_head.weight.shape[0] > V  # 50277 -> 50280: three padding rows
    ids = tok.encode("The weather today")
    with torch.no_grad():
        h = padded(torch.tensor([ids])).logits[0, -1, :V]
        padded.lm_head.weight[V:] = 3.0 * padded.lm_head.weight[int(h.argmax())]  # padding logits far on top
        logits = padded(torch.tensor([ids])).logits[0, -1].float()
    assert logits[V:].min() > logits[:V].max()
    lp = torch.log_softmax(logits[:V], -1)
    svc = _service(padded, tok, state_cache=0)
    try:
        got = svc.text_completion({"prompt": ids, "max_tokens": 1, "logprobs": 3})["choices"][0]["logprobs"]
    finally:
        svc.close()
    vals, alts = lp.topk(3)
    assert got["token_logprobs"][0] == pytest.approx(float(vals[0]), abs=1e-4)  # greedy: the top real token
    assert got["top_logprobs"][0] == pytest.approx(
        {tok.decode([i], skip_special_tokens=False): v for i, v in zip(alts.tolist(), vals.tolist())}, abs=1e-4)


def test_a_prefilling_job_with_forks_counts_all_its_rows_against_max_batch(monkeypatch):
    """Guards against the batch admitting a queued job beside a job still being prefilled in chunks as if that
    job had one row, not one per fork (n choices): the batch then decodes more than ``max_batch`` rows. Every
    answer must still equal generate() alone (``check``) and no row may see more than max_batch rows."""
    from emma_mamba.inference.batching import BatchDecoder
    from tests.models.test_batching import StepGate, check, job, prompts

    torch.manual_seed(0)
    small = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=96, d_state=8)).eval()
    dec = BatchDecoder(small, max_batch=3, prefill_chunk=4)
    gate = StepGate(monkeypatch, 2)
    running_ids, forked_ids, late_ids = prompts(3, seed=5)
    forked_ids = (forked_ids * 4)[:14]  # four chunks of at most 4 positions: pending over several steps
    cfg_long, cfg = GenerationConfig(max_new_tokens=30), GenerationConfig(max_new_tokens=6)
    running = dec.submit(job(small, running_ids, cfg_long))
    gate.wait(2)
    forked = job(small, forked_ids, cfg)
    forked.forks = [job(small, forked_ids, GenerationConfig(max_new_tokens=6, temperature=1.0, seed=2))]
    late = job(small, late_ids, cfg)
    dec.submit(forked)
    dec.submit(late)  # 1 running + 2 forked rows: no room for it until a row leaves
    gate.release(2)
    try:
        results = [j.wait(timeout=60) for j in (running, forked, forked.forks[0], late)]
    finally:
        dec.close()
    for r, ids, c in zip(results, [running_ids, forked_ids, forked_ids, late_ids],
                         [cfg_long, cfg, forked.forks[0].cfg, cfg]):
        check(small, r, ids, c)
    assert max(r["max_batch_rows"] for r in results) <= 3


def test_rows_decoded_together_score_their_own_tokens(lm, tok):
    """Guards against a batched row's log-probabilities being read off another row's logits: two prompts
    decoded in one batch (one /v1/completions request) each report their answer tokens' log-probabilities under
    their own context (an independent full forward over prompt + answer)."""
    svc = _service(lm, tok, state_cache=0)
    prompts = ["The weather today", "Once upon a time there was"]
    try:
        out = svc.text_completion({"prompt": prompts, "max_tokens": 4, "logprobs": 0, "temperature": 1.0, "seed": 3})
    finally:
        svc.close()
    for p, choice in zip(prompts, out["choices"]):
        ids = tok.encode(p)
        new = tok.encode(choice["text"])
        assert len(new) == len(choice["logprobs"]["token_logprobs"]) == 4  # (the text re-encodes to its tokens)
        with torch.no_grad():
            lp = torch.log_softmax(lm(torch.tensor([ids + new])).logits[0, :, :len(tok)].float(), -1)
        want = [float(lp[len(ids) - 1 + k, t]) for k, t in enumerate(new)]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
