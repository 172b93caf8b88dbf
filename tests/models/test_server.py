"""`emma-mamba serve`'s OpenAI-compatible API over HTTP: answers against the model's own generate() on the same
prompt, the multi-turn token stream against what training builds from the same conversation (LlavaDataset),
streaming against the plain answer, and every malformed request answered 400 naming its field."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image
import skimage
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.inference.server import ChatService, conversation_ids, make_server, parse_messages
from emma_mamba.models.vlm import EmmaMamba, build_chat_prompt

CAT = os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png")


def data_url(path=CAT):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


@pytest.fixture(scope="module")
def server(model):
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=6), model_name="tiny-test",
                      max_prompt_positions=400)
    srv = make_server(svc, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", svc
    srv.shutdown()
    srv.server_close()


def post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start_serve(model, tmp_path, *options):
    """`emma-mamba serve` of ``model`` (saved to tmp_path/ck) in a new process on a free port: (process, base URL),
    once it listens."""
    import re
    import subprocess
    import sys

    model.save(tmp_path / "ck")
    p = subprocess.Popen([sys.executable, "-m", "emma_mamba.cli", "serve", "--checkpoint", str(tmp_path / "ck"),
                          "--port", "0", *options], stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not m:
        p.kill()
        raise AssertionError(line + p.stderr.read()[-2000:])
    return p, f"http://127.0.0.1:{m.group(1)}"


def user(text, image=True):
    parts = [{"type": "image_url", "image_url": {"url": data_url()}}] if image else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def test_answer_equals_generate_on_the_same_prompt(server, model):
    url, _ = server
    # sampled (temperature 1, seeded): the tokens depend on the exact logits, so a different prompt, image or
    # instruction would show (a random tiny model's greedy answer is the same few tokens for any prompt)
    status, text = post(url, {"messages": [user("What is in the picture?")], "max_tokens": 5, "temperature": 1.0,
                              "seed": 3})
    assert status == 200
    out = json.loads(text)
    prompt = build_chat_prompt("What is in the picture?", 1, model.config.image_token)
    want = model.generate(prompt, [CAT], ["What is in the picture?"],
                          config=GenerationConfig(max_new_tokens=5, eos_token_id=model.tokenizer.eos_token_id,
                                                  temperature=1.0, seed=3))
    assert len(set(want.sequences[0])) > 2
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want.texts[0]}
    assert out["object"] == "chat.completion" and out["model"] == "tiny-test"
    n_ids = len(model.tokenizer.encode(prompt))
    assert out["usage"]["prompt_tokens"] == n_ids - 1 + model.vision.num_tokens
    assert out["usage"]["completion_tokens"] == len(want.sequences[0])
    assert out["choices"][0]["finish_reason"] == ("length" if want.finish_reasons[0] == "length" else "stop")


def test_multi_turn_stream_is_the_one_training_builds(model, tmp_path):
    # the independent oracle: LlavaDataset's tokenisation of the same conversation as a LLaVA record
    from emma_mamba.data.llava import LlavaDataset
    from emma_mamba.training.config import DataConfig

    q1, a1, q2 = "What animal is this?", "A cat.", "What colour is it?"
    rec = {"id": "x", "image": CAT, "conversations": [
        {"from": "human", "value": "<image>\n" + q1}, {"from": "gpt", "value": a1},
        {"from": "human", "value": q2}, {"from": "gpt", "value": "Orange."}]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    ds = LlavaDataset(DataConfig(json=str(tmp_path / "d.json"), max_length=4096), model.tokenizer,
                      model.config.image_token, model.image_token_id, model.vision.num_tokens)
    turns, dropped = parse_messages([{"role": "system", "content": "Be brief."}, user(q1),
                                     {"role": "assistant", "content": a1}, user(q2, image=False)], True, False)
    ids, images, instructions, history = conversation_ids(model.tokenizer, turns, model.config.image_token)
    sample = list(ds.samples[0].input_ids)
    tok = model.tokenizer
    last_answer = tok.encode("Orange." + "<|endoftext|>")
    assert ids == sample[: len(sample) - len(last_answer)] and dropped == 1
    assert len(images) == 1 and instructions == [q1]  # the image conditioned on the text of its turn
    # the history a carried state would stand for: everything before the separator of the open turn
    open_turn = tok.encode("\n") + tok.encode(f"<|user|>\n{q2}<|endoftext|>\n<|assistant|>\n")
    assert history == (len(ids) - len(open_turn), 1)


def test_a_models_own_chat_format_lays_out_the_conversation_as_its_training_did(model, tmp_path):
    """A model trained in another chat format (config.chat, written by training from data.prompt_template /
    turn_end / turn_sep) is prompted in it: the server's multi-turn stream equals LlavaDataset's tokenisation of
    the same record under that format (the oracle), and its requests stop at the format's turn_end."""
    import dataclasses

    from emma_mamba.config import ChatConfig
    from emma_mamba.data.llava import LlavaDataset
    from emma_mamba.training.config import DataConfig

    chat = ChatConfig("### Human: {prompt}\n### Assistant:", "\n###", "\n")
    q1, a1, q2 = "What animal is this?", "A cat.", "What colour is it?"
    rec = {"id": "x", "image": CAT, "conversations": [
        {"from": "human", "value": "<image>\n" + q1}, {"from": "gpt", "value": a1},
        {"from": "human", "value": q2}, {"from": "gpt", "value": "Orange."}]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    ds = LlavaDataset(DataConfig(json=str(tmp_path / "d.json"), max_length=4096, prompt_template=chat.prompt_template,
                                 turn_end=chat.turn_end, turn_sep=chat.turn_sep), model.tokenizer,
                      model.config.image_token, model.image_token_id, model.vision.num_tokens)
    turns, _ = parse_messages([user(q1), {"role": "assistant", "content": a1}, user(q2, image=False)], True, False)
    ids, _, _, _ = conversation_ids(model.tokenizer, turns, model.config.image_token, chat=chat)
    sample = list(ds.samples[0].input_ids)
    assert ids == sample[: len(sample) - len(model.tokenizer.encode("Orange." + chat.turn_end))]
    old = model.config.chat
    model.config.chat = chat
    try:
        assert model.build_prompt("Hi?", 1) == "### Human: <image>\nHi?\n### Assistant:"
        stops = model.stops(GenerationConfig(stop_strings=("x",)))
        assert list(stops.stop_strings) == ["x", "\n###"]
        assert stops.eos_token_id == model.tokenizer.eos_token_id
    finally:
        model.config.chat = old
    # the default format's turn_end is the EOS token: no stop string added
    assert list(model.stops(GenerationConfig()).stop_strings) == []
    assert dataclasses.replace(model.config.chat) == ChatConfig()


def test_consecutive_messages_of_one_role_are_one_turn(server):
    """OpenAI's API takes any order of roles (a context message, then the question): consecutive user messages are
    one turn (texts joined by a newline, images in order), as are consecutive assistant ones; an assistant content
    of null is empty. The oracle: the same conversation written as alternating messages by hand."""
    text = lambda t: {"role": "user", "content": t}  # noqa: E731
    split = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}]},
             text("Context: a cat."), text("What is it?"), {"role": "assistant", "content": "A cat."},
             {"role": "assistant", "content": None}, {"role": "assistant", "content": "Orange."}, text("Sure?")]
    joined = [user("Context: a cat.\nWhat is it?"), {"role": "assistant", "content": "A cat.\nOrange."},
              text("Sure?")]
    got, want = parse_messages(split, True, False)[0], parse_messages(joined, True, False)[0]
    assert [(t.text, len(t.images), t.answer) for t in got] == [(t.text, len(t.images), t.answer) for t in want]
    assert [(t.text, len(t.images), t.answer) for t in got] == [("Context: a cat.\nWhat is it?", 1, "A cat.\nOrange."),
                                                              ("Sure?", 0, None)]
    url, _ = server
    sampled = {"max_tokens": 5, "temperature": 1.0, "seed": 4, "n": None}  # n null: the default, 1
    a, b = (post(url, {"messages": m, **sampled}) for m in (split, joined))
    assert a[0] == b[0] == 200 and json.loads(a[1])["choices"] == json.loads(b[1])["choices"]


def test_a_base64_image_with_line_breaks_is_read(server):
    """MIME-style base64 (76-character lines, Python's base64.encodebytes) is the same image."""
    url, _ = server
    wrapped = "data:image/png;base64," + base64.encodebytes(open(CAT, "rb").read()).decode()
    assert "\n" in wrapped
    bodies = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                                         {"type": "text", "text": "What?"}]}],
               "max_tokens": 4, "temperature": 1.0, "seed": 1} for u in (wrapped, data_url())]
    a, b = (post(url, body) for body in bodies)
    assert a[0] == b[0] == 200 and json.loads(a[1])["choices"] == json.loads(b[1])["choices"]


def test_streaming_sends_the_same_answer(server):
    url, _ = server
    body = {"messages": [user("Describe it.")], "max_tokens": 6}
    plain = json.loads(post(url, body)[1])["choices"][0]["message"]["content"]
    status, text = post(url, {**body, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_system_messages_are_dropped_and_said_so(server):
    url, _ = server
    a = json.loads(post(url, {"messages": [user("Hi")]})[1])
    b = json.loads(post(url, {"messages": [{"role": "system", "content": "You are helpful."}, user("Hi")]})[1])
    assert a["choices"] == b["choices"] and b["emma_mamba"]["dropped_system_messages"] == 1


@pytest.mark.parametrize("role", ["system", "developer"])
def test_an_image_in_a_system_message_is_400_not_dropped(server, role):
    """An image in a system message went out with the message, unseen by the model and unsaid but for a count:
    a 400 naming the message and saying where images go. A text-only system message is dropped as before."""
    url, _ = server
    system = {"role": role, "content": [{"type": "text", "text": "Look at this:"},
                                        {"type": "image_url", "image_url": {"url": data_url()}}]}
    status, text = post(url, {"messages": [system, user("Hi")]})
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "messages[0].content[1]", err
    assert f"messages[0] is a {role} message" in err["message"] and "not given to the model" in err["message"]
    assert "send images in user messages" in err["message"]
    status, text = post(url, {"messages": [user("Hi"), {"role": "assistant", "content": "Hello."},
                                           {**system, "content": [{"type": "text", "text": "Be brief."}]},
                                           user("Again", image=False)]})
    assert status == 200 and json.loads(text)["emma_mamba"]["dropped_system_messages"] == 1


@pytest.mark.parametrize("body,param,match", [
    ({}, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "role 'robot' is not supported"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages",
     "the last message must be a user message"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "messages[0].role",
     "must start with a user message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages[0].content[0].image_url.url", "not fetched"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": CAT}}]}]},
     "messages[0].content[0].image_url.url", "local image paths are refused"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, "messages[0].content[0].image_url.url",
     "cannot be decoded"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]", "content part"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n", "n must be an integer from 1 to 8"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": "2"}, "n", "n must be an integer from 1 to 8"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n", "n must be an integer from 1 to 8"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, "max_tokens", "must be in"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature", "must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop", "stop must be a string"),
    # bounded: every token's text meets every stop string on the decoder's thread, which serves every request (3000
    # stops of 3000 characters slowed another request 25x)
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 65}, "stop",
     "stop takes at most 64 strings of at most 4096 characters in all, got 65 of 65"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["y" * 2000, "z" * 2097]}, "stop", "got 2 of 4097"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"messages": [user("x " * 500, image=False)]}, "messages", "more than this server's max_prompt_positions 400"),
    # the placeholder text is reserved in every message's text (the tokenizer would read it as an image slot)
    ({"messages": [{"role": "user", "content": "<image> what shape"}]}, "messages[0].content",
     "holds '<image>', the model's image placeholder: that text is reserved"),
    ({"messages": [user("<image>\nwhat shape")]}, "messages[0].content[1].text", "reserved"),
    ({"messages": [user("a"), {"role": "assistant", "content": "see <image>"}, user("b")]}, "messages[1].content",
     "reserved"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream",
     "stream must be true or false, got 'yes'"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": 1}, "stream", "stream must be true or false"),
    # sampling controls this server lacks: refused, not silently ignored
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, "presence_penalty",
     "presence_penalty is not supported by this server"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -1}, "frequency_penalty", "send 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 100}}, "logit_bias", "send {}"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 3}, "min_tokens", "not supported"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param, match):
    url, _ = server
    status, text = post(url, body)
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == param and match in err["message"], err


def test_unsupported_sampling_fields_at_their_off_values_are_accepted(server):
    url, _ = server
    status, _ = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "presence_penalty": 0,
                           "frequency_penalty": 0.0, "logit_bias": {}, "min_tokens": 0})
    assert status == 200


def test_other_endpoints_and_malformed_json(server):
    import time

    url, svc = server
    status, text = post(url, None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-test"
    # the decoder counts a finished answer's row out after its step, a moment after the answer was sent (an
    # earlier test's last request): wait for it to be idle, so that /health has nothing to report but its limits
    dec, deadline = svc.decoder, time.perf_counter() + 30
    while (dec.active or dec.pending or dec.queue.qsize()) and time.perf_counter() < deadline:
        time.sleep(0.001)
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok", "decoding": 0, "prefilling": 0, "queued": 0, "max_batch": 8,
                                        "prefill_chunk": 512}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v2/nothing")
    assert e.value.code == 404


def test_text_only_lm_and_local_images(model):
    tok = model.tokenizer
    svc = ChatService(model.lm, tokenizer=tok, defaults=GenerationConfig(max_new_tokens=4))
    out = svc.complete({"messages": [{"role": "user", "content": "Hello there"}]})
    ids = tok.encode("<|user|>\nHello there<|endoftext|>\n<|assistant|>\n")
    want = generate(model.lm, input_ids=ids, config=GenerationConfig(max_new_tokens=4, eos_token_id=tok.eos_token_id),
                    tokenizer=tok)
    assert out["choices"][0]["message"]["content"] == want.texts[0]
    from emma_mamba.inference.server import RequestError

    with pytest.raises(RequestError, match="text-only language model: it takes no images"):
        svc.complete({"messages": [user("What is it?")]})
    local = ChatService(model, defaults=GenerationConfig(max_new_tokens=3), allow_local_images=True)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": CAT}},
                                                      {"type": "text", "text": "What is it?"}]}]}
    via_path = local.complete(body)["choices"]
    body["messages"][0]["content"][0]["image_url"]["url"] = data_url()
    assert local.complete(body)["choices"] == via_path  # a local path reads the same image as its data URL


def test_the_command_serves_a_checkpoint(model, tmp_path):
    import subprocess
    import sys

    p, url = start_serve(model, tmp_path, "--max-new-tokens", "3")
    try:
        status, text = post(url, {"messages": [user("What is in the picture?")]})
        out = json.loads(text)
        assert status == 200 and out["model"] == "ck" and out["usage"]["completion_tokens"] <= 3
        direct = ChatService(model, defaults=GenerationConfig(max_new_tokens=3)).complete(
            {"messages": [user("What is in the picture?")]})
        assert out["choices"] == direct["choices"]
    finally:
        p.terminate()
        p.wait(timeout=30)
    r = subprocess.run([sys.executable, "-m", "emma_mamba.cli", "serve", "--checkpoint", str(tmp_path / "ck"),
                        "--image", CAT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "each request brings its own images" in r.stderr


def _first_kept_answer(svc, messages, **kw):
    """A sampled answer that the service kept a state for (its text tokenises back to the generated tokens: for
    a random model's random tokens that holds for some seeds only); deterministic: the first such seed."""
    for seed in range(40):
        before = list(svc.states)
        out = svc.complete({"messages": messages, "temperature": 1.0, "seed": seed, **kw})
        if list(svc.states) != before:  # a new state, last in the LRU
            return out, seed
    raise AssertionError("no seed gave an answer that tokenises back to its tokens")


def test_state_cache_continues_a_conversation_with_only_the_new_turn_prefilled(model):
    cached = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), state_cache=4)
    plain = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), state_cache=0)
    first = [user("What animal is this?")]
    a, seed = _first_kept_answer(cached, first, max_tokens=4)
    assert a["emma_mamba"]["state_cache"] == "miss"
    a1 = a["choices"][0]["message"]["content"]
    # the follow-up, with a new image in its turn: prefills the pending tokens and the new turn only
    follow = first + [{"role": "assistant", "content": a1}, user("And now?")]
    for k in range(2):  # twice: the stored state is copied, not consumed
        b = cached.complete({"messages": follow, "temperature": 1.0, "seed": seed + 100, "max_tokens": 4})
        ref = plain.complete({"messages": follow, "temperature": 1.0, "seed": seed + 100, "max_tokens": 4})
        assert b["emma_mamba"]["state_cache"] == "hit" and ref["emma_mamba"]["state_cache"] == "miss"
        assert b["choices"] == ref["choices"]  # the same tokens as prefilling the whole history
        assert b["usage"] == ref["usage"]
        new_turn = len(model.tokenizer.encode("\n<|user|>\n<image>\nAnd now?<|endoftext|>\n<|assistant|>\n"))
        assert b["emma_mamba"]["prefilled_positions"] <= new_turn + model.vision.num_tokens + 2
        assert ref["emma_mamba"]["prefilled_positions"] == ref["usage"]["prompt_tokens"] > 2 * model.vision.num_tokens
    # an edited history or another image misses and prefills everything, with the same answer as without cache
    edited = first + [{"role": "assistant", "content": a1 + " x"}, user("And now?")]
    other = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
        os.path.join(os.path.dirname(CAT), "astronaut.png"))}}, {"type": "text", "text": "What animal is this?"}]},
        {"role": "assistant", "content": a1}, user("And now?")]
    for msgs in (edited, other):
        b = cached.complete({"messages": msgs, "max_tokens": 3})
        assert b["emma_mamba"]["state_cache"] == "miss"
        assert b["choices"] == plain.complete({"messages": msgs, "max_tokens": 3})["choices"]
    # LRU: a cache of one state forgets the first conversation after another
    one = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), state_cache=1)
    a, seed = _first_kept_answer(one, first, max_tokens=4)
    _first_kept_answer(one, [user("Something else?", image=False)], max_tokens=4)
    follow = first + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]}, user("And now?")]
    assert one.complete({"messages": follow, "max_tokens": 2})["emma_mamba"]["state_cache"] == "miss"


def test_a_state_cache_hit_penalises_the_whole_conversation(model):
    """With a repetition penalty the answer depends on every token seen so far: a hit (only the new turn
    prefilled) must count the whole conversation as seen, as the miss does (it counted the new turn only). A
    random LM with noisy weights, whose greedy answers come back to the conversation's tokens."""
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    tok = model.tokenizer
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=len(tok), d_state=8, tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cached = ChatService(lm, tokenizer=tok, defaults=GenerationConfig(max_new_tokens=12), state_cache=16)
    plain = ChatService(lm, tokenizer=tok, defaults=GenerationConfig(max_new_tokens=12), state_cache=0)
    changed = 0
    for q in ("Hello there", "What is a cat?", "Tell me a story", "Why is the sky blue?"):
        first = [{"role": "user", "content": q}]
        a = cached.complete({"messages": first, "max_tokens": 4})["choices"][0]["message"]["content"]
        follow = first + [{"role": "assistant", "content": a}, {"role": "user", "content": "Again please"}]
        answers = []
        for penalty in (1.0, 5.0):
            body = {"messages": follow, "repetition_penalty": penalty, "max_tokens": 12}
            b, ref = cached.complete(body), plain.complete(body)
            assert b["emma_mamba"]["state_cache"] == "hit" and ref["emma_mamba"]["state_cache"] == "miss"
            assert b["choices"] == ref["choices"], (q, penalty)
            answers.append(ref["choices"][0]["message"]["content"])
        changed += answers[0] != answers[1]
    assert changed  # the penalty changes answers here: the comparisons above can fail
    cached.close()
    plain.close()


def test_a_client_leaving_mid_stream_stops_its_answer_and_frees_the_server(server):
    import socket
    import time

    url, svc = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [user("Tell a long story.", image=False)], "stream": True, "max_tokens": 3000,
                       "temperature": 1.0, "seed": 0}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    first = b""
    while b"data: " not in first:
        first += sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")
    sock.close()  # gone mid-answer
    t0 = time.perf_counter()
    status, _ = post(url, {"messages": [user("Hi", image=False)], "max_tokens": 2})
    assert status == 200  # the abandoned answer left the batch at its next chunk
    assert time.perf_counter() - t0 < 30
    deadline = time.perf_counter() + 10
    while svc.decoder.active and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert svc.decoder.active == 0


def test_api_key(model):
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=2))
    srv = make_server(svc, "127.0.0.1", 0, api_key="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    body = json.dumps({"messages": [user("Hi", image=False)]}).encode()
    try:
        for headers, want in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                              ({"Authorization": "Bearer s3cret"}, 200)):
            req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
                assert json.loads(e.read())["error"]["type"] == "authentication_error"
            assert status == want, headers
        with urllib.request.urlopen(url + "/health") as r:  # health checks need no key
            assert r.status == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_n_choices_continue_one_prefill(server, model):
    """n = 3 sampled choices with a seed: choice i is the answer of the same request alone with seed + i (one
    prefill: the decoder forks its state), usage counts every choice's tokens; n greedy choices are equal."""
    url, svc = server
    body = {"messages": [user("Describe the picture.")], "max_tokens": 6, "temperature": 1.0, "seed": 11}
    status, text = post(url, {**body, "n": 3})
    assert status == 200
    out = json.loads(text)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    alone = [json.loads(post(url, {**body, "seed": 11 + i})[1]) for i in range(3)]
    assert [c["message"] for c in out["choices"]] == [a["choices"][0]["message"] for a in alone]
    assert len({c["message"]["content"] for c in out["choices"]}) > 1
    assert out["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert out["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    assert out["emma_mamba"]["batch_rows"] == 3
    greedy = json.loads(post(url, {"messages": [user("Colour?")], "max_tokens": 5, "n": 2})[1])
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]
    # streamed: each index's deltas concatenate to its choice, each index ends with its finish_reason
    status, raw = post(url, {**body, "n": 3, "stream": True})
    assert status == 200
    events = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")]
    assert raw.rstrip().endswith("data: [DONE]")
    for c in out["choices"]:
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == c["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(m["delta"].get("content", "") for m in mine) == c["message"]["content"]
        assert [m["finish_reason"] for m in mine if m["finish_reason"]] == [c["finish_reason"]]
    assert events[-1]["usage"] == out["usage"]


def post_to(url, path, body=None, raw=None):
    """(status, body text) of a POST to ``path``."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("body,param,match", [
    ({"prompt": "<image> what shape", "max_tokens": 2}, "prompt", "holds '<image>', the model's image placeholder"),
    ({"prompt": ["a cat", "<image>"], "max_tokens": 2}, "prompt[1]", "takes no images"),
    ({"prompt": "a cat", "max_tokens": 2, "stream": "yes"}, "stream", "stream must be true or false"),
])
def test_text_completions_refuse_the_placeholder_and_bad_flags(server, body, param, match):
    url, _ = server
    status, text = post_to(url, "/v1/completions", body)
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == param and match in err["message"], err


def test_text_completions_refuse_the_placeholder_id(server, model):
    # as a token id it would read an embedding row never trained (its slot is always replaced by visual tokens)
    url, _ = server
    ids = model.tokenizer.encode("a cat") + [model.image_token_id]
    status, text = post_to(url, "/v1/completions", {"prompt": ids, "max_tokens": 2})
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "prompt" and f"token id {model.image_token_id}" in err["message"]


def test_a_text_only_lm_reads_the_placeholder_text_as_words(model):
    # a text-only LM's own tokenizer has no placeholder token: "<image>" is ordinary text to it
    from emma_mamba.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    svc = ChatService(model.lm, tokenizer=tok, defaults=GenerationConfig(max_new_tokens=2))
    try:
        out = svc.complete({"messages": [{"role": "user", "content": "<image> what shape"}]})
        assert out["usage"]["prompt_tokens"] == len(tok.encode("<|user|>\n<image> what shape<|endoftext|>\n"
                                                                "<|assistant|>\n"))
    finally:
        svc.close()


def _raw_request(url, head: bytes, body: bytes = b"") -> bytes:
    """Send a hand-written request (headers urllib would not send) and read the reply until the server closes."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("length", [b"abc", b"-5", b"1e3"])
def test_a_bad_content_length_is_400(server, length):
    url, _ = server
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    reply = _raw_request(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                              b"\r\nContent-Length: " + length, body)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"\r\nConnection: close" in head, reply[:300]
    err = json.loads(payload)["error"]
    assert f"the Content-Length header {length.decode()!r} is not a byte count" in err["message"]
    assert post(url, {"messages": [user("Hi", image=False)], "max_tokens": 2})[0] == 200  # still serving


def _bomb_png(tmp_path):
    """A 20000 x 10000 1-bit PNG (~24 KB): more than twice PIL's default MAX_IMAGE_PIXELS."""
    from PIL import Image

    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(path)
    return path


def test_a_decompression_bomb_image_is_400(server, model, tmp_path):
    from emma_mamba.inference.server import RequestError

    url, _ = server
    bomb = _bomb_png(tmp_path)
    status, text = post(url, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(bomb)}}, {"type": "text", "text": "What is it?"}]}]})
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "messages[0].content[0].image_url.url", err
    assert "DecompressionBombError" in err["message"]
    local = ChatService(model, defaults=GenerationConfig(max_new_tokens=2), allow_local_images=True)
    try:  # a local path goes through load_image: its error names the file and the limit
        with pytest.raises(RequestError, match="decompression-bomb limit") as e:
            local.complete({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(bomb)}}, {"type": "text", "text": "What?"}]}]})
        assert e.value.status == 400 and e.value.param == "messages[0].content[0].image_url.url"
        assert str(bomb) in str(e.value)
    finally:
        local.close()


def test_a_client_gone_before_the_answer_is_one_log_line(model, caplog, capsys):
    """socketserver prints a traceback for any exception a handler lets through; answering a client that has
    left raises one (e.g. a 400 written to a reset connection): logged in one line instead. Other errors keep
    their traceback."""
    import logging

    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=2))
    srv = make_server(svc, "127.0.0.1", 0)
    try:
        for gone in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "Connection reset by peer")):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="emma_mamba.inference.server"):
                try:
                    raise gone
                except OSError:
                    srv.handle_error(None, ("203.0.113.7", 5555))
            assert [r.getMessage() for r in caplog.records] == [
                f"203.0.113.7 disconnected before the response was sent ({type(gone).__name__})"]
            assert capsys.readouterr().err == ""
        try:
            raise RuntimeError("a real bug")
        except RuntimeError:
            srv.handle_error(None, ("203.0.113.7", 5555))
        assert "Traceback" in capsys.readouterr().err
    finally:
        srv.server_close()
        svc.close()


@pytest.mark.parametrize("probe", [True, False])
def test_a_port_in_use_names_host_and_port(model, monkeypatch, capsys, probe):
    """Refused before the model loads (a bind probe); a port taken while it loads is reported the same way."""
    import socket

    from emma_mamba import cli
    from emma_mamba.inference import cli_serve

    if not probe:  # the port is taken after the probe: make_server's own bind fails
        monkeypatch.setattr(cli_serve, "_check_listen", lambda host, port: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = cli.main(["serve", "--random-init", "tiny", "--port", str(port), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}: the port is already in use" in err, err
    assert "choose another --port" in err and "Errno" not in err
    assert ("random weights" in err) is not probe  # the probe fails before the model is built


def test_a_port_out_of_range_is_named(capsys):
    from emma_mamba import cli

    assert cli.main(["serve", "--random-init", "tiny", "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535, got 70000" in capsys.readouterr().err


def _png_url(w, h, colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_request_too_long_for_its_images_is_refused_before_any_is_decoded(server, monkeypatch):
    """Defect: every image of a request was decoded (8 one-colour 8000x8000 PNGs: +2.4 GB) before the length
    check refused it. The positions are counted from the parts first; nothing is decoded."""
    from emma_mamba.inference import server as srv
    from emma_mamba.inference.server import RequestError

    _, svc = server

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(srv, "_decode_image", no_decoding)
    parts = [{"type": "image_url", "image_url": {"url": _png_url(8, 8)}} for _ in range(30)]
    with pytest.raises(RequestError, match="positions long .* more than this server's max_prompt_positions 400"):
        svc.complete({"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "Compare."}]}]})


def test_a_requests_images_share_one_pixel_budget(model, monkeypatch):
    """Each image under PIL's bomb limit, but many of them: the request's pixels in all are bounded (twice the
    limit), read from the headers before decoding. Here the limit is lowered to 1000 pixels: 30x30 images (900),
    two fit the 2000-pixel budget, the third is refused by name."""
    from PIL import Image as PILImage

    from emma_mamba.inference.server import RequestError

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=2))
    try:
        two = [{"type": "image_url", "image_url": {"url": _png_url(30, 30)}} for _ in range(2)]
        assert svc.complete({"messages": [{"role": "user", "content": two + [{"type": "text", "text": "Hi"}]}]})
        three = two + [{"type": "image_url", "image_url": {"url": _png_url(30, 30, (0, 0, 255))}}]
        with pytest.raises(RequestError, match=r"images hold more than 2,000 pixels in all \(this one is 30x30\)") as e:
            svc.complete({"messages": [{"role": "user", "content": three + [{"type": "text", "text": "Hi"}]}]})
        assert e.value.param == "messages[0].content[2].image_url.url"
    finally:
        svc.close()


def test_an_image_the_encoders_resize_cannot_take_is_a_400(server):
    """A 1 x 20000 PNG (a few hundred bytes) took the tiny model's server from 840 MiB to 2 GB (its 32-pixel
    'shortest' resize makes 32 x 640000 pixels) and answered 200. A 400 naming the part now, before any work."""
    url, _ = server
    status, text = post(url, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": _png_url(1, 20000)}}]}]})
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "messages[0].content[1].image_url.url", err
    assert "a 1x20000 image (aspect ratio 20000:1) would be resized to 32x640000 pixels" in err["message"]
