"""`emma-mamba serve`'s HTTP layer: HEAD on the GET endpoints, CORS when asked for (``--cors-origin``) and none
otherwise, and HTTP/1.1 keep-alive: several requests on one connection (http.client, the ``openai`` client), a
stream ending its connection, a body refused unread ending it too (its bytes are no next request), idle
connections closed after the keep-alive timeout and at once when the server stops."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import signal
import socket
import threading
import time

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig
from emma_mamba.inference.server import ChatService, cors_origin, make_server
from emma_mamba.models.vlm import EmmaMamba
from tests.models.test_server import start_serve, user

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT = json.dumps({"messages": [user("hi", image=False)], "max_tokens": 3}).encode()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


@contextlib.contextmanager
def _serving(model, model_name="tiny-test", **kw):
    """A server on a free port, in a thread, for the block: (server, connections accepted); stopped after."""
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=3), model_name=model_name,
                      max_prompt_positions=400)
    srv = make_server(svc, "127.0.0.1", 0, **kw)
    accepted = []  # one entry per connection the server accepted
    process = srv.process_request
    srv.process_request = lambda request, address: (accepted.append(address), process(request, address))[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv, accepted
    finally:
        srv.shutdown()
        srv.server_close()
        svc.close()


@pytest.fixture()
def live(model):
    """A server with an API key and CORS for one origin: (server, connections accepted)."""
    with _serving(model, api_key=KEY, cors_origins=["https://app.example:8443"]) as both:
        yield both


@pytest.fixture()
def plain(model):
    """A server without an API key or CORS (as `emma-mamba serve` starts by default)."""
    with _serving(model) as both:
        yield both


def _conn(srv) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=60)


def _ask(c: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, headers=None):
    """(response, body bytes) of one request on ``c``."""
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r, r.read()


def _raw(srv, data: bytes) -> bytes:
    """Everything the server sends on a new connection after ``data``, until it closes the connection (a close
    with bytes of ours left unread resets the connection after what was sent)."""
    with socket.create_connection(("127.0.0.1", srv.server_port), timeout=60) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def _headers(r) -> dict:
    return {k: v for k, v in r.getheaders() if k != "Date"}


# ------------------------------------------------------------------ HEAD


def test_head_answers_as_get_without_the_body(live):
    """HEAD on /health, /v1/models (with and without the key) and the chat page was a 501: now GET's status and
    headers (Content-Length included) with no body, and the connection goes on (a body sent after the headers
    would be read as the next response, which then fails to parse)."""
    srv, accepted = live
    c = _conn(srv)
    for path, headers, status in (("/health", {}, 200), ("/v1/models", AUTH, 200), ("/v1/models", {}, 401),
                                  ("/", {}, 200), ("/no-such-page", AUTH, 404)):
        got, body = _ask(c, "GET", path, headers=headers)
        head, nothing = _ask(c, "HEAD", path, headers=headers)
        assert (got.status, head.status) == (status, status), path
        assert nothing == b"" and _headers(head) == _headers(got), path
        assert int(head.headers["Content-Length"]) == len(body) > 0, path
    assert _ask(c, "GET", "/health")[0].status == 200  # the same connection: no stray body bytes in it
    assert len(accepted) == 1
    c.close()


# ------------------------------------------------------------------ CORS


def test_cors_origin_values_are_checked():
    assert cors_origin("HTTPS://App.Example:8443") == "https://app.example:8443"  # as browsers send it
    assert cors_origin("*") == "*" and cors_origin("http://[::1]:3000") == "http://[::1]:3000"
    for bad, why in (("example.com", "give its scheme, e.g. 'https://example.com'"),
                     ("https://example.com/", "an origin has no path (browsers send 'https://example.com')"),
                     ("https://example.com:99999", "port 99999 is above 65535"),
                     ("https://exa mple.com", "scheme://host[:port]"), ("", "give its scheme")):
        with pytest.raises(ValueError, match=re.escape(why)):
            cors_origin(bad)
    with pytest.raises(ValueError, match=r"make_server: cors_origins: 'example\.com' is not an origin"):
        make_server(None, "127.0.0.1", 0, cors_origins=["example.com"])


def test_a_bad_cors_origin_is_refused_before_the_model_loads(capsys):
    from emma_mamba import cli

    assert cli.main(["serve", "--random-init", "tiny", "--cors-origin", "https://ok.example",
                     "--cors-origin", "example.com"]) == 2
    err = capsys.readouterr().err
    assert "emma-mamba serve: error: --cors-origin: 'example.com' is not an origin: give its scheme" in err, err
    assert "random weights" not in err  # refused before the model is built


def test_cors_preflight_and_headers_for_an_allowed_origin_only(live):
    """A page of an allowed origin: its preflight is answered without the API key (browsers send none with it),
    allowing the methods and headers the API takes (and the ones the page asks for: clients add their own); every
    response to it, errors and streams included, carries Access-Control-Allow-Origin. Another origin gets no CORS
    header: its preflight is a 403, and so is its POST (a browser sends a text/plain POST without a preflight)."""
    srv, _ = live
    page = "https://app.example:8443"
    c = _conn(srv)
    pre, body = _ask(c, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": page, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert pre.status == 204 and body == b""
    assert pre.headers["Access-Control-Allow-Origin"] == page and pre.headers["Vary"] == "Origin"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    allowed = [h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")]
    assert {"authorization", "content-type", "x-stainless-os"} <= set(allowed)
    assert int(pre.headers["Access-Control-Max-Age"]) > 0
    for method, path, headers, status in (("GET", "/v1/models", AUTH, 200), ("GET", "/v1/models", {}, 401),
                                          ("HEAD", "/health", {}, 200), ("POST", "/v1/chat/completions", AUTH, 200)):
        r, _ = _ask(c, method, path, CHAT if method == "POST" else None, {**headers, "Origin": page})
        assert r.status == status and r.headers["Access-Control-Allow-Origin"] == page, (method, path)
        assert r.headers["Vary"] == "Origin"
    stream = json.dumps({"messages": [user("hi", image=False)], "max_tokens": 3, "stream": True}).encode()
    r, text = _ask(c, "POST", "/v1/chat/completions", stream, {**AUTH, "Origin": page})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == page
    assert text.decode().rstrip().endswith("data: [DONE]")
    other = "https://evil.example"
    pre, body = _ask(c, "OPTIONS", "/v1/chat/completions",
                     headers={"Origin": other, "Access-Control-Request-Method": "POST"})
    assert pre.status == 403 and other in json.loads(body)["error"]["message"]
    assert not any(k.lower().startswith("access-control-") for k in pre.headers), pre.getheaders()
    r, body = _ask(c, "POST", "/v1/chat/completions", CHAT, {**AUTH, "Origin": other})
    assert r.status == 403 and not any(k.lower().startswith("access-control-") for k in r.headers)
    assert other in json.loads(body)["error"]["message"]
    c.close()


def test_a_page_of_another_site_cannot_make_the_server_answer(model):
    """A web page the user opens can POST to their local server without a preflight (a form, or fetch with
    text/plain): it made the server generate, unseen (and with --allow-local-images read local images). A POST
    whose Origin is neither the server's own (its chat page, also behind a proxy passing X-Forwarded-Host) nor
    allowed is a 403 before anything is read or generated; clients outside a browser (no Origin) are answered.
    No page may frame the server's (X-Frame-Options, CSP frame-ancestors), nor sniff its answers' types."""
    with _serving(model) as (srv, _):
        svc = srv.RequestHandlerClass.service
        calls, complete = [], svc.complete
        svc.complete = lambda *a, **k: (calls.append(1), complete(*a, **k))[1]
        own = f"http://127.0.0.1:{srv.server_port}"
        for headers, status in (({"Origin": "https://evil.example", "Content-Type": "text/plain"}, 403),
                                ({"Origin": "null"}, 403),
                                ({"Origin": "https://chat.example.com", "X-Forwarded-Host": "chat.example.com"}, 200),
                                ({"Origin": own}, 200), ({}, 200)):
            r, body = _ask(_conn(srv), "POST", "/v1/chat/completions", CHAT, headers)
            assert r.status == status, (headers, body)
        assert len(calls) == 3  # the refused ones never reached the model
        r, page = _ask(_conn(srv), "GET", "/")
        assert r.status == 200 and r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_cors_any_origin(model):
    with _serving(model, cors_origins=["*"]) as (srv, _):
        c = _conn(srv)
        for origin in ("http://localhost:5173", "null"):  # "null": a page opened from a file
            r, _ = _ask(c, "OPTIONS", "/v1/models", headers={"Origin": origin,
                                                             "Access-Control-Request-Method": "GET"})
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == origin
        c.close()


def test_without_cors_origins_no_cors_headers_and_options_is_405(plain):
    srv, _ = plain
    c = _conn(srv)
    r, body = _ask(c, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert r.status == 405 and r.headers["Allow"] == "GET, HEAD, POST, OPTIONS"
    assert "--cors-origin" in json.loads(body)["error"]["message"]
    for method, path, status in (("GET", "/health", 200), ("POST", "/v1/chat/completions", 403)):
        r, _ = _ask(c, method, path, CHAT if method == "POST" else None,
                    {"Origin": "https://app.example", "Content-Type": "application/json"})
        assert r.status == status  # a POST from another site's page: refused (see the test below)
        assert not any(k.lower().startswith("access-control-") or k == "Vary" for k in r.headers), r.getheaders()
    c.close()


# ------------------------------------------------------------------ keep-alive


def test_requests_share_one_connection_and_a_stream_ends_it(plain):
    """HTTP/1.0 closed the connection after every response: now a plain answer, an error (its body read) and the
    GET endpoints keep it open, each with its Content-Length; a stream has none and ends the connection
    (``Connection: close``), and the next request opens a new one."""
    srv, accepted = plain
    c = _conn(srv)
    r, body = _ask(c, "GET", "/health")
    assert r.version == 11 and not r.will_close and int(r.headers["Content-Length"]) == len(body)
    sock = c.sock
    r, body = _ask(c, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
    answer = json.loads(body)["choices"][0]["message"]["content"]
    assert r.status == 200 and not r.will_close and int(r.headers["Content-Length"]) == len(body)
    r, body = _ask(c, "POST", "/v1/chat/completions", b'{"messages": []}', {"Content-Type": "application/json"})
    assert r.status == 400 and not r.will_close and json.loads(body)["error"]["param"] == "messages"
    r, body = _ask(c, "POST", "/v1/chat/completions", b"not json", {"Content-Type": "application/json"})
    assert r.status == 400 and not r.will_close and "not valid JSON" in json.loads(body)["error"]["message"]
    r, _ = _ask(c, "GET", "/v1/models")
    assert r.status == 200 and c.sock is sock  # five requests, one connection
    assert srv.wait_for_requests(timeout=30) == 0 and srv.open_connections() == 1  # idle, waiting for the next
    stream = json.loads(CHAT) | {"stream": True}
    r, text = _ask(c, "POST", "/v1/chat/completions", json.dumps(stream).encode(), {"Content-Type": "application/json"})
    assert r.status == 200 and r.will_close and r.headers["Connection"] == "close"
    assert "Content-Length" not in r.headers
    events = [json.loads(e[6:]) for e in text.decode().split("\n\n") if e.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == answer
    assert text.decode().rstrip().endswith("data: [DONE]")
    assert _ask(c, "GET", "/health")[0].status == 200
    assert len(accepted) == 2
    c.close()


def test_the_openai_client_reuses_its_connection(plain):
    """The ``openai`` client (httpx) keeps one connection over plain requests, reads a stream that ends its
    connection, and opens a new one after it."""
    openai = pytest.importorskip("openai")
    srv, accepted = plain
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_port}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    messages = [user("hi", image=False)]
    try:
        answers = [client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=3)
                   .choices[0].message.content for _ in range(2)]
        assert [m.id for m in client.models.list()] == ["tiny-test"]
        assert len(accepted) == 1
        chunks = list(client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=3,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == answers[0] == answers[1]
        after = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=3)
        assert after.choices[0].message.content == answers[0]
        assert client.completions.create(model="tiny-test", prompt="a b", max_tokens=2).choices
        assert len(accepted) == 2  # the stream's connection closed; the rest share the new one
    finally:
        client.close()


@pytest.mark.parametrize("case", ["401", "413", "411", "404", "bad length"])
def test_a_body_refused_unread_ends_the_connection(model, case):
    """A request refused before its body is read leaves that body in the connection: read as the next request,
    it would be answered as one (here the body is itself a request, which would show as a second response).
    The connection is closed after the refusal instead; a refused request whose body was read keeps it."""
    with _serving(model, api_key=KEY) as (srv, _):
        srv.RequestHandlerClass.max_body_bytes = 64
        smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        length = {"413": b"Content-Length: 100", "bad length": b"Content-Length: 1e3"}.get(case, b"Content-Length: "
                                                                                          + str(len(smuggled)).encode())
        path = b"/v1/nowhere" if case == "404" else b"/v1/chat/completions"
        auth = b"" if case == "401" else b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        if case == "411":
            length, body = b"Transfer-Encoding: chunked", b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n"
        else:
            body = smuggled + b" " * (100 - len(smuggled)) if case == "413" else smuggled
        reply = _raw(srv, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + auth + length + b"\r\n\r\n" + body
                     + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status = {"bad length": "400"}.get(case, case)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
        assert reply.count(b"HTTP/1.1 ") == 1 and b"\r\nConnection: close\r\n" in reply, reply
        # a 400 whose body was read: the connection goes on to the next request
        bad = b'{"messages": 1}'
        reply = _raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(bad) + bad
                     + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ") and reply.count(b"HTTP/1.1 ") == 2, reply
        assert b'"status": "ok"' in reply


def test_idle_connections_are_closed_after_the_timeout_and_at_stop(model):
    """A keep-alive connection waiting for its next request holds a server thread: the server closes it after
    ``keep_alive_timeout`` seconds, and at once when it stops (not after the timeout)."""
    with _serving(model, keep_alive_timeout=0.2) as (srv, _):
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=60) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while b'"status": "ok"' not in reply:
                reply += s.recv(65536)
            assert b"Connection: close" not in reply
            assert s.recv(65536) == b""  # closed by the server, idle
        deadline = time.time() + 30
        while srv.open_connections():
            assert time.time() < deadline, "the idle connection's thread did not end"
            time.sleep(0.01)
    with _serving(model, keep_alive_timeout=3600) as (srv, _):  # its stop closes the idle connection at once
        c = _conn(srv)
        assert _ask(c, "GET", "/health")[0].status == 200
        assert srv.wait_for_requests(timeout=30) == 0 and srv.open_connections() == 1  # idle
    assert c.sock.recv(1) == b""  # (c's timeout is 60 s: a connection left open would raise here)
    assert srv.wait_for_requests(timeout=30) == 0
    c.close()


def test_a_stalled_upload_is_a_408_and_frees_its_thread(model):
    """A client that sends its headers and part of the body, then nothing: after ``io_timeout`` seconds it gets a
    408 saying so and the connection ends (it held a server thread and a socket for ever); a whole request on
    another connection is answered meanwhile."""
    with _serving(model, io_timeout=0.5) as (srv, _):
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=60) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"messages\":")
            r, raw = _ask(_conn(srv), "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
            assert r.status == 200 and json.loads(raw)["choices"]
            t0 = time.time()
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in reply, reply
            assert b"the request body stopped arriving (nothing for 0.5 s)" in reply
            assert time.time() - t0 < 30
        deadline = time.time() + 30
        while srv.open_connections():
            assert time.time() < deadline, "the stalled connection's thread did not end"
            time.sleep(0.01)
    with pytest.raises(ValueError, match="io_timeout must be > 0 seconds"):
        make_server(None, io_timeout=0)


def test_a_stream_whose_client_stops_reading_is_dropped_once_quietly(model, caplog):
    """A streamed answer's client that stops reading: the write that waits io_timeout ends the request, logged once
    at INFO (no ERROR traceback, no error event written into the same stalled socket for a second wait)."""
    with _serving(model, io_timeout=1.0) as (srv, _):
        svc = srv.RequestHandlerClass.service

        def answer(prepared, on_chunk):  # an endless stream of 1 MB chunks
            for _ in range(1000):
                on_chunk(0, "x" * (1 << 20))
            return {}

        svc.answer = answer
        body = json.loads(CHAT)
        body["stream"] = True
        data = json.dumps(body).encode()
        with caplog.at_level("INFO", logger="emma_mamba.inference.server"):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", srv.server_port))
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(data) + data)
                deadline = time.time() + 60
                while not srv.open_connections():
                    time.sleep(0.01)
                t0 = time.time()
                while srv.open_connections():  # never reading
                    assert time.time() < deadline, "the stalled stream was not dropped"
                    time.sleep(0.05)
                took = time.time() - t0
        assert took < 1.9, took  # one io_timeout, not two
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
        assert "stopped reading its answer for 1 s" in caplog.text


def test_a_plain_request_cut_off_by_the_stop_is_a_503_not_a_failure(model, caplog):
    """A plain (not streamed) request the stopping decoder cuts off gets a 503 saying the server is stopping, as a
    stream gets its error event: not a 500 and a logged traceback per request."""
    from emma_mamba.inference.batching import DecoderClosed

    with _serving(model) as (srv, _):
        def closed(*a, **k):
            raise DecoderClosed("the decoder is closed")

        srv.RequestHandlerClass.service.complete = closed
        with caplog.at_level("INFO", logger="emma_mamba.inference.server"):
            r, raw = _ask(_conn(srv), "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
        assert r.status == 503, raw
        assert json.loads(raw)["error"]["message"] == "the server is stopping: this request was not answered"
        assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]


def test_requests_beyond_the_concurrency_limit_are_a_429(model):
    """With ``max_concurrent_requests`` answers in progress, one more generation request is refused at once with a
    429 and ``Retry-After`` (not queued behind them for minutes); GET endpoints are not counted; once an answer is
    done the next request is taken."""
    with _serving(model, max_concurrent_requests=1) as (srv, _):
        svc = srv.RequestHandlerClass.service
        entered, go, complete = threading.Event(), threading.Event(), svc.complete

        def slow(*a, **k):
            entered.set()
            assert go.wait(60)
            return complete(*a, **k)

        svc.complete = slow
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", _ask(_conn(srv), "POST", "/v1/chat/completions",
                                                                         CHAT, {"Content-Type": "application/json"})))
        t.start()
        assert entered.wait(60)
        r, raw = _ask(_conn(srv), "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
        assert r.status == 429 and r.getheader("Retry-After") == "1", raw
        assert "the server is busy: 1 requests are being answered" in json.loads(raw)["error"]["message"]
        assert _ask(_conn(srv), "GET", "/health")[0].status == 200
        # a client still uploading its body holds no place: it is counted in once its body is read
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=60) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            go.set()
            t.join(60)
            assert first["r"][0].status == 200
            assert _ask(_conn(srv), "POST", "/v1/chat/completions", CHAT,
                        {"Content-Type": "application/json"})[0].status == 200
        go.set()
        t.join(60)
        assert first["r"][0].status == 200
        assert _ask(_conn(srv), "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})[0] \
            .status == 200
    with pytest.raises(ValueError, match="max_concurrent_requests must be >= 1"):
        make_server(None, max_concurrent_requests=0)


def test_a_client_asking_again_on_reading_its_answer_keeps_its_place(model, caplog):
    """A request's place among ``max_concurrent_requests`` is given back before its answer's last bytes are written:
    a client that sends its next request on reading its answer (plain or streamed) is never refused for the place
    its own last request held, however late the answering thread gets to run again (here: held 0.3 s in
    ``release``; on the old order, release after the write, the next request was a 429). A client that closes its
    connection mid-upload is no request: nothing is admitted, parsed or answered."""
    with _serving(model, max_concurrent_requests=1) as (srv, _):
        release = srv.release
        srv.release = lambda: (time.sleep(0.3), release())[-1]
        stream = json.dumps({"messages": [user("hi", image=False)], "max_tokens": 3, "stream": True}).encode()
        for body in (CHAT, stream, CHAT, stream):  # each on a connection of its own (another handler thread)
            r, raw = _ask(_conn(srv), "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            assert r.status == 200, raw
        assert b"data: [DONE]" in raw
        srv.release = release
        with caplog.at_level(logging.INFO, logger="emma_mamba.inference.server"):
            with socket.create_connection(("127.0.0.1", srv.server_port), timeout=60) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{")
                s.shutdown(socket.SHUT_WR)
                assert s.recv(100) == b""  # closed without an answer
            deadline = time.monotonic() + 30
            while "closed its connection 1 bytes into a 100-byte request body" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.05)
        assert srv._admitted == 0 and not re.search(r'" [45]\d\d -', caplog.text), caplog.text  # none refused


def test_serve_stops_promptly_with_an_idle_connection_open_and_serves_cors(model, tmp_path):
    """`emma-mamba serve --cors-origin ...` end to end: a stream to the allowed page's origin carries the CORS
    header; SIGTERM with an idle keep-alive connection open stops at once, counting no request as cut off (the
    idle connection is closed, not waited for). `--model-name` with an alias: both listed, the first reported."""
    p, url = start_serve(model, tmp_path, "--cors-origin", "https://app.example", "--max-new-tokens", "3",
                         "--model-name", "served", "alias")
    try:
        c = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        r, raw = _ask(c, "GET", "/v1/models")
        assert r.status == 200 and [m["id"] for m in json.loads(raw)["data"]] == ["served", "alias"]
        r, _ = _ask(c, "GET", "/health")
        assert r.status == 200 and not r.will_close  # an idle keep-alive connection from here on
        s = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        stream = json.dumps({"messages": [user("hi", image=False)], "stream": True, "model": "alias"}).encode()
        r, text = _ask(s, "POST", "/v1/chat/completions", stream, {"Origin": "https://app.example"})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert text.decode().rstrip().endswith("data: [DONE]")  # read to the close: that request has ended
        assert '"model": "served"' in text.decode()
        s.close()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
        err = p.stderr.read()
        assert c.sock.recv(1) == b""  # closed by the stopping server
        c.close()
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, err
    assert "emma-mamba serve: stopping\n" in err and "cut off" not in err, err
    assert "still being handled" not in err and "Traceback" not in err, err


def test_an_over_long_body_still_reads_its_413_as_a_client_uploading_it(model):
    """A client uploading a body over the limit (a large image) must read the 413, not a reset connection:
    closing a socket with unread bytes in it sends a TCP reset, which discards the answer not yet read. The
    server reads and drops the rest of the upload (for a while) before closing. As an HTTP client does it:
    the whole body sent, then the answer read."""
    with _serving(model) as (srv, _):
        srv.RequestHandlerClass.max_body_bytes = 1024
        body = b"x" * (8 << 20)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", srv.server_port), timeout=60) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body))
                s.sendall(body)  # a BrokenPipe / reset here fails the test too: the server stopped reading
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            assert out.startswith(b"HTTP/1.1 413 "), out[:200]
            assert b"more than 1024" in out and b"\r\nConnection: close\r\n" in out


def test_the_wrong_method_is_a_405_naming_the_right_one(plain):
    srv, _ = plain
    c = _conn(srv)
    try:
        for method, path, allow in (("GET", "/v1/chat/completions", "POST"), ("HEAD", "/v1/completions/", "POST"),
                                    ("GET", "/tokenize", "POST"), ("POST", "/health", "GET, HEAD"),
                                    ("POST", "/v1/models", "GET, HEAD"), ("POST", "/v1/models/tiny-test", "GET, HEAD")):
            r, body = _ask(c, method, path, b"{}" if method == "POST" else None)
            assert r.status == 405 and r.headers["Allow"] == allow, (method, path, r.status, body)
            if method != "HEAD":
                assert f"this endpoint takes {allow.split(',')[0]}" in json.loads(body)["error"]["message"]
        r, _ = _ask(c, "GET", "/v1/nowhere")
        assert r.status == 404
        r, _ = _ask(c, "POST", "/v1/nowhere", b"{}")
        assert r.status == 404
    finally:
        c.close()


def test_a_request_for_another_model_is_a_404_and_aliases_are_served(model):
    """A request naming a model this server does not serve (meant for another server: an eval pointed at the wrong
    port) was answered by this model under that name. It is refused as OpenAI's API and vLLM refuse it (404, code
    model_not_found, naming what is served), on every generating and tokenizer endpoint; the names given with
    --model-name after the first are aliases (listed by /v1/models after the reported id) and answer as it does;
    a request without "model" is this model's."""
    openai = pytest.importorskip("openai")
    with _serving(model, model_name=("tiny-test", "alias")) as (srv, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_port}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        messages = [user("hi", image=False)]
        try:
            with pytest.raises(openai.NotFoundError) as e:
                client.chat.completions.create(model="llava-v1.5-7b", messages=messages, max_tokens=3)
            assert e.value.code == "model_not_found" and e.value.status_code == 404
            assert "'llava-v1.5-7b' does not exist here: this server serves 'tiny-test' or 'alias'" in str(e.value)
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="llava-v1.5-7b", prompt="a b", max_tokens=2)
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("llava-v1.5-7b")
            assert [m.id for m in client.models.list()] == ["tiny-test", "alias"]
            assert client.models.retrieve("alias").id == "alias"
            want = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=3)
            got = client.chat.completions.create(model="alias", messages=messages, max_tokens=3)
            assert got.choices[0].message.content == want.choices[0].message.content and got.model == "tiny-test"
        finally:
            client.close()
        c = _conn(srv)
        for path, body in (("/tokenize", {"prompt": "a b"}), ("/detokenize", {"tokens": [1, 2]})):
            r, raw = _ask(c, "POST", path, json.dumps({**body, "model": "other"}).encode(),
                          {"Content-Type": "application/json"})
            assert r.status == 404 and json.loads(raw)["error"]["code"] == "model_not_found", (path, raw)
            r, raw = _ask(c, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            assert r.status == 200, (path, raw)
        r, raw = _ask(c, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})  # no "model"
        assert r.status == 200 and json.loads(raw)["model"] == "tiny-test"
        c.close()


def test_a_local_image_path_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    """--allow-local-images: a FIFO (or /proc/self/fd/0, a pipe) as an image path; opening it waited for a writer
    for ever, holding a handler and its place among max_concurrent_requests (enough such requests locked every
    client out). A path that is not a regular file is a 400 at once; a folder too."""
    import os

    from emma_mamba.inference.server import RequestError, _decode_image

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    got = {}

    def decode():
        try:
            _decode_image(str(fifo), "messages[0].content[0]", True)
        except RequestError as e:
            got["error"] = str(e)

    t = threading.Thread(target=decode, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # (the old behaviour: let the stuck open go before failing)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert "is not a regular file" in got.get("error", ""), got
    with pytest.raises(RequestError, match="is not a regular file"):
        _decode_image(f"file://{tmp_path}", "messages[0].content[0]", True)


def test_a_file_url_names_a_path_on_this_machine(tmp_path, monkeypatch):
    """file:///p and file://localhost/p (RFC 8089) name /p; file://localhost/p was read as the relative path
    localhost/p, and a URL of another host likewise: refused now, naming the host."""
    from PIL import Image

    from emma_mamba.inference.server import RequestError, _decode_image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)  # a relative localhost/... would be looked for here
    for url in (f"file://{tmp_path}/cat.png", f"file://localhost{tmp_path}/cat.png", str(tmp_path / "cat.png")):
        assert _decode_image(url, "m", True).size == (8, 8), url
    with pytest.raises(RequestError, match="not on host 'fileserver'"):
        _decode_image(f"file://fileserver{tmp_path}/cat.png", "m", True)


def test_a_number_too_long_to_read_and_too_many_prompts_are_400s(model):
    """A 5000-digit integer (beyond Python's 4300-digit conversion limit) was a 500 with a logged traceback; a
    /v1/completions request of 20000 prompts (100 KB) queued them all at once, holding the decoder for minutes:
    prompts x n is bounded (MAX_PROMPTS)."""
    from emma_mamba.inference.server import MAX_PROMPTS

    with _serving(model) as (srv, _):
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}"
        r, body = _ask(_conn(srv), "POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
        assert r.status == 400 and "a number too long to read" in json.loads(body)["error"]["message"]
        for prompts, n, what in ((MAX_PROMPTS + 1, 1, f"more than {MAX_PROMPTS} in one request"),
                                 (MAX_PROMPTS // 2 + 1, 2, "x n=2")):
            req = json.dumps({"prompt": ["a"] * prompts, "max_tokens": 1, "n": n}).encode()
            r, body = _ask(_conn(srv), "POST", "/v1/completions", req, {"Content-Type": "application/json"})
            assert r.status == 400 and what in json.loads(body)["error"]["message"], body[:300]


def test_a_client_gone_is_seen_while_many_short_jobs_finish_one_by_one():
    """_await checked for a client gone only when one job took over a quarter second: a request of many short
    jobs, each done within it, was waited out to the last (a 20000-prompt request's client left, and its prompts
    kept the decoder busy). Now the client is looked at every quarter second of wall time."""
    import types

    from emma_mamba.inference.server import _await

    jobs = [types.SimpleNamespace(done=threading.Event(), cancelled=False) for _ in range(100)]

    def finish_one_by_one():
        for j in jobs:
            time.sleep(0.05)
            j.done.set()

    threading.Thread(target=finish_one_by_one, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):
        _await(jobs, lambda: True)
    assert time.monotonic() - t0 < 2.0 and all(j.cancelled for j in jobs)
    done = [types.SimpleNamespace(done=threading.Event(), cancelled=False) for _ in range(3)]
    for j in done:
        j.done.set()
    _await(done, lambda: True)  # all done: nothing to cancel, no error
