"""Benchmark answers from an OpenAI-compatible chat-completions endpoint (``emma-mamba eval --api URL``).

The same question files, prompts (LLaVA-1.5's, :func:`emma_mamba.eval.runner.prompt_for`), scorers, output
files and resumption as a local checkpoint, with each question sent as one user message: the image as a
``data:image/...;base64`` URL, then the prompt text, greedy (``temperature`` 0), ``max_tokens`` the run's
``max_new_tokens``. So a model behind ``emma-mamba serve``, or any other multimodal model behind an
OpenAI-compatible server (a transformer MLLM served by vLLM or SGLang, say), is scored exactly like a local one.

Requests run ``concurrency`` at a time; a failed request is retried (``retries``, with a growing pause) and then
raises with the server's message (a rerun continues from the answers already written).
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

__all__ = ["api_answer_fn", "ApiError"]


class ApiError(RuntimeError):
    """The endpoint refused or failed a request (after the retries)."""


def _data_url(question) -> str:
    from PIL import Image

    raw = question.image_bytes if question.image_bytes is not None else question.image.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        fmt = (im.format or "PNG").lower()
    return f"data:image/{fmt};base64,{base64.b64encode(raw).decode()}"


class _ApiAnswerer:
    """``answer_fn(questions, prompts) -> replies`` asking the endpoint; ``for_max_new_tokens(n)`` gives the same
    with another reply length (:func:`~emma_mamba.eval.runner.evaluate` calls it with a benchmark's own)."""

    def __init__(self, ask, make, concurrency: int):
        self._ask, self._make, self.concurrency = ask, make, concurrency

    def __call__(self, batch: Sequence, prompts: Sequence[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(self._ask, batch, prompts))

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

    def ask(question, prompt: str) -> str:
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(question)}},
            {"type": "text", "text": prompt}]}],
            "max_tokens": max_new_tokens, "temperature": 0.0}
        if model:
            body["model"] = model
        data = json.dumps(body).encode()
        for attempt in range(retries + 1):
            try:
                req = urllib.request.Request(endpoint, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    out = json.loads(r.read())
                return (out["choices"][0]["message"]["content"] or "").strip()
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code < 500 or attempt == retries:  # a refused request is not retried
                    raise ApiError(f"{endpoint}: question {question.qid!r}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, json.JSONDecodeError) as e:
                if attempt == retries:
                    raise ApiError(f"{endpoint}: question {question.qid!r}: {type(e).__name__}: {e}") from None
            time.sleep(2.0 ** attempt)
        raise AssertionError("unreachable")

    return _ApiAnswerer(ask, lambda n: api_answer_fn(url, max_new_tokens=n, **kw), concurrency)
