"""Benchmark answers from an OpenAI-compatible chat-completions endpoint (``emma-mamba eval --api URL``).

The same question files, prompts (LLaVA-1.5's, :func:`emma_mamba.eval.runner.prompt_for`), scorers, output
files and resumption as a local checkpoint, with each question sent as one user message: the image as a
``data:image/...;base64`` URL, then the prompt text, greedy (``temperature`` 0), ``max_tokens`` the run's
``max_new_tokens``. So a model behind ``emma-mamba serve``, or any other multimodal model behind an
OpenAI-compatible server (a transformer MLLM served by vLLM or SGLang, say), is scored exactly like a local one.

Closed-set benchmarks (VSR, TallyQA, AI2D, and the others with ``--likelihood``) ask for the reply's
log-probabilities too (``logprobs``, ``top_logprobs`` 20, as OpenAI's API, vLLM and ``emma-mamba serve`` take
them): an option's probability is the summed probability of the first reply token's alternatives whose text,
stripped of spaces, is the option (Yes / No in either case, :data:`emma_mamba.eval.closed.SPELLINGS`; an option
outside the 20 alternatives counts 0), normalised over the options. Where the endpoint returns no
log-probabilities, or none of the options is among them, the same request's reply is parsed instead. Where a
request with the log-probability fields fails after its retries (an endpoint that refuses them, or a network
failure), the benchmark's remaining questions are asked again without them and their replies parsed
(:class:`~emma_mamba.eval.runner.LikelihoodUnavailable`): a warning names the benchmark and the error, and its
metrics.json records how many questions were scored from replies and why (``scored_from_replies``; the suite's
summary says so on the benchmark's row).

Requests run ``concurrency`` at a time; a failed request is retried (``retries``, with a growing pause) and then
raises with the server's message (a rerun continues from the answers already written).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from emma_mamba.eval.closed import spellings

__all__ = ["api_answer_fn", "ApiError"]


class ApiError(RuntimeError):
    """The endpoint refused or failed a request (after the retries). ``status``: its HTTP status, None where no
    answer came (the network, a timeout, a malformed answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


_BUSY = (408, 429)  # "try again later": waited for (Retry-After, else a backoff), not counted as failures
_MAX_WAIT = 60.0  # the longest one Retry-After is honoured for (seconds)
_MIN_WAIT = 0.25  # the shortest wait before a retry (a Retry-After of 0 would send requests back to back)


def _retry_after(e: urllib.error.HTTPError, attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` + 1 after ``e``: its Retry-After (delta-seconds or an
    HTTP date, RFC 9110) if given and valid, else an exponential backoff; within [_MIN_WAIT, _MAX_WAIT]."""
    value = (e.headers.get("Retry-After") if e.headers is not None else None) or ""
    try:
        wait = float(value)
    except ValueError:
        try:
            from email.utils import parsedate_to_datetime

            wait = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            wait = 2.0 ** attempt
    if not math.isfinite(wait):
        wait = 2.0 ** attempt
    return min(_MAX_WAIT, max(_MIN_WAIT, wait))


def _data_url(question) -> str:
    from PIL import Image

    raw = question.image_bytes if question.image_bytes is not None else question.image.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        fmt = (im.format or "PNG").lower()
    return f"data:image/{fmt};base64,{base64.b64encode(raw).decode()}"


TOP_LOGPROBS = 20
"""Alternatives asked for per reply token (the OpenAI API's maximum)."""


def option_probabilities_from(choice: dict, options: Sequence[str]) -> list[float] | None:
    """The options' probabilities from a chat-completion choice's first-token ``top_logprobs`` (module
    docstring), or None when it has none of them."""
    content = ((choice.get("logprobs") or {}).get("content") or [])
    if not content:
        return None
    mass = [0.0] * len(options)
    for alt in content[0].get("top_logprobs") or []:
        token = str(alt.get("token", "")).strip()
        for j, o in enumerate(options):
            if token in spellings(o):
                mass[j] += math.exp(float(alt["logprob"]))
    total = sum(mass)
    return [m / total for m in mass] if total > 0 else None


class _ApiAnswerer:
    """``answer_fn(questions, prompts) -> replies`` asking the endpoint; ``for_max_new_tokens(n)`` gives the same
    with another reply length (:func:`~emma_mamba.eval.runner.evaluate` calls it with a benchmark's own);
    ``option_probabilities`` for the closed-set benchmarks (module docstring)."""

    def __init__(self, ask, make, concurrency: int, identity: dict | None = None):
        self._ask, self._make, self.concurrency = ask, make, concurrency
        self.identity = identity  # the endpoint and model name, recorded in eval_run.json
        self._replies: dict = {}  # question id -> reply, from a request that returned no usable log-probabilities

    def _map(self, fn, *args) -> list:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(fn, *args))

    def __call__(self, batch: Sequence, prompts: Sequence[str]) -> list[str]:
        cached = [self._replies.pop(q.qid, None) for q in batch]
        asked = iter(self._map(lambda q, p: self._ask(q, p)["message"]["content"],
                               [q for q, c in zip(batch, cached) if c is None],
                               [p for p, c in zip(prompts, cached) if c is None]))
        return [(c if c is not None else (next(asked) or "")).strip() for c in cached]

    def option_probabilities(self, batch: Sequence, prompts: Sequence[str], options: Sequence[str]) -> list:
        """Each question's options' probabilities (None: its reply is parsed); a request that fails after its
        retries raises :class:`~emma_mamba.eval.runner.LikelihoodUnavailable` with the endpoint's error (the runner
        asks for replies from then on, and records it)."""
        from emma_mamba.eval.runner import LikelihoodUnavailable

        try:
            choices = self._map(lambda q, p: self._ask(q, p, TOP_LOGPROBS), batch, prompts)
        except ApiError as e:
            if e.status in _BUSY:  # still busy after waiting: says nothing about logprobs (the run stops, resumable)
                raise
            raise LikelihoodUnavailable(f"a request with logprobs / top_logprobs failed: {e}") from e
        out = []
        for q, c in zip(batch, choices):
            probs = option_probabilities_from(c, options)
            if probs is None:
                self._replies[q.qid] = c["message"]["content"] or ""
            out.append(probs)
        return out

    def for_max_new_tokens(self, n: int) -> "_ApiAnswerer":
        return self._make(n)


def api_answer_fn(url: str, *, model: str | None = None, api_key: str | None = None, max_new_tokens: int = 16,
                  concurrency: int = 4, timeout: float = 300.0, retries: int = 2):
    """An ``answer_fn(questions, prompts) -> replies`` for :func:`emma_mamba.eval.runner.evaluate` that asks the
    chat-completions endpoint under ``url`` (the base URL, e.g. ``http://localhost:8000/v1``)."""
    kw = dict(model=model, api_key=api_key, concurrency=concurrency, timeout=timeout, retries=retries)
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--api {url!r}: expected an http(s) URL such as http://localhost:8000/v1")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def ask(question, prompt: str, top_logprobs: int | None = None) -> dict:
        """The first choice of the endpoint's chat completion (with the reply's log-probabilities when
        ``top_logprobs`` is given)."""
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(question)}},
            {"type": "text", "text": prompt}]}],
            "max_tokens": max_new_tokens, "temperature": 0.0}
        if top_logprobs is not None:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        if model:
            body["model"] = model
        data = json.dumps(body).encode()
        attempt, busy, started = 0, 0, time.monotonic()
        while True:
            try:
                req = urllib.request.Request(endpoint, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    out = json.loads(r.read())
                choice = out["choices"][0]
                choice["message"]["content"]  # noqa: B018 - a malformed answer raises here, retried
                return choice
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                wait = _retry_after(e, busy if e.code in _BUSY else attempt)
                # busy (429: serve --max-concurrent-requests, a rate limit; 408): waited for, up to `timeout` in all
                # from the first try (wall time: requests and waits), not counted against the retries
                if e.code in _BUSY and time.monotonic() - started + wait <= timeout:
                    busy += 1
                    time.sleep(wait)
                    continue
                if e.code < 500 and e.code not in _BUSY or attempt == retries:  # a refused request: not retried
                    why = (f" (still busy after {busy} retries in {time.monotonic() - started:.1f} s)"
                           if e.code in _BUSY else "")
                    raise ApiError(f"{endpoint}: question {question.qid!r}: HTTP {e.code}{why}: {detail}",
                                   e.code) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, IndexError, TypeError,
                    json.JSONDecodeError) as e:  # IndexError / TypeError: no choice, or not a JSON object
                if attempt == retries:
                    raise ApiError(f"{endpoint}: question {question.qid!r}: {type(e).__name__}: {e}") from None
                wait = 2.0 ** attempt
            time.sleep(wait)
            attempt += 1

    from emma_mamba.eval.runner import model_identity

    return _ApiAnswerer(ask, lambda n: api_answer_fn(url, max_new_tokens=n, **kw), concurrency,
                        model_identity(api=url, api_model=model))
