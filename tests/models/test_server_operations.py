"""`emma-mamba serve` as an operator meets it: a request value that used to kill the decoder thread (and with it
every answer being decoded) is a 400; should the thread fail anyway, every request it held fails instead of
waiting forever; bodies that are not UTF-8, hold a lone surrogate, nest too deeply or come chunked are refused by
name; many clients connecting at once are all served; the API key's scheme is case-insensitive; and SIGTERM stops
the server as Ctrl-C does, each open stream ending with an error event and [DONE]."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig
from emma_mamba.inference.server import ChatService, RequestError, _parse_body, make_server
from emma_mamba.models.vlm import EmmaMamba
from tests.models.test_server import start_serve, user


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


@pytest.fixture()
def live(model):
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), model_name="tiny-test",
                      max_prompt_positions=400)
    srv = make_server(svc, "127.0.0.1", 0, api_key="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", svc, srv
    srv.shutdown()
    srv.server_close()
    svc.close()


def _post(url, body: bytes, headers: dict):
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


AUTH = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}


def _read_all(s: socket.socket) -> str:
    """Everything the server sends on ``s`` until it closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out.decode()


def test_a_seed_beyond_64_bits_is_a_400_and_the_decoder_lives_on(live):
    """seed 2**64 passed validation and then overflowed torch.Generator.manual_seed inside the decoder thread: the
    request never got an answer and a stream decoding beside it stopped. Now a 400 naming the range (with n
    choices, seed + n - 1 must fit too), and requests after it are answered."""
    url, svc, _ = live
    msg = {"messages": [user("hi", image=False)], "temperature": 1.0}
    for seed, n in ((2 ** 64, 1), (-(2 ** 70), 1), (2 ** 63 - 1, 2)):
        status, out = _post(url, json.dumps({**msg, "seed": seed, "n": n}).encode(), AUTH)
        assert status == 400 and out["error"]["param"] == "seed", out
        assert f"seed must be in [{-(2 ** 63)}, {2 ** 63 - 1 - (n - 1)}]" in out["error"]["message"]
    status, out = _post(url, json.dumps({**msg, "seed": 2 ** 63 - 1}).encode(), AUTH)  # the largest: answered
    assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(ValueError, match=r"GenerationConfig\.seed must be None or an integer in"):
        GenerationConfig(seed=2 ** 64)


def test_a_failing_decoder_thread_fails_the_requests_it_holds(model, monkeypatch):
    """Whatever escapes the decoder loop (a bug) fails every request it held, with the error, instead of leaving
    them waiting forever while /health says ok; a request that cannot get its row fails alone."""
    from emma_mamba.inference import batching

    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=3))
    try:
        real_row = batching.BatchDecoder._row
        calls = []

        def bad_row(self, job, *a, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("this request's row cannot be made")
            return real_row(self, job, *a, **kw)

        monkeypatch.setattr(batching.BatchDecoder, "_row", bad_row)
        with pytest.raises(ValueError, match="row cannot be made"):
            svc.complete({"messages": [user("one", image=False)]})
        assert svc.complete({"messages": [user("two", image=False)]})["choices"]  # the decoder lives on
        monkeypatch.setattr(batching.BatchDecoder, "_advance",
                            lambda self, *a: (_ for _ in ()).throw(KeyboardInterrupt()))  # escapes `except Exception`
        with pytest.raises(RuntimeError, match="the decoder failed: KeyboardInterrupt"):
            svc.complete({"messages": [user("three", image=False)]})
    finally:
        svc.close()


@pytest.mark.parametrize("raw,message", [
    (b'{"messages": "caf\xe9"}', r"not UTF-8 text \(byte 17: b'\\xe9'\)"),
    (b'{"messages": [{"role": "user", "content": "caf\\ud800"}]}', r"lone UTF-16 surrogate \('\\ud800'\)"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bodies_no_parser_should_take_are_400s_naming_why(raw, message):
    with pytest.raises(RequestError, match=message) as e:
        _parse_body(raw)
    assert e.value.status == 400


def test_malformed_bodies_over_http_and_the_auth_scheme(live):
    url, _, _ = live
    status, out = _post(url, b'{"messages": [{"role": "user", "content": "caf\\ud800"}]}', AUTH)
    assert status == 400 and "surrogate" in out["error"]["message"]
    status, out = _post(url, json.dumps({"messages": [user("hi", image=False)], "stop": ""}).encode(), AUTH)
    assert status == 400 and out["error"]["param"] == "stop", out
    # top_p below float32's range compared as 0 and dropped every token: a 500 ("probability tensor contains nan")
    status, out = _post(url, json.dumps({"messages": [user("hi", image=False)], "top_p": 1e-300,
                                         "temperature": 1.0, "seed": 0}).encode(), AUTH)
    greedy = _post(url, json.dumps({"messages": [user("hi", image=False)], "temperature": 0}).encode(), AUTH)[1]
    assert status == 200 and out["choices"][0]["message"] == greedy["choices"][0]["message"], out
    # a query string on an endpoint (Azure-style ?api-version=) was a 404
    req = urllib.request.Request(url + "/v1/chat/completions?api-version=2024-06-01", headers=AUTH,
                                 data=json.dumps({"messages": [user("hi", image=False)]}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and json.loads(r.read())["choices"]
    with urllib.request.urlopen(url + "/health?probe=1", timeout=60) as r:
        assert r.status == 200
    # a lowercase scheme is the same scheme (RFC 9110); a 401 says which scheme it wants
    status, out = _post(url, json.dumps({"messages": [user("hi", image=False)]}).encode(),
                        {**AUTH, "Authorization": "bearer s3cret"})
    assert status == 200, out
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == 'Bearer realm="emma-mamba"'
    # a chunked body (no length): 411, not "the request body must be a JSON object"
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                  b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        reply = _read_all(s)
    assert reply.startswith("HTTP/1.1 411") and "Content-Length header" in reply, reply[:300]
    assert "\r\nConnection: close\r\n" in reply  # its unread body is no next request: the connection ends


def test_many_clients_connecting_at_once_are_all_served(live):
    """socketserver's listen backlog of 5 reset connections when more clients came at once (lm-eval's
    num_concurrent=8, a browser's parallel requests): 24 connections opened together are all answered."""
    url, _, srv = live
    assert srv.request_queue_size >= 64
    host, port = url.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port)), timeout=60) for _ in range(24)]
    try:
        for s in socks:
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        replies = [_read_all(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    # (an HTTP/1.0 request: answered, then the connection is closed, which _read_all waits for)
    assert all(r.startswith("HTTP/1.1 200") for r in replies), [r[:40] for r in replies]


def test_sigterm_stops_the_server_and_ends_open_streams(model, tmp_path):
    """SIGTERM (docker stop, systemd) killed the server at once, open streams ending without [DONE], and Ctrl-C
    logged a traceback per stream. Both now stop the same way: one line, each open stream ends with an error event
    saying the server is stopping and [DONE], exit code 0."""
    p, url = start_serve(model, tmp_path, "--max-tokens-limit", "100000")
    try:
        body = json.dumps({"messages": [user("hi", image=False)], "stream": True, "max_tokens": 100000,
                           "temperature": 1.0, "seed": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for raw in r:
                text = raw.decode().strip()
                if not text:
                    continue
                events.append(text)
                if len(events) == 3:  # answering: stop the server
                    p.terminate()
        rc = p.wait(timeout=60)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, err
    assert "emma-mamba serve: stopping; 1 request(s) in progress are cut off" in err, err
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["error"]["message"] == "the server is stopping: this answer was cut off", last
    assert "Traceback" not in err


def test_completions_controls_this_server_lacks_are_refused(live):
    """best_of and suffix were silently ignored on /v1/completions (the README says unsupported controls are a
    400, not ignored); serve --max-new-tokens 0 started and then refused every request without max_tokens."""
    url, _, _ = live
    for field, value in (("best_of", 3), ("suffix", "end")):
        req = urllib.request.Request(url + "/v1/completions", headers=AUTH,
                                     data=json.dumps({"prompt": "a b", "max_tokens": 2, field: value}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        out = json.loads(e.value.read())
        assert e.value.code == 400 and out["error"]["param"] == field, out
    from emma_mamba import cli

    assert cli.main(["serve", "--random-init", "tiny", "--max-new-tokens", "0"]) == 2


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_client_that_gives_up_on_a_plain_answer_frees_its_row(model, route):
    """A non-streamed request whose client went away (a timeout, a closed tab, a killed harness) kept its batch
    rows until every requested token was decoded; clients that time out and retry piled such rows up. The rows
    are freed within a fraction of a second of the client closing the connection (/v1/completions: both prompts
    of the request)."""
    import time

    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=4), max_new_tokens_limit=1_000_000)
    srv = make_server(svc, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ask = ({"messages": [user("hi", image=False)]} if route == "/v1/chat/completions"
               else {"prompt": ["hi", "there"]})
        body = json.dumps({**ask, "max_tokens": 1_000_000, "temperature": 1.0, "seed": 0}).encode()
        s = socket.create_connection(("127.0.0.1", srv.server_port), timeout=30)
        s.sendall(b"POST " + route.encode() + b" HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 60
        while svc.decoder.active == 0:  # decoding
            assert time.time() < deadline, "the request never started decoding"
            time.sleep(0.05)
        s.close()  # the client gives up
        deadline = time.time() + 30
        while svc.decoder.active:
            assert time.time() < deadline, "the abandoned request is still decoding"
            time.sleep(0.05)
        assert srv.wait_for_requests(timeout=30) == 0  # its handler ended too
    finally:
        srv.shutdown()
        srv.server_close()
        svc.close()
