"""`emma-mamba serve`'s chat page (GET /): served (also without the API key, which it asks the user for), off with
web_ui=False, and its own client code, run in Node against a live server, gets the answers the service gives the
same conversation: an image with the first question, a follow-up, sampling settings, an error named."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig
from emma_mamba.inference.server import ChatService, make_server
from emma_mamba.models.vlm import EmmaMamba
from tests.models.test_server import data_url

PAGE = Path(__file__).resolve().parents[2] / "emma_mamba" / "assets" / "webui.html"


@pytest.fixture(scope="module")
def svc():
    torch.manual_seed(0)
    model = EmmaMamba(get_preset("tiny"), for_training=False).eval()
    s = ChatService(model, defaults=GenerationConfig(max_new_tokens=6), model_name="tiny-test")
    yield s
    s.close()


def serve(svc, **kw):
    srv = make_server(svc, "127.0.0.1", 0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_port}"


def _node_against(svc, argv, timeout=120, env=None):
    """Runs ``node *argv(url)`` against a server of ``svc`` started for it; the finished process (exit 0 asserted,
    with the end of its stderr)."""
    srv, url = serve(svc)
    try:
        r = subprocess.run(["node", *argv(url)], capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_the_page_is_served_without_the_key_and_can_be_turned_off(svc):
    srv, url = serve(svc, api_key="s3cret")
    try:
        with urllib.request.urlopen(url + "/") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            page = r.read().decode()
        assert page == PAGE.read_text() and "/v1/chat/completions" in page
        with pytest.raises(urllib.error.HTTPError) as e:  # the API itself still needs the key
            urllib.request.urlopen(url + "/v1/models")
        assert e.value.code == 401
    finally:
        srv.shutdown()
        srv.server_close()
    srv, url = serve(svc, web_ui=False)
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/")
        assert e.value.code == 404
    finally:
        srv.shutdown()
        srv.server_close()


NODE_SCRIPT = """
const core = require(process.argv[2]);
const base = process.argv[3];
const image = require("fs").readFileSync(process.argv[4], "utf8");
(async () => {
  const out = {};
  const settings = {max_tokens: "7", temperature: "1", top_p: "0.9", seed: "5"};
  const first = {role: "user", text: "What is in the picture?", image};
  out.body1 = core.buildRequest([first], settings);
  const deltas = [];
  out.r1 = await core.streamChat(base, out.body1, null, (d) => deltas.push(d));
  out.deltas = deltas;
  const history = [first, {role: "assistant", text: out.r1.text}, {role: "user", text: "And its colour?"}];
  out.body2 = core.buildRequest(history, {max_tokens: 5, temperature: "", seed: null});
  out.r2 = await core.streamChat(base, out.body2, null, () => {});
  try {
    await core.streamChat(base, core.buildRequest([first], {max_tokens: 0}), null, () => {});
    out.err = null;
  } catch (e) { out.err = e.message; }
  const [events, rest] = core.parseEvents('data: {"a": 1}\\n\\ndata: [DONE]\\n\\ndata: {"b"');
  out.parsed = [events, rest];
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (the page's client code runs in it)")
def test_the_pages_client_code_gets_the_services_answers(svc, tmp_path):
    page = PAGE.read_text()
    core = re.search(r"// ---- core begin.*?\n(.*)// ---- core end", page, re.S).group(1)
    (tmp_path / "core.js").write_text(core)
    (tmp_path / "run.js").write_text(NODE_SCRIPT)
    (tmp_path / "image.txt").write_text(data_url())
    r = _node_against(svc, lambda url: [str(tmp_path / "run.js"), str(tmp_path / "core.js"), url,
                                        str(tmp_path / "image.txt")])
    out = json.loads(r.stdout)
    # the request the page builds: the image with the first question, settings as numbers, streamed
    assert out["body1"]["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": data_url()}}
    assert (out["body1"]["max_tokens"], out["body1"]["temperature"], out["body1"]["top_p"], out["body1"]["seed"],
            out["body1"]["stream"]) == (7, 1, 0.9, 5, True)
    assert "temperature" not in out["body2"] and "seed" not in out["body2"]
    for body, res in ((out["body1"], out["r1"]), (out["body2"], out["r2"])):
        want = svc.complete({k: v for k, v in body.items() if k != "stream"})
        assert res["text"] == want["choices"][0]["message"]["content"]
        assert res["finish_reason"] == want["choices"][0]["finish_reason"] and res["usage"] == want["usage"]
    assert "".join(out["deltas"]) == out["r1"]["text"] and len(out["deltas"]) >= 2
    assert "max_tokens" in out["err"]  # the server's 400 message reaches the page
    assert out["parsed"] == [['{"a": 1}', "[DONE]"], 'data: {"b"']


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_the_whole_page_script_parses_and_runs_without_a_dom(tmp_path):
    """The page's UI code (not run above: it needs a browser) at least parses, and loading it outside a browser
    only defines the client functions."""
    script = re.search(r"<script>(.*)</script>", PAGE.read_text(), re.S).group(1)
    (tmp_path / "page.js").write_text(script)
    r = subprocess.run(["node", "--check", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["node", "-e", f"const m = require({json.dumps(str(tmp_path / 'page.js'))}); "
                                      "console.log(Object.keys(m).sort().join(','))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "buildRequest,parseEvents,streamChat", r.stderr


def _jsdom() -> bool:
    if shutil.which("node") is None:
        return False
    return subprocess.run(["node", "-e", "require('jsdom')"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _jsdom(), reason="needs Node.js with jsdom (npm install jsdom; NODE_PATH)")
def test_the_page_in_jsdom_holds_a_conversation_as_the_service_does(svc):
    """The whole page (its DOM code too) in jsdom against a live server: the model name shown, an image picked and
    previewed, a question and a follow-up sent through the form; the answers shown are the service's for the same
    conversation and settings, and the follow-up continued the server's cached state."""
    from tests.models.test_server import CAT, user

    r = _node_against(svc, lambda url: [str(Path(__file__).with_name("webui_drive.js")), url, CAT])
    out = json.loads(r.stdout)
    assert out["model"] == "model: tiny-test" and out["preview"].startswith("data:image/png;base64,")
    body = {"max_tokens": 6, "temperature": 1, "seed": 3}
    a1 = svc.complete({"messages": [user("What is in the picture?")], **body})["choices"][0]["message"]["content"]
    second = svc.complete({"messages": [user("What is in the picture?"), {"role": "assistant", "content": a1},
                                        {"role": "user", "content": "And its colour?"}], **body})
    shown = [t for c, t in out["turns"] if c == "turn assistant"]
    assert shown == [a1, second["choices"][0]["message"]["content"]]
    assert [t for c, t in out["turns"] if c == "turn user"] == ["What is in the picture?", "And its colour?"]
    assert second["emma_mamba"]["state_cache"] == "hit"


@pytest.mark.skipif(not _jsdom(), reason="needs Node.js with jsdom (npm install jsdom; NODE_PATH)")
def test_the_model_name_shows_once_the_key_is_entered_and_an_ime_enter_does_not_send(svc):
    """Against a server with an API key: the label asks for the key, and shows the model once it is entered (it was
    asked once, at load, and said "needs the API key" for good); Enter confirming an input method's composition
    (CJK input: isComposing) does not send the half-typed question, a plain Enter then does."""
    srv, url = serve(svc, api_key="s3cret")
    try:
        r = subprocess.run(["node", str(Path(__file__).with_name("webui_key_drive.js")), url, "s3cret"],
                           capture_output=True, text=True, timeout=120)
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["before"] == "model: (needs the API key)" and out["after"] == "model: tiny-test"
    assert out["composing"] == 0 and out["sent"] == 1


def _chromium() -> str | None:
    """A Chromium that puppeteer-core (requirable from Node) can drive: $CHROMIUM or chromium on PATH."""
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None or shutil.which("node") is None:
        return None
    ok = subprocess.run(["node", "-e", "require('puppeteer-core')"], capture_output=True).returncode == 0
    return exe if ok else None


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium and Node.js with puppeteer-core "
                                                "(npm install puppeteer-core; NODE_PATH; CHROMIUM)")
def test_the_page_in_a_real_browser_holds_a_conversation_as_the_service_does(svc, tmp_path):
    """The page in headless Chromium against a live server: an image picked through the file input, a question
    typed and sent with Enter, then a follow-up; no script error; the answers shown are the service's for the
    same conversation and settings (the follow-up continued the server's cached state)."""
    from tests.models.test_server import CAT, user

    r = _node_against(svc, lambda url: [str(Path(__file__).with_name("webui_browser.js")), url, CAT,
                                        str(tmp_path / "page.png")], timeout=180,
                      env=dict(os.environ, CHROMIUM=_chromium()))
    out = json.loads(r.stdout)
    assert out["errors"] == [] and out["model"] == "model: tiny-test"
    assert out["preview"].startswith("data:image/png;base64,")
    body = {"max_tokens": 6, "temperature": 1, "seed": 3}
    a1 = svc.complete({"messages": [user("What is in the picture?")], **body})["choices"][0]["message"]["content"]
    second = svc.complete({"messages": [user("What is in the picture?"), {"role": "assistant", "content": a1},
                                        {"role": "user", "content": "And its colour?"}], **body})
    assert [t for c, t in out["turns"] if c == "turn assistant"] == [a1, second["choices"][0]["message"]["content"]]
    assert [t for c, t in out["turns"] if c == "turn user"] == ["What is in the picture?", "And its colour?"]
    assert second["emma_mamba"]["state_cache"] == "hit"
    assert (tmp_path / "page.png").stat().st_size > 0


@pytest.mark.skipif(not _jsdom(), reason="needs Node.js with jsdom (npm install jsdom; NODE_PATH)")
def test_a_reset_while_an_answer_streams_leaves_it_out_of_the_new_conversation(svc):
    """"New conversation" (or another image picked) while an answer is on its way starts the next conversation
    empty: the late answer and its question must not join it (they were sent with the next question, unseen in
    the cleared log, and the new image then never went with it: the model answered about the old one)."""
    from tests.models.test_server import CAT

    other = os.path.join(os.path.dirname(CAT), "astronaut.png")
    r = _node_against(svc, lambda url: [str(Path(__file__).with_name("webui_reset_drive.js")), url, CAT, other])
    out = json.loads(r.stdout)
    cat, astronaut = data_url()[:80], data_url(other)[:80]
    # the oracle: a fresh conversation is the new question alone, with the image picked (the one now shown)
    assert out["after_new"]["body"] == [["user", "Second question?", cat]]
    assert out["after_image"]["body"] == [["user", "Fourth question?", astronaut]]
    for phase, question in (("after_new", "Second question?"), ("after_image", "Fourth question?")):
        shown = out[phase]["turns"]
        assert [c for c, _ in shown] == ["turn user", "turn assistant", "turn meta"] and shown[0][1] == question


@pytest.mark.skipif(not _jsdom(), reason="needs Node.js with jsdom (npm install jsdom; NODE_PATH)")
def test_a_failed_answer_on_screen_is_not_part_of_the_conversation(svc, monkeypatch):
    """A question whose answer failed (the server broke it off with an error event after some text, or refused the
    request) is not sent with the next question; the page kept the question and the partial answer on screen as
    if they were part of the conversation, so what the user saw and what the model was given disagreed. The
    conversation shown (user and assistant turns not marked failed) must be the messages the next request sends."""
    from tests.models.test_server import CAT

    real, calls = svc.answer, []

    def breaks_off_the_first(prepared, streamer=None, on_chunk=None):
        calls.append(1)
        if len(calls) == 1:  # a server error mid-answer: some text streamed, then the handler's error event
            on_chunk(0, "A partial ")
            on_chunk(0, "answer")
            raise RuntimeError("the decoder failed")
        return real(prepared, streamer=streamer, on_chunk=on_chunk)

    monkeypatch.setattr(svc, "answer", breaks_off_the_first)
    r = _node_against(svc, lambda url: [str(Path(__file__).with_name("webui_error_drive.js")), url, CAT])
    out = json.loads(r.stdout)
    cat = data_url()[:80]

    def conversation(shown):
        return [[c.split()[1], t] for c, t in shown if c in ("turn user", "turn assistant")]

    questions = ["First question?", "Second question?", "Third question?", "Fourth question?"]
    for q, step in zip(questions, out["asked"]):
        body = step["body"]
        assert body[-1][:2] == ["user", q]
        assert [m[:2] for m in body[:-1]] == conversation(step["shown"]), (q, step)
    # after the broken-off answer the conversation starts afresh: the next question alone, with the image
    assert out["asked"][1]["body"] == [["user", "Second question?", cat]]
    failed = [(c, t) for c, t in out["asked"][1]["shown"] if "failed" in c.split()]
    assert failed == [("turn user failed", "First question?"), ("turn assistant failed", "A partial answer")]
    assert any(c == "turn error" and "the decoder failed" in t for c, t in out["asked"][1]["shown"])
    # the refused question (no text came) is marked too, and the conversation goes on without it
    a2 = conversation(out["asked"][3]["shown"])[1][1]
    assert out["asked"][3]["body"] == [["user", "Second question?", cat], ["assistant", a2, None],
                                       ["user", "Fourth question?", None]]
    assert ("turn user failed", "Third question?") in [tuple(x) for x in out["asked"][3]["shown"]]
    assert any(c == "turn error" and "max_tokens" in t for c, t in out["asked"][3]["shown"])
