"""`emma-mamba serve` driven by the official ``openai`` Python client (what users and tools built on it, e.g.
lm-evaluation-harness's local-completions / local-chat-completions, point at the server): answers, streams,
choices, log-probabilities, stop strings and usage against the model's own generate() and tokenizer, errors as the
client's exception classes naming the field.

The client builds its response objects without validating them; :func:`valid` validates each one's JSON against
the client's pydantic model (OpenAI's published schema), so a field of the wrong type or a missing one fails.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.inference.server import ChatService, make_server
from emma_mamba.models.vlm import EmmaMamba, build_chat_prompt

from .test_completions import oracle_logprobs
from .test_server import CAT, user

openai = pytest.importorskip("openai")

NAME = "tiny-test"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


def _serve(model, api_key=None):
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=6), model_name=NAME, max_prompt_positions=400)
    srv = make_server(svc, "127.0.0.1", 0, api_key=api_key)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return svc, srv, f"http://127.0.0.1:{srv.server_port}/v1"


@pytest.fixture(scope="module")
def client(model):
    svc, srv, url = _serve(model)
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()
    srv.shutdown()
    srv.server_close()
    svc.close()


def valid(obj):
    """``obj`` (a response object the client built without validation) validated against its pydantic model."""
    type(obj).model_validate(obj.to_dict())
    return obj


def chat(client, messages, **kw):
    return valid(client.chat.completions.create(model=NAME, messages=messages, **kw))


def stream_chat(client, messages, **kw) -> list:
    return [valid(c) for c in client.chat.completions.create(model=NAME, messages=messages, stream=True, **kw)]


def streamed_text(chunks, index=0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


Q = "What is in the picture?"


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "seeded"])
def test_chat_plain_and_streamed_equal_generate(client, model, sampling):
    """An image as a data: URL part; the plain answer, the streamed one (reassembled) and generate() on the same
    prompt agree; usage counts the tokenizer's tokens (each image: the vision tower's tokens)."""
    t0 = int(time.time())
    out = chat(client, [user(Q)], max_tokens=5, **sampling)
    tok = model.tokenizer
    prompt = build_chat_prompt(Q, 1, model.config.image_token)
    want = model.generate(prompt, [CAT], [Q], config=GenerationConfig(max_new_tokens=5, eos_token_id=tok.eos_token_id,
                                                                      **sampling))
    if "seed" in sampling:  # sampled: the tokens depend on the exact logits (a greedy random model repeats one)
        assert len(set(want.sequences[0])) > 2
    (choice,) = out.choices
    assert choice.message.content == want.texts[0] and choice.message.role == "assistant" and choice.index == 0
    assert choice.finish_reason == ("length" if want.finish_reasons[0] == "length" else "stop")
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == NAME
    assert t0 - 1 <= out.created <= time.time() + 1
    n_prompt = len(tok.encode(prompt)) - 1 + model.vision.num_tokens  # the placeholder -> the visual tokens
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        n_prompt, len(want.sequences[0]), n_prompt + len(want.sequences[0]))

    # streamed, plain form: every chunk has a choice (so `chunk.choices[0]` works), the first the role
    chunks = stream_chat(client, [user(Q)], max_tokens=5, **sampling)
    assert all(len(c.choices) == 1 for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_text(chunks) == want.texts[0]
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [choice.finish_reason]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == NAME for c in chunks)

    # stream_options.include_usage (OpenAI's form): a last chunk with no choices and the usage, null before it
    chunks = stream_chat(client, [user(Q)], max_tokens=5, stream_options={"include_usage": True}, **sampling)
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    assert all("usage" in c.model_fields_set for c in chunks)  # present (null) in every chunk, as specified
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert streamed_text(chunks) == want.texts[0]


def test_n_choices_with_a_seed(client):
    """n = 3 sampled choices: choice i is the request alone with seed + i; streamed, each index reassembles to
    its choice and ends with its finish_reason; the usage counts every choice."""
    msgs, kw = [user("Describe it.", image=False)], {"max_tokens": 5, "temperature": 1.0}
    out = chat(client, msgs, n=3, seed=11, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [chat(client, msgs, seed=11 + i, **kw) for i in range(3)]
    assert [c.message.content for c in out.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in out.choices}) > 1
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    chunks = stream_chat(client, msgs, n=3, seed=11, stream_options={"include_usage": True}, **kw)
    for c in out.choices:
        assert streamed_text(chunks, c.index) == c.message.content
        assert [k.choices[0].finish_reason for k in chunks if k.choices and k.choices[0].index == c.index
                and k.choices[0].finish_reason] == [c.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage


def test_chat_logprobs(client):
    out = chat(client, [user(Q)], max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 4
    assert "".join(e.token for e in content) == out.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.bytes == list(e.token.encode())
        assert [a.logprob for a in e.top_logprobs] == sorted((a.logprob for a in e.top_logprobs), reverse=True)
        assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy
        assert e.logprob < 0
    bare = chat(client, [user(Q)], max_tokens=2, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert chat(client, [user(Q)], max_tokens=2).choices[0].logprobs is None


def test_stop_strings_and_max_tokens(client):
    msgs, kw = [user("Tell me more.", image=False)], {"temperature": 1.0, "seed": 5}
    full = chat(client, msgs, max_tokens=12, **kw).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full  # a visible stop string
    for s in (stop, [stop, "\x00never"]):
        out = chat(client, msgs, max_tokens=12, stop=s, **kw)
        assert out.choices[0].message.content == full[:full.index(stop)]  # cut before the stop string
        assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens < 12
    out = chat(client, msgs, max_tokens=3, **kw)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    out = chat(client, msgs, max_completion_tokens=2, **kw)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 2
    assert full.startswith(out.choices[0].message.content)


def test_system_and_developer_messages_are_dropped(client):
    msgs = [user("Hi", image=False)]
    plain = chat(client, msgs, max_tokens=3)
    for role in ("system", "developer"):
        out = chat(client, [{"role": role, "content": "Be brief."}] + msgs, max_tokens=3)
        assert out.choices[0].message.content == plain.choices[0].message.content
        assert out.emma_mamba["dropped_system_messages"] == 1
    # the "off" values of the refused tool / structured-output fields are accepted (clients send them)
    off = chat(client, msgs, max_tokens=3, tool_choice="none", response_format={"type": "text"}, modalities=["text"])
    assert off.choices[0].message.content == plain.choices[0].message.content


def test_completions_as_lm_evaluation_harness_uses_them(client, model):
    """local-completions' loglikelihood request (token ids, echo, logprobs 1, max_tokens 1) parsed as the harness
    parses it, against one full forward of the LM; its generate_until request against generate()."""
    tok = model.tokenizer
    ctx, cont = tok.encode("A red circle and a blue"), tok.encode(" square")
    out = client.completions.create(model=NAME, prompt=[ctx + cont], max_tokens=1, logprobs=1, echo=True,
                                    temperature=0, seed=1234)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == NAME
    lp = out.choices[0].logprobs
    want, _ = oracle_logprobs(model.lm, ctx + cont, tok, model.image_token_id)
    assert len(lp.token_logprobs) == len(ctx + cont) + 1 and lp.token_logprobs[0] is None  # as OpenAI's echo
    assert sum(lp.token_logprobs[len(ctx):-1]) == pytest.approx(float(want[len(ctx) - 1:].sum()), abs=1e-4)
    with torch.no_grad():
        full = model.lm(torch.tensor([ctx + cont])).logits[0, :, :model.lm.config.vocab_size]
    greedy = all(int(full[i - 1].argmax()) == (ctx + cont)[i] for i in range(len(ctx), len(ctx + cont)))
    assert greedy == all(t == max(top.values()) for t, top in zip(lp.token_logprobs[len(ctx):-1],
                                                                   lp.top_logprobs[len(ctx):-1]))
    assert out.usage.prompt_tokens == len(ctx + cont) and out.usage.completion_tokens == 1

    prompts = ["Once upon a time", "The shapes are"]
    out = valid(client.completions.create(model=NAME, prompt=prompts, max_tokens=5, temperature=0, seed=1234))
    for p, c in zip(prompts, out.choices):
        assert c.text == generate(model.lm, input_ids=tok.encode(p), tokenizer=tok, config=GenerationConfig(
            max_new_tokens=5, eos_token_id=tok.eos_token_id)).texts[0]
    assert out.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    # logprobs without echo: the completion's tokens only (a schema-valid form: no null first entry)
    out = valid(client.completions.create(model=NAME, prompt=prompts[0], max_tokens=3, logprobs=2))
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == len(prompts[0])
    # streamed: each index reassembles; the last chunk has no choices and the usage (not validated: the client
    # parses chunks as Completion, whose finish_reason is not nullable, while OpenAI's own chunks send null)
    plain = client.completions.create(model=NAME, prompt=prompts, max_tokens=5, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=prompts, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    for c in plain.choices:
        assert "".join(k.choices[0].text for k in chunks if k.choices and k.choices[0].index == c.index) == c.text
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    # without include_usage, OpenAI's documented loop (chunk.choices[0].text) reads every chunk
    text = {i: "" for i in range(len(prompts))}
    for k in client.completions.create(model=NAME, prompt=prompts, max_tokens=5, stream=True):
        text[k.choices[0].index] += k.choices[0].text
    assert [text[c.index] for c in plain.choices] == [c.text for c in plain.choices]


def test_models(client):
    (card,) = valid(client.models.list()).data
    assert card.id == NAME and card.object == "model"
    assert valid(client.models.retrieve(NAME)).id == NAME
    with pytest.raises(openai.NotFoundError, match="no such model: 'other'"):
        client.models.retrieve("other")


def test_an_api_key_server_refuses_a_wrong_key(model):
    svc, srv, url = _serve(model, api_key="s3cret")
    try:
        for key in ("wrong", "s3cre"):
            with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as c:
                with pytest.raises(openai.AuthenticationError) as e:
                    c.chat.completions.create(model=NAME, messages=[user("Hi", image=False)], max_tokens=2)
                assert e.value.status_code == 401 and e.value.type == "authentication_error"
                with pytest.raises(openai.AuthenticationError):
                    c.models.list()
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as c:
            out = c.chat.completions.create(model=NAME, messages=[user("Hi", image=False)], max_tokens=2)
            assert out.usage.completion_tokens == 2 and c.models.list().data[0].id == NAME
    finally:
        srv.shutdown()
        srv.server_close()
        svc.close()


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kw,param,match", [
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"n": 9}, "n", "n must be an integer from 1 to 8"),
    ({"max_tokens": 10 ** 6}, "max_tokens", "max_tokens must be in"),
    ({"stop": [1]}, "stop", "stop must be a string or a list"),
    ({"extra_body": {"top_k": -1}}, "top_k", "top_k must be in"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "role 'tool' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages[0].content[0].image_url.url", "http(s) image URLs are not fetched"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, "messages[0].content[0].image_url.url",
     "the image cannot be decoded"),
    # documented refusals: sampling this server lacks
    ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "stream_options.include_usage must be true or false"),
    # tool calls and structured output: refused rather than answered in plain text as if obeyed
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools",
     "tools is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "response_format is not supported"),
    # audio out: refused too (was answered in text as if heard), and stream_options without a stream (as OpenAI)
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities",
     "modalities is not supported"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio is not supported"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream_options is only allowed with stream"),
])
def test_bad_chat_requests_are_bad_request_errors_naming_the_field(client, kw, param, match):
    kw = {"messages": HI, "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, **kw)
    err = e.value
    assert err.status_code == 400 and err.param == param and err.type == "invalid_request_error"
    assert match in err.message and match in str(err)


@pytest.mark.parametrize("kw,param,match", [
    ({"prompt": "<image> what"}, "prompt", "the model's image placeholder"),
    ({"prompt": "a", "logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20]"),
])
def test_bad_completions_are_bad_request_errors_naming_the_field(client, kw, param, match):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, max_tokens=2, **kw)
    assert e.value.param == param and match in e.value.message
