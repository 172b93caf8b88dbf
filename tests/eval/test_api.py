"""`emma-mamba eval --api URL`: a model behind an OpenAI-compatible endpoint (here `emma-mamba serve`'s) is scored
exactly like the same checkpoint run locally: the answers files are equal, so are the metrics."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from emma_mamba.eval.api import ApiError, api_answer_fn
from emma_mamba.eval.runner import LikelihoodUnavailable, evaluate
from tests.eval.test_runner import shapes  # noqa: F401 - the ShapesWorld held-out files (a fixture)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from emma_mamba.config import get_preset
    from emma_mamba.inference.generate import GenerationConfig
    from emma_mamba.inference.server import ChatService, make_server
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.lm.tie_embeddings = False  # a random tied LM repeats its last input token (a newline: empty replies)
    model = EmmaMamba(cfg, for_training=False).eval()
    ck = tmp_path_factory.mktemp("ck")
    model.save(ck)
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=16), state_cache=0)
    seen = []  # what reached the model: (generation config, token ids, images, instructions) per request
    answer = svc.answer
    svc.answer = lambda prepared, streamer=None, **kw: (seen.append(prepared[:4]),
                                                        answer(prepared, streamer, **kw))[1]
    srv = make_server(svc, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield model, ck, f"http://127.0.0.1:{srv.server_port}/v1", seen
    srv.shutdown()
    srv.server_close()


def _answers(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "answers.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task,questions", [("pope", "pope_popular.jsonl"), ("vqav2", "vqav2_questions.json")])
def test_api_answers_and_metrics_equal_the_local_checkpoints(shapes, served, tmp_path, task, questions):
    from emma_mamba.eval.runner import prompt_for, read_questions
    from emma_mamba.models.vlm import build_chat_prompt

    model, _, url, seen = served
    ho = shapes / "heldout"
    kw = dict(batch_size=4, max_new_tokens=5, limit=12, progress=False)
    local = evaluate(model, task, ho / questions, shapes / "images", tmp_path / "local", **kw)
    seen.clear()
    api = evaluate(None, task, ho / questions, shapes / "images", tmp_path / "api",
                   answer_fn=api_answer_fn(url, concurrency=3), **kw)
    got, want = _answers(tmp_path / "api"), _answers(tmp_path / "local")
    assert len(got) == len(want) >= 9 and [a["question_id"] for a in got] == [a["question_id"] for a in want]
    assert got == want and all(a["text"] for a in want)
    assert api["metrics"] == local["metrics"]
    # what the endpoint fed the model is what the local path feeds it: the same token ids (the training chat
    # template around the benchmark prompt), the same pixels, the prompt as the instruction, greedy, 5 tokens
    qs = read_questions(task, ho / questions, shapes / "images")[:12]
    assert len(seen) == len(got)
    for cfg, ids, images, instructions in seen:
        text = instructions[0]
        assert ids == model.tokenizer.encode(build_chat_prompt(text, 1, model.config.image_token))
        px = model.image_processor(images)
        assert any(prompt_for(task, q.text) == text and torch.equal(px, model.image_processor([q.image])) for q in qs)
        assert cfg.max_new_tokens == 5 and cfg.temperature == 0.0


def test_the_command_and_its_errors(shapes, served, tmp_path, capsys):
    from emma_mamba.cli import main

    _, ck, url, _ = served
    ho = shapes / "heldout"
    args = ["eval", "--task", "pope", "--questions", str(ho / "pope_random.jsonl"), "--images", str(shapes / "images"),
            "--limit", "4", "--no-progress"]
    assert main(args + ["--api", url, "--out", str(tmp_path / "api")]) == 0
    assert main(args + ["--checkpoint", str(ck), "--out", str(tmp_path / "local")]) == 0
    assert _answers(tmp_path / "api") == _answers(tmp_path / "local")
    capsys.readouterr()
    assert main(args + ["--api", url]) == 2 and "--api needs --out" in capsys.readouterr().err
    # an endpoint that refuses: a message naming it and the question, exit 2 (no traceback)
    assert main(args + ["--api", url.replace("/v1", "/v2"), "--out", str(tmp_path / "refused")]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    bad = api_answer_fn(url.replace("/v1", "/v2"), retries=0)
    from emma_mamba.eval.runner import read_questions

    q = read_questions("pope", ho / "pope_random.jsonl", shapes / "images")[:1]
    with pytest.raises(ApiError, match=r"/v2/chat/completions: question .*: HTTP 404"):
        bad(q, ["Is there a cat?"])
    with pytest.raises(ValueError, match="expected an http"):
        api_answer_fn("localhost:8000")


def test_free_prompts_task_answers_verbatim_prompts_locally_and_through_the_api(shapes, served, tmp_path):
    # `--task prompts`: LLaVA's question JSONL of any prompts, answered verbatim (no short-answer suffix), not
    # scored; each answer equals the model's own generate() on that prompt and image
    from emma_mamba.eval.runner import ScoreInputError
    from emma_mamba.inference.generate import GenerationConfig
    from emma_mamba.models.vlm import build_chat_prompt

    model, _, url, _ = served
    imgs = sorted(p.name for p in (shapes / "images" / "heldout").iterdir())[:3]
    recs = [{"question_id": f"p{i}", "image": f"heldout/{name}", "text": t} for i, (name, t) in
            enumerate(zip(imgs, ["Describe the picture.", "What shapes do you see?", "Write one line about it."]))]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    kw = dict(batch_size=2, max_new_tokens=6, progress=False)
    rep = evaluate(model, "prompts", f, shapes / "images", tmp_path / "local", **kw)
    evaluate(None, "prompts", f, shapes / "images", tmp_path / "api", answer_fn=api_answer_fn(url), **kw)
    got = _answers(tmp_path / "local")
    assert rep["metrics"] is None and got == _answers(tmp_path / "api")
    for r, a in zip(recs, got):
        assert a["question_id"] == r["question_id"] and a["prompt"] == r["text"]
        want = model.generate(build_chat_prompt(r["text"], 1, model.config.image_token),
                              [shapes / "images" / r["image"]], [r["text"]],
                              config=GenerationConfig(max_new_tokens=6, eos_token_id=model.tokenizer.eos_token_id))
        assert a["text"] == want.texts[0].strip()
    f.write_text("".join(json.dumps(r) + "\n" for r in recs + recs[:1]))
    with pytest.raises(ScoreInputError, match="question id 'p0' appears twice"):
        evaluate(model, "prompts", f, shapes / "images", tmp_path / "dup", **kw)


def test_closed_set_option_probabilities_from_top_logprobs():
    """VSR/TallyQA through an API: the options' probabilities from the first reply token's top_logprobs (a
    token's text stripped of spaces names the option; variants summed; renormalised); no usable log-probabilities:
    the reply of the same request is parsed, without asking again."""
    import math

    from emma_mamba.eval.api import _ApiAnswerer, option_probabilities_from
    from emma_mamba.eval.runner import Question

    alt = lambda t, p: {"token": t, "logprob": math.log(p)}  # noqa: E731
    choice = {"message": {"content": "True"}, "logprobs": {"content": [{"token": "True", "logprob": math.log(.5),
              "top_logprobs": [alt("True", .5), alt(" True", .1), alt("False", .2), alt("Fal", .1)]}]}}
    assert option_probabilities_from(choice, ("True", "False")) == pytest.approx([0.6 / 0.8, 0.2 / 0.8])
    assert option_probabilities_from({"message": {"content": "x"}, "logprobs": None}, ("True", "False")) is None
    no_option = {"message": {"content": "Maybe"}, "logprobs": {"content": [{"top_logprobs": [alt("Maybe", .9)]}]}}
    assert option_probabilities_from(no_option, ("True", "False")) is None

    asked = []

    def ask(q, p, top=None):
        asked.append((q.qid, top))
        return choice if q.qid == 0 else no_option

    a = _ApiAnswerer(ask, None, concurrency=2)
    qs = [Question(i, None, "c") for i in range(2)]
    probs = a.option_probabilities(qs, ["p0", "p1"], ("True", "False"))
    assert probs[0] == pytest.approx([0.75, 0.25]) and probs[1] is None
    assert a(qs[1:], ["p1"]) == ["Maybe"]  # the reply of that request, not a new one
    assert sorted(asked) == [(0, 20), (1, 20)]

    # an endpoint that refuses the log-probability fields: the runner is told, with the endpoint's error (it asks for
    # replies from then on and records it: test_a_failed_likelihood_request_is_warned_and_recorded)
    def strict(q, p, top=None):
        if top is not None:
            raise ApiError("HTTP 400: unknown field top_logprobs")
        return {"message": {"content": "False"}}

    a = _ApiAnswerer(strict, None, concurrency=1)
    with pytest.raises(LikelihoodUnavailable, match="HTTP 400: unknown field top_logprobs"):
        a.option_probabilities(qs, ["p0", "p1"], ("True", "False"))
    assert a(qs, ["p0", "p1"]) == ["False", "False"]


def _yes_no_choice(p_yes: float) -> dict:
    """A chat-completion choice replying "Yes" whose first token's alternatives are Yes (p_yes) and No."""
    import math

    return {"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "logprob": math.log(p_yes),
            "top_logprobs": [{"token": "Yes", "logprob": math.log(p_yes)},
                             {"token": "No", "logprob": math.log(1 - p_yes)}]}]}}


def test_a_failed_likelihood_request_is_warned_and_recorded(shapes, tmp_path, caplog):
    """POPE by likelihood through an endpoint whose requests with log-probabilities fail after the first batch (a
    network failure): the first 2 questions are answered by their options' probabilities, the other 4 by parsed
    replies, never asked with log-probabilities again; a warning names the benchmark and the error, and
    metrics.json, a continuation's metrics.json and the suite's summary say that 4 of the 6 were scored from
    replies, and why."""
    import logging

    from emma_mamba.eval.api import _ApiAnswerer
    from emma_mamba.eval.suite import read_suite, run_suite

    asked = []
    network = "URLError: <urlopen error [Errno 111] Connection refused>"

    def ask(q, p, top=None):
        asked.append(top)
        if top is None:
            return {"message": {"content": "No"}}
        if len(asked) > 2:  # the second batch's requests with log-probabilities: the network is gone
            raise ApiError(f"http://127.0.0.1:9/v1/chat/completions: question {q.qid!r}: {network}")
        return _yes_no_choice(0.9)

    def answerer():
        a = _ApiAnswerer(ask, None, concurrency=1)
        a._make = lambda n: a  # one answerer whatever the reply length (as api_answer_fn's own makes one per run)
        return a

    ho, kw = shapes / "heldout", dict(batch_size=2, limit=6, likelihood=True, progress=False)
    out = tmp_path / "pope_ll"
    with caplog.at_level(logging.WARNING, logger="emma_mamba.eval.runner"):
        rep = evaluate(None, "pope", ho / "pope_random.jsonl", shapes / "images", out, answer_fn=answerer(), **kw)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "benchmark pope_ll (pope" in warned[0] and "Connection refused" in warned[0]
    assert "4 remaining questions" in warned[0]
    first_none = asked.index(None)
    assert asked[:first_none] == [20] * first_none and set(asked[first_none:]) == {None} and asked.count(None) == 4
    recs = _answers(out)
    assert [r["text"] for r in recs] == ["Yes", "Yes", "No", "No", "No", "No"]
    assert [("probabilities" in r) for r in recs] == [True, True, False, False, False, False]
    fallback = json.loads((out / "metrics.json").read_text())["scored_from_replies"]
    assert rep["answered_by"] == "likelihood" and fallback["n"] == 4 and fallback["of"] == 6
    assert len(fallback["errors"]) == 1 and network in fallback["errors"][0]["error"]
    assert fallback["errors"][0]["questions_left"] == 4
    # a continuation (nothing left to answer) still reports it: it is the folder's, not the process's
    again = evaluate(None, "pope", ho / "pope_random.jsonl", shapes / "images", out, answer_fn=answerer(), **kw)
    assert again["scored_from_replies"] == fallback
    # a suite: the benchmark's row says it, in summary.json and summary.md
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"root: {shapes}\nbenchmarks:\n  pope_ll: {{task: pope, questions: heldout/pope_random.jsonl, "
                     f"images: images, likelihood: true, limit: 6, batch_size: 2}}\n")
    asked.clear()
    summary = run_suite(None, read_suite(suite), tmp_path / "suite_out", progress=False, answer_fn=answerer())
    assert summary["benchmarks"][0]["scored_from_replies"] == 4
    assert "4 scored from parsed replies, not by likelihood" in (tmp_path / "suite_out" / "summary.md").read_text()


def test_vsr_through_the_api_asks_once_per_question(shapes, served, tmp_path):
    """A VSR run against `emma-mamba serve` (a random model: the options are not among its top 20 first tokens,
    so its replies are parsed): one request per question, each with logprobs asked; answers and metrics written."""
    from tests.eval.test_closed import _vsr_file

    _, _, url, seen = served
    f = _vsr_file(shapes, tmp_path / "test.jsonl")
    seen.clear()
    rep = evaluate(None, "vsr", f, shapes / "images", tmp_path / "api", progress=False, max_new_tokens=3,
                   answer_fn=api_answer_fn(url, concurrency=2))
    assert len(seen) == 5 and rep["metrics"]["n"] == 5
    recs = _answers(tmp_path / "api")
    assert [r["question_id"] for r in recs] == [0, 1, 2, 3, 4] and all("probabilities" not in r for r in recs)
    assert rep["scored_from_replies"] == {"n": 5, "of": 5, "errors": []}  # said, not hidden behind "likelihood"


@pytest.mark.parametrize("body", [b'{"choices": []}', b'[]', b'{"choices": [null]}'])
def test_a_malformed_reply_is_an_api_error_naming_the_question(shapes, tmp_path, body):
    """An endpoint answering 200 with no choice (or not a JSON object): ApiError naming the endpoint and the
    question (the command's exit 2 and message), not an IndexError / TypeError traceback."""
    from emma_mamba.eval.runner import read_questions

    with canned_endpoint({"status": 200, "body": body}) as url:
        q = read_questions("pope", shapes / "heldout" / "pope_random.jsonl", shapes / "images")[:1]
        fn = api_answer_fn(url, retries=0)
        with pytest.raises(ApiError, match=rf"/v1/chat/completions: question {q[0].qid!r}: "):
            fn(q, ["Is there a cat?"])


def test_a_busy_endpoint_is_waited_for_as_its_retry_after_says(shapes, served, tmp_path):
    """A 429 (serve --max-concurrent-requests, a rate limit) is "retry shortly", not a refusal: the request is sent
    again after the Retry-After the endpoint gave, and the answers equal an unhindered run's, closed-set
    probabilities included (they were taken for "this endpoint refuses logprobs" and the benchmark fell back to
    parsed replies). An endpoint busy for longer than the request timeout is an ApiError saying so, also for a
    likelihood request (the run stops, resumable), not a fallback."""
    import time

    from emma_mamba.eval.runner import read_questions

    _, _, url, _ = served
    ho = shapes / "heldout"
    q = read_questions("pope", ho / "pope_random.jsonl", shapes / "images")[:2]
    want = api_answer_fn(url, retries=0)(q, ["Is there a cat?"] * 2)
    want_p = api_answer_fn(url, retries=0).option_probabilities(q, ["Is there a cat?"] * 2, ["Yes", "No"])
    busy, waits = {"left": 0}, []

    class Proxy(BaseHTTPRequestHandler):  # busy for its first requests, then passes them to the served model
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if busy["left"] > 0:
                busy["left"] -= 1
                waits.append(time.monotonic())
                raw = b'{"error": {"message": "the server is busy"}}'
                self.send_response(429)
                self.send_header("Retry-After", "0.2")
            else:
                import urllib.request

                req = urllib.request.Request(url + "/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    raw = r.read()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    proxy = f"http://127.0.0.1:{srv.server_port}/v1"
    try:
        busy["left"] = 3  # more than retries=0 allows for failures: a busy answer is not one
        assert api_answer_fn(proxy, retries=0, concurrency=1)(q, ["Is there a cat?"] * 2) == want
        assert len(waits) == 3 and all(b - a >= 0.19 for a, b in zip(waits, waits[1:]))
        busy["left"] = 2
        got = api_answer_fn(proxy, retries=0, concurrency=1).option_probabilities(q, ["Is there a cat?"] * 2,
                                                                                   ["Yes", "No"])
        assert got == want_p
        busy["left"] = 100  # busy beyond the timeout (0.5 s: two waits of 0.2 s fit, the third does not)
        with pytest.raises(ApiError, match=r"HTTP 429 \(still busy after \d retries in 0\.\d s\)") as e:
            api_answer_fn(proxy, retries=0, timeout=0.5).option_probabilities(q[:1], ["Is there a cat?"], ["Yes"])
        assert e.value.status == 429 and not isinstance(e.value, LikelihoodUnavailable)
    finally:
        srv.shutdown()
        srv.server_close()


def test_retry_after_zero_a_date_or_garbage_never_spins():
    """Retry-After as RFC 9110 allows it (delta-seconds or an HTTP date) sets the wait; 0, a negative, nan or
    garbage cannot make a busy endpoint be asked back to back (a Retry-After of 0 sent 3000 requests in 8 s, and
    never gave up: the budget counted only the sleeps), and the budget is wall time from the first try."""
    import email.utils
    import time
    import urllib.error

    from emma_mamba.eval.api import _MIN_WAIT, _retry_after

    def err(value):
        headers = {} if value is None else {"Retry-After": value}
        return urllib.error.HTTPError("http://x", 429, "busy", headers, None)

    assert _retry_after(err("3"), 0) == 3.0
    assert _retry_after(err("0"), 0) == _retry_after(err("-5"), 0) == _MIN_WAIT
    assert _retry_after(err("nan"), 2) == 4.0 and _retry_after(err("soon"), 3) == 8.0  # else a backoff
    assert _retry_after(err(None), 1) == 2.0
    ahead = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.5 <= _retry_after(err(ahead), 0) <= 5.0


def test_an_endpoint_busy_with_retry_after_zero_is_given_up_on_in_time(shapes):
    from emma_mamba.eval.runner import read_questions

    q = read_questions("pope", shapes / "heldout" / "pope_random.jsonl", shapes / "images")[:1]
    reply = {"status": 429, "body": b'{"error": {"message": "busy"}}', "headers": {"Retry-After": "0"}}
    with canned_endpoint(reply) as url:
        import time

        t0 = time.monotonic()
        with pytest.raises(ApiError, match=r"HTTP 429 \(still busy after"):
            api_answer_fn(url, retries=0, timeout=1.0)(q, ["Is there a cat?"])
        assert time.monotonic() - t0 < 10 and 2 <= reply["hits"] <= 6  # ~1 s at one request per 0.25 s at most


@contextlib.contextmanager
def canned_endpoint(reply: dict):
    """A local HTTP endpoint answering every POST with ``reply["status"]`` and ``reply["body"]`` (bytes, JSON),
    read at each request (a test may change them), and counting the requests in ``reply["hits"]``; yields its
    /v1 URL."""
    reply.setdefault("hits", 0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            reply["hits"] += 1
            self.send_response(reply["status"])
            self.send_header("Content-Type", "application/json")
            for k, v in reply.get("headers", {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(reply["body"])))
            self.end_headers()
            self.wfile.write(reply["body"])

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()
