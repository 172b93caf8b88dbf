"""`emma-mamba serve`'s ``/v1/completions`` (echo, logprobs) and tokenizer endpoints, as lm-evaluation-harness's
``local-completions`` model uses them: every prompt token's log-probability against an independent full forward
of the LM, a continuation's log-likelihood and greediness computed the way the harness parses the response,
completions against generate(), an end-of-sequence pick still scored, and malformed requests named."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.inference.server import ChatService, make_server
from emma_mamba.models.vlm import EmmaMamba


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


@pytest.fixture(scope="module")
def svc(model):
    s = ChatService(model, defaults=GenerationConfig(max_new_tokens=5))
    yield s
    s.close()


def oracle_logprobs(lm, ids, tok=None, image_id=None):
    """log p(ids[i] | ids[:i]) for i >= 1 and the distribution after the last token, from one full forward: over
    the LM's vocabulary, or (``tok``) over the ids that tokenizer has a token for but ``image_id``, those a
    sampler may pick."""
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0, :, :lm.config.vocab_size].float()
        if tok is not None:
            logits = logits[:, :len(tok)].clone()
            logits[:, image_id] = float("-inf")
        lp = torch.log_softmax(logits, -1)
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], lp[-1]


def test_echo_logprobs_are_the_models_and_parse_as_the_harness_does(svc, model):
    tok = model.tokenizer
    context, continuation = "A red circle and a blue", " square"
    ctx_ids, cont_ids = tok.encode(context), tok.encode(continuation)
    ids = ctx_ids + cont_ids
    out = svc.text_completion({"prompt": [ids, "Another prompt here"], "max_tokens": 1, "logprobs": 1,
                               "echo": True, "temperature": 0, "seed": 1234})
    assert [c["index"] for c in out["choices"]] == [0, 1]
    lp = out["choices"][0]["logprobs"]
    # the distribution over what the model may say: the tokenizer's ids (the LM has more rows), not the placeholder
    assert model.lm.config.vocab_size > len(tok)
    want, last = oracle_logprobs(model.lm, ids, tok, model.image_token_id)
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:-1]), want, rtol=1e-5, atol=1e-5)
    # the generated token: greedy, with its logprob; each top-1 alternative is the argmax of its position
    g = int(last.argmax())
    assert lp["tokens"][-1] == tok.decode([g], skip_special_tokens=False)
    assert lp["token_logprobs"][-1] == pytest.approx(float(last[g]), abs=1e-5)
    assert lp["tokens"][:-1] == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]
    # lm-evaluation-harness's parse: sum(token_logprobs[ctxlen:-1]) and greedy = each equals its top-1
    ctxlen = len(ctx_ids)
    ll = sum(lp["token_logprobs"][ctxlen:-1])
    assert ll == pytest.approx(float(want[ctxlen - 1:].sum()), abs=1e-4)
    with torch.no_grad():
        full = torch.log_softmax(model.lm(torch.tensor([ids])).logits[0, :, :model.lm.config.vocab_size], -1)
    greedy = all(int(full[i - 1].argmax()) == ids[i] for i in range(ctxlen, len(ids)))
    parsed = all(t == max(top.values())
                 for t, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]))
    assert parsed == greedy
    assert out["choices"][0]["text"].startswith(context + continuation)
    assert out["usage"]["prompt_tokens"] == len(ids) + len(tok.encode("Another prompt here"))


def test_completions_continue_as_generate_does(svc, model):
    tok = model.tokenizer
    prompts = ["Once upon a time", "The shapes are"]
    out = svc.text_completion({"prompt": prompts, "max_tokens": 5})
    for p, c in zip(prompts, out["choices"]):
        want = generate(model.lm, input_ids=tok.encode(p), tokenizer=tok,
                        config=GenerationConfig(max_new_tokens=5, eos_token_id=tok.eos_token_id)).texts[0]
        assert c["text"] == want and c["logprobs"] is None
    # logprobs without echo: the generated tokens only, offsets into prompt + completion (OpenAI's)
    c = svc.text_completion({"prompt": prompts[0], "max_tokens": 3, "logprobs": 2})["choices"][0]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 3 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == len(prompts[0]) and "".join(lp["tokens"]) == c["text"]
    seeded = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 1.0, "seed": 3}
    assert svc.text_completion(seeded)["choices"][0]["text"] == generate(
        model.lm, input_ids=tok.encode("Once upon a time"), tokenizer=tok,
        config=GenerationConfig(max_new_tokens=5, temperature=1.0, seed=3, eos_token_id=tok.eos_token_id)).texts[0]
    # n choices per prompt, prompt-major, choice i sampled with seed + i: each equals the request alone with that seed
    many = {"prompt": ["Once upon a time", "The shapes are"], "max_tokens": 5, "temperature": 1.0, "seed": 11, "n": 3}
    out = svc.text_completion(many)
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for k, c in enumerate(out["choices"]):
        p, i = divmod(k, 3)
        alone = svc.text_completion({**many, "prompt": many["prompt"][p], "n": 1, "seed": 11 + i})["choices"][0]
        assert c["text"] == alone["text"] and c["finish_reason"] == alone["finish_reason"]
    assert len({c["text"] for c in out["choices"][:3]}) > 1  # the choices are sampled apart
    assert out["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in many["prompt"])
    # max_tokens 0 with echo: the prompt scored, nothing generated
    ids = tok.encode("Only the prompt")
    out = svc.text_completion({"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    c = out["choices"][0]
    assert c["text"] == "Only the prompt" and len(c["logprobs"]["token_logprobs"]) == len(ids)
    assert c["logprobs"]["top_logprobs"][1] == {} and out["usage"]["completion_tokens"] == 0


def test_an_end_of_sequence_pick_is_still_scored(model):
    """The harness slices token_logprobs[ctxlen:-1]: the one generated entry must be there even when the
    model's pick ends the sequence."""
    tok = model.tokenizer
    ids = tok.encode("A red circle")
    _, last = oracle_logprobs(model.lm, ids, tok, model.image_token_id)
    g = int(last.argmax())

    class EosIsTheGreedyPick:  # the tokenizer, with the model's next greedy token as its end of sequence
        eos_token_id = g

        def __getattr__(self, name):
            return getattr(tok, name)

        def __len__(self):  # (special methods are looked up on the type)
            return len(tok)

    s = ChatService(model.lm, tokenizer=EosIsTheGreedyPick(), defaults=GenerationConfig(max_new_tokens=3))
    c = s.text_completion({"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1})["choices"][0]
    s.close()
    assert c["finish_reason"] == "stop" and c["text"] == tok.decode(ids, skip_special_tokens=False)
    assert len(c["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert c["logprobs"]["token_logprobs"][-1] == pytest.approx(float(last[g]), abs=1e-5)


def test_http_routes_and_bad_requests(svc, model):
    srv = make_server(svc, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"

    def post(path, body):
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        with urllib.request.urlopen(url + "/tokenizer_info") as r:
            assert json.loads(r.read())["eos_token"] == "<|endoftext|>"
        status, got = post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
        assert status == 200 and got["tokens"] == model.tokenizer.encode("Hello world")
        assert post("/detokenize", {"tokens": got["tokens"]}) == (200, {"prompt": "Hello world"})
        status, out = post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 200 and out["object"] == "text_completion"
        vocab = model.lm.config.vocab_size
        for body, param in [({"prompt": 3}, "prompt"), ({"prompt": []}, "prompt"),
                            ({"prompt": ["ok", 5]}, "prompt[1]"), ({"prompt": [1, vocab]}, "prompt"),
                            ({"prompt": "x", "logprobs": 50}, "logprobs"), ({"prompt": "x", "echo": "yes"}, "echo"),
                            ({"prompt": ["x", 5], "stream": True}, "prompt[1]"),
                            ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                            ({"prompt": ""}, "prompt")]:
            status, err = post("/v1/completions", body)
            assert status == 400 and err["error"]["param"] == param, (body, err)
        assert post("/tokenize", {"text": "x"})[0] == 400
        assert post("/detokenize", {"tokens": [-1]})[0] == 400
    finally:
        srv.shutdown()
        srv.server_close()


def test_streamed_completions_are_the_plain_ones(svc, model):
    """``stream: true`` on /v1/completions over HTTP: per prompt index, the text chunks concatenate to the
    non-streamed request's text (greedy and seeded sampling; the prompt first with echo), each index ends with its
    finish_reason, with ``stream_options.include_usage`` a last chunk with no choices carries the usage (without
    it, every chunk has a choice), then ``[DONE]``."""
    srv = make_server(svc, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/v1/completions"

    def post(body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.headers.get("Content-Type"), r.read().decode()

    try:
        for body in [{"prompt": ["Once upon a time", "The shapes are"], "max_tokens": 7},
                     {"prompt": "A red circle", "max_tokens": 6, "temperature": 1.0, "seed": 5, "echo": True},
                     {"prompt": ["A red circle", "Two squares"], "max_tokens": 5, "temperature": 1.0, "seed": 9,
                      "n": 2, "echo": True}]:
            plain = svc.text_completion(body)
            _, raw = post({**body, "stream": True})  # without include_usage: a choice in every chunk, no usage
            bare = [json.loads(e[6:]) for e in raw.split("\n\n")[:-2]]
            assert all(len(c["choices"]) == 1 and "usage" not in c for c in bare)
            kind, raw = post({**body, "stream": True, "stream_options": {"include_usage": True}})
            assert kind == "text/event-stream"
            events = raw.split("\n\n")
            assert events[-2] == "data: [DONE]" and events[-1] == ""
            chunks = [json.loads(e[6:]) for e in events[:-2]]
            assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
            assert all(c["usage"] is None for c in chunks[:-1])
            assert [c["choices"] for c in bare] == [c["choices"] for c in chunks[:-1]]  # the same text either way
            for want in plain["choices"]:
                mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == want["index"]]
                assert "".join(c["text"] for c in mine) == want["text"]
                assert [c["finish_reason"] for c in mine][-1] == want["finish_reason"]
                assert all(c["finish_reason"] is None for c in mine[:-1]) and len(mine) >= 2
            if body.get("echo"):
                assert chunks[0]["choices"][0]["text"] == "A red circle"
            assert len(plain["choices"]) == len(body["prompt"] if isinstance(body["prompt"], list) else [1]) * \
                body.get("n", 1)
    finally:
        srv.shutdown()
        srv.server_close()


def test_chat_logprobs_are_the_models_own(svc, model):
    """/v1/chat/completions with logprobs + top_logprobs (OpenAI's `logprobs.content` form): every answer token's
    log-probability and alternatives equal one full forward of the chat prompt (image included) + the answer."""
    import base64
    import io

    import skimage.data
    from PIL import Image

    from emma_mamba.models.vlm import build_chat_prompt

    img = Image.fromarray(skimage.data.chelsea())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    q = "What is in the picture?"
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": q}]}],
            "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    out = svc.complete(body)
    content = out["choices"][0]["logprobs"]["content"]
    tok, V = model.tokenizer, model.lm.config.vocab_size
    assert len(content) == out["usage"]["completion_tokens"] == 4
    # the answer's token ids: greedy generate() on the same prompt (the entries carry text, not ids)
    text = build_chat_prompt(q, 1, model.config.image_token)
    answer = model.generate(text, [img.convert("RGB")], [q], config=GenerationConfig(
        max_new_tokens=4, temperature=0.0, eos_token_id=tok.eos_token_id)).sequences[0]
    assert [e["token"] for e in content] == [tok.decode([t], skip_special_tokens=False) for t in answer]
    # oracle: the training forward over prompt + answer
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(text) + answer]), model.image_processor([img.convert("RGB")]),
                       instruction_ids=model.tokenize_instructions([q])).logits[0, :, :V]
    lp = torch.log_softmax(logits.double(), -1)[-len(answer) - 1:-1]
    for k, (e, t) in enumerate(zip(content, answer)):
        assert e["logprob"] == pytest.approx(float(lp[k, t]), abs=1e-4)
        top = lp[k].topk(3)
        assert [a["token"] for a in e["top_logprobs"]] == [tok.decode([i], skip_special_tokens=False)
                                                           for i in top.indices.tolist()]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert e["bytes"] == list(e["token"].encode())
    # without logprobs: none; errors name the field
    assert svc.complete({**body, "logprobs": False, "top_logprobs": None})["choices"][0]["logprobs"] is None
    from emma_mamba.inference.server import RequestError
    for bad, param in (({"logprobs": 1}, "logprobs"), ({"top_logprobs": 21}, "top_logprobs"),
                       ({"logprobs": False, "top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(RequestError) as e:
            svc.prepare({**body, **bad})
        assert e.value.param == param


def test_long_prompts_are_prefilled_in_bounded_forwards(svc, model, monkeypatch):
    """A prompt prefilled with nothing decoding runs at most PREFILL_CPU_CHUNK positions per forward on the CPU,
    an echoed one keeps the logits of at most ECHO_CHUNK positions at a time (both made tiny here); the
    log-probabilities and the continuation equal a full forward's / generate()'s on the whole prompt."""
    from emma_mamba.inference import batching, generate as gen

    monkeypatch.setattr(gen, "PREFILL_CPU_CHUNK", 5)
    monkeypatch.setattr(batching, "ECHO_CHUNK", 4)
    sizes = []
    real = model.lm.forward

    def forward(*a, **k):
        x = k.get("input_ids") if k.get("input_ids") is not None else k.get("inputs_embeds")
        if x is None:
            x = a[0]
        sizes.append(x.shape[1])
        return real(*a, **k)

    monkeypatch.setattr(model.lm, "forward", forward)
    tok = model.tokenizer
    ids = tok.encode("A red circle and a blue square are next to a green star on the left")
    out = svc.text_completion({"prompt": [ids], "max_tokens": 2, "logprobs": 0, "echo": True, "temperature": 0})
    assert sizes == [4, 4, 4, 4, 1]  # 16 echoed positions by 4, then one decode step
    lp = out["choices"][0]["logprobs"]
    want, _ = oracle_logprobs(model.lm, ids, tok, model.image_token_id)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), want, rtol=1e-5, atol=1e-5)
    sizes.clear()
    plain = svc.text_completion({"prompt": [ids], "max_tokens": 3, "temperature": 0})
    assert len(ids) == 16 and sizes == [5, 5, 5, 1, 1, 1]  # the prompt by 5 (5 + 5 + 5 + 1), then 2 decode steps
    monkeypatch.setattr(model.lm, "forward", real)
    res = generate(model.lm, input_ids=ids, config=GenerationConfig(max_new_tokens=3, prefill_chunk=None),
                   tokenizer=tok)
    assert plain["choices"][0]["text"] == res.texts[0]
