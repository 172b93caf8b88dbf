"""An OpenAI-compatible HTTP API over an EMMA-Mamba checkpoint or a text-only Mamba LM (`emma-mamba serve`).

Endpoints: ``POST /v1/chat/completions`` (a JSON answer, or with ``"stream": true`` server-sent events of
``chat.completion.chunk`` objects ending in ``data: [DONE]``; the usage rides on the last choice's finish chunk,
or with ``"stream_options": {"include_usage": true}`` comes in a chunk of its own with no choices, after every
choice's, as OpenAI sends it), ``GET /v1/models`` (and ``GET /v1/models/<id>``), ``GET /health``; for scoring
the LM with lm-evaluation-harness (``local-completions``): ``POST /v1/completions`` (raw prompts, no chat
template, ``echo`` and ``logprobs``; :meth:`ChatService.text_completion`; ``stream``, with or without logprobs:
:meth:`ChatService.stream_text_completion`) and vLLM's ``GET /tokenizer_info``,
``POST /tokenize``, ``POST /detokenize``. ``HEAD`` answers as ``GET`` without the body.

HTTP/1.1 with keep-alive: every response but a stream states its length, so a client sends its next request on
the same connection; a stream (no length) ends its connection when it ends (``Connection: close``); a connection
waits at most ``keep_alive_timeout`` seconds for its next request, and one whose request body was refused unread
(401, 404, 411, 413) is closed after the answer. CORS only when asked for (``cors_origins``, ``serve
--cors-origin``): a preflight ``OPTIONS`` from an allowed origin is answered without the API key, and every
response to that origin carries ``Access-Control-Allow-Origin``; without it ``OPTIONS`` is a 405.

Request fields read: ``messages``; ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``,
``top_k``, ``repetition_penalty``, ``stop`` (a string or a list), ``seed``, ``stream``, ``n`` (1 to max_batch
choices from one prefill whose state each choice continues; choice i samples with ``seed + i``), ``logprobs`` and
``top_logprobs`` (0-20): each answer token's log-probability under the model (before penalties and temperature)
and its most likely alternatives, in OpenAI's ``choices[i].logprobs.content`` form (what closed-set benchmarks
read through ``emma-mamba eval --api``); streamed too, as OpenAI streams them: each chunk's ``logprobs.content``
holds the entries of exactly the tokens whose text its ``delta.content`` carries (a token whose text the
detokenizer holds back, part of a UTF-8 character or of a possible stop string, comes with that text; the tokens
no text shows, cut with a stop string or a picked end of sequence, in a last chunk of their own when no text is
left), ``logprobs: null`` in the role and finish chunks, and the chunks' entries in order are the plain answer's
(``/v1/completions`` alike: the chunks' ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``,
with ``echo`` the prompt's first, in the chunk that echoes it). A field left out takes the server's
default (``serve``'s options: greedy unless ``--temperature`` says otherwise, where OpenAI's default temperature
is 1). ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` and ``min_tokens`` are refused with a 400 unless
0 / empty (what clients send by default); so are ``tools``, ``functions``, ``tool_choice``, ``function_call``
and ``response_format`` unless empty, ``"none"`` or ``{"type": "text"}`` (the model answers in plain text). A user
message's ``content`` is a string or a list of parts, ``{"type": "text", "text": ...}`` and ``{"type":
"image_url", "image_url": {"url": ...}}`` with the image as a ``data:image/...;base64,...`` URL (a local file
path or ``file://`` URL only when the server was started with ``allow_local_images``; http(s) URLs are refused:
the server fetches nothing). On a multimodal model no message text (nor a ``/v1/completions`` prompt) may
hold the image placeholder text (``<image>``): the tokenizer reads it as an image's slot, as training data uses
it, so the server places the placeholders itself, one per image part, and refuses the text with a 400 naming
the field. ``system`` messages (and ``developer`` ones, OpenAI's newer name for them) are dropped (the model was
trained without a system prompt), and the response says so in ``emma_mamba.dropped_system_messages``; one holding
an image is a 400 (the image would be dropped unseen: images go in user messages). Consecutive messages of one
role make one turn (texts joined by a newline, images in order), as OpenAI's API accepts them; an assistant
message's ``content`` may be null.

The token stream is the one training builds from a multi-turn LLaVA record (:mod:`emma_mamba.data.llava` with
its default template), tokenised segment by segment as training does: each user turn in the chat template, each
assistant answer followed by the end-of-turn token, the separator between turns. A user turn's images go before
its text, one placeholder per line (as ``emma-mamba generate`` and the quickstart data place them); with
instruction fusion each image is conditioned on the text of its turn.

State cache (the recurrent model's edge in serving): after each answer the Mamba state (per layer a conv window
and an SSM state, a few MB whatever the length) is kept in a small LRU, keyed by the conversation's tokens up to
that answer and its images' pixels. A follow-up request that sends the same history plus a new user turn
continues that state and prefills only the new turn, so a turn's cost does not grow with the conversation; any
other request (an edited history, another image) prefills its whole history. An answer is kept only when its
text tokenises back to the tokens generated (the client will send the text), so a hit gives the tokens a full
prefill gives, up to rounding. ``emma_mamba.state_cache`` ("hit" / "miss") and ``prefilled_positions`` in a
response say which happened.

Every malformed request is answered 400 with an OpenAI-style error naming the field (``param``, e.g.
``messages[2].content[1].image_url.url``); a prompt longer than ``max_prompt_positions`` (visual tokens
included) is refused the same way. With an API key every endpoint but ``/health`` needs ``Authorization: Bearer
<key>`` (401 otherwise).

Concurrent requests are decoded together (continuous batching, :mod:`emma_mamba.inference.batching`): up to
``max_batch`` answers advance one token per batched decode step, a new request joins the batch after its
prefill and a finished one leaves it; each keeps its own sampling settings, seed and stream. While answers are
being decoded, a long prompt is prefilled in chunks of at most ``prefill_chunk`` positions between two decode
steps, so it does not stall the streams already running.
``emma_mamba.batch_rows`` in a response is the most requests its answer was decoded with.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import hashlib
import io
import json
import logging
import queue
import re
import stat
import threading
import time
import uuid
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Sequence

from emma_mamba.config import ChatConfig
from emma_mamba.data.llava import chat_segments
from emma_mamba.inference.chat import pending_tokens
from emma_mamba.inference.batching import _END, BatchDecoder, DecodeJob, DecoderClosed, vlm_embed_batch
from emma_mamba.inference.generate import SEED_MAX, SEED_MIN, GenerationConfig, output_vocab

__all__ = ["RequestError", "ChatService", "make_server", "conversation_ids", "cors_origin"]

log = logging.getLogger(__name__)

MAX_STOPS = 64
"""Stop strings one request may give (OpenAI's API takes 4)."""
MAX_STOP_CHARS = 4096
"""Characters of a request's stop strings together (each token's text meets each of them: the cost per token is
about the number of strings times the longest)."""


class RequestError(ValueError):
    """A request the API refuses: ``param`` names the field, ``status`` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclasses.dataclass
class _Turn:
    text: str
    images: list  # a user turn's images: _ImageRef as parsed, PIL images once decoded (decode_images)
    answer: str | None = None  # the assistant's reply (None for the last, open turn)


@dataclasses.dataclass
class _ImageRef:
    """An image_url part as parsed: decoded (:func:`decode_images`) only once the request's length is checked."""

    url: str
    where: str


def request_pixel_budget() -> int | None:
    """Pixels one request's images may decode to in all: twice PIL's MAX_IMAGE_PIXELS (its decompression-bomb
    limit for one image, ~179M pixels: 0.5 GB as RGB, ~4-6 GB while PIL decodes an RGBA PNG or a float TIFF),
    None when that check is off. Each image's size is read
    from its header before it is decoded, so a request of many large images is refused before any memory goes."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def decode_images(turns: list[_Turn], allow_local: bool, check_size=None) -> None:
    """Decode the turns' image references in place (RequestError naming the part at fault), within the request's
    pixel budget (:func:`request_pixel_budget`); ``check_size(size, name)`` (the image processor's) refuses an
    image the encoder's resize cannot take."""
    budget = [request_pixel_budget()]
    for t in turns:
        images = []
        for r in t.images:
            if isinstance(r, _ImageRef):
                im = _decode_image(r.url, r.where, allow_local, budget)
                try:
                    if check_size is not None:
                        check_size(im.size, "the image")
                except ValueError as e:
                    raise RequestError(str(e), r.where) from None
                r = im
            images.append(r)
        t.images = images


def _spend(budget: list, size: tuple[int, int], where: str) -> None:
    if budget[0] is None:
        return
    w, h = size
    budget[0] -= w * h
    if budget[0] < 0:
        raise RequestError(f"the request's images hold more than {request_pixel_budget():,} pixels in all (this one "
                           f"is {w}x{h}); send them smaller", where)


def _decode_image(url: str, where: str, allow_local: bool, budget: list | None = None):
    from PIL import Image

    from emma_mamba.models.vision import load_image

    budget = [None] if budget is None else budget
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError("an image data URL must be data:<mime>;base64,<data>", where)
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)  # MIME-style line breaks allowed
        except ValueError as e:
            raise RequestError(f"the image data is not valid base64: {e}", where) from None
        try:
            with Image.open(io.BytesIO(raw)) as f:
                _spend(budget, f.size, where)  # from the header: before the pixels are decoded
                f.load()
                return load_image(f.copy())
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds on a bad file
            raise RequestError(f"the image cannot be decoded: {type(e).__name__}: {e}", where) from None
    _check_image_url(url, where, allow_local)
    path = _local_path(url, where)
    try:  # a regular file only (a link followed): opening a FIFO or /proc/self/fd/0 would wait for a writer for ever
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError:
        regular = True  # not there (or unreadable): load_image names it below
    if not regular:
        raise RequestError(f"{url} is not a regular file (a folder, a pipe or a device): not read", where)
    try:
        with Image.open(path) as f:
            _spend(budget, f.size, where)
    except RequestError:
        raise
    except Exception:  # noqa: BLE001 - not an image, or no such file: load_image names it below
        pass
    try:
        return load_image(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise RequestError(str(e), where) from None


def _local_path(url: str, where: str) -> Path:
    """The file a local image URL names: a path as given, or a ``file://`` URL's (``file:///p`` and, as RFC 8089
    reads it, ``file://localhost/p``: ``/p``); a ``file://`` URL of another host is refused (it was read as the
    relative path ``host/p``)."""
    if not url.startswith("file://"):
        return Path(url)
    rest = url[len("file://"):]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    if not rest.startswith("/"):
        raise RequestError(f"{url}: a file:// URL names a path on this machine (file:///path or "
                           f"file://localhost/path), not on host {rest.split('/')[0]!r}", where)
    return Path(rest)


def _check_image_url(url: str, where: str, allow_local: bool) -> None:
    """Refuse an image URL that is not a data URL and is not served: http(s), or a local path without
    --allow-local-images."""
    if url.startswith(("http://", "https://")):
        raise RequestError("http(s) image URLs are not fetched; send the image as a data:image/...;base64 URL",
                           where)
    if not allow_local:
        raise RequestError("local image paths are refused (start the server with --allow-local-images); send "
                           "the image as a data:image/...;base64 URL", where)


def _check_reserved(text: str, image_token: str | None, where: str) -> None:
    """Refuse message text holding the image placeholder: the tokenizer reads it as an image's slot (as training
    data does: there ``<image>`` in a turn *is* the placeholder), so it would stand for an image the request does
    not carry. The images' placeholders are placed by the server, one per image_url part."""
    if image_token is not None and image_token in text:
        raise RequestError(f"the text holds {image_token!r}, the model's image placeholder: that text is reserved "
                           f"(images go in image_url parts, and the server places their placeholders); remove it",
                           where)


def parse_messages(messages, allow_images: bool, allow_local: bool,
                   image_token: str | None = None) -> tuple[list[_Turn], int]:
    """OpenAI ``messages`` -> (turns, dropped system messages). Raises RequestError naming the field.
    ``image_token``: the model's image placeholder, refused in any message's text (see :func:`_check_reserved`)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    turns: list[_Turn] = []
    dropped = 0
    expect = "user"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError("each message must be an object with 'role' and 'content'", where)
        role, content = m["role"], m["content"]
        if role in ("system", "developer"):
            for j, part in enumerate(content if isinstance(content, list) else []):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    raise RequestError(f"{where} is a {role} message, and {role} messages are not given to the "
                                       f"model (it was trained without one): its image would be dropped; send "
                                       f"images in user messages", f"{where}.content[{j}]")
            dropped += 1
            continue
        if role not in ("user", "assistant"):
            raise RequestError(f"role {role!r} is not supported (user, assistant, system, developer)",
                               f"{where}.role")
        if not turns and role != "user":
            raise RequestError("the conversation must start with a user message (system messages aside)",
                               f"{where}.role")
        texts, images = [], []
        if content is None and role == "assistant":  # OpenAI allows it (a reply that was only tool calls)
            content = ""
        if isinstance(content, str):
            _check_reserved(content, image_token, f"{where}.content")
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    _check_reserved(part["text"], image_token, f"{pw}.text")
                    texts.append(part["text"])
                elif kind == "image_url":
                    if role != "user":
                        raise RequestError("images are accepted in user messages only", pw)
                    if not allow_images:
                        raise RequestError("this server runs a text-only language model: it takes no images", pw)
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str) or not url:
                        raise RequestError("image_url.url must be a non-empty string", f"{pw}.image_url.url")
                    if not url.startswith("data:"):  # said now, before anything is decoded
                        _check_image_url(url, f"{pw}.image_url.url", allow_local)
                    images.append(_ImageRef(url, f"{pw}.image_url.url"))
                else:
                    raise RequestError("a content part must be {type: text, text} or {type: image_url, image_url}",
                                       pw)
        else:
            raise RequestError("content must be a string or a list of parts", f"{where}.content")
        text = "\n".join(t for t in texts if t)
        # consecutive messages of one role are one turn, as OpenAI's API takes them (a context message, then the
        # question): their texts joined by a newline, the images in order
        if role == "user":
            if not text.strip() and not images:
                raise RequestError("a user message needs text or an image", f"{where}.content")
            if expect == "assistant":  # a user message after a user message
                last = turns[-1]
                last.text, last.images = "\n".join(t for t in (last.text, text.strip()) if t), last.images + images
            else:
                turns.append(_Turn(text.strip(), images))
            expect = "assistant"
        else:
            last = turns[-1]
            last.answer = text if expect == "assistant" else "\n".join(t for t in (last.answer, text) if t)
            expect = "user"
    if not turns or expect != "assistant":
        raise RequestError("the last message must be a user message (the one to answer)", "messages")
    return turns, dropped


def conversation_ids(tokenizer, turns: list[_Turn], image_token: str, image_position: str = "in_turn",
                     chat: ChatConfig | None = None) -> tuple[list[int], list, list[str], tuple[int, int]]:
    """(token ids, images in order, one instruction per image, (ids, images) of the history before the last, open
    turn): the multi-turn stream training builds (:func:`emma_mamba.data.llava.chat_segments`) in the model's chat
    format ``chat`` (default: the default's), each segment tokenised on its own (see the module docstring)."""
    chat = chat or ChatConfig()
    pairs = [("".join(f"{image_token}\n" for _ in t.images) + t.text, t.answer) for t in turns]
    hoist = image_token if image_position == "before_turn" else None
    pieces = [tokenizer.encode(text) for text, _ in chat_segments(pairs, chat.prompt_template, chat.turn_end,
                                                                    chat.turn_sep, hoist)]
    # the open turn is its separator and its question: the history, where a carried state resumes, ends before
    n_history = sum(len(p) for p in pieces[:-2]) if len(turns) > 1 else 0
    images = [im for t in turns for im in t.images]
    instructions = [t.text for t in turns for _ in t.images]
    return [i for p in pieces for i in p], images, instructions, (n_history, len(images) - len(turns[-1].images))


MAX_PROMPTS = 2048  # answers (prompts x n) one /v1/completions request may ask for: each is a job queued at once
_FLOAT_FIELDS = {"temperature": (0.0, 100.0), "top_p": (0.0, 1.0), "repetition_penalty": (0.0, 100.0)}
_UNSUPPORTED_FIELDS = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "min_tokens": 0}
"""OpenAI / vLLM sampling fields this server does not implement -> the value that means "off" (accepted: clients
send it by default); any other value is a 400 naming the field, rather than an answer sampled without it."""
_PLAIN_TEXT_FIELDS = {"tools": [], "functions": [], "tool_choice": "none", "function_call": "none",
                      "response_format": {"type": "text"}, "modalities": ["text"], "audio": None}
"""Fields asking for tool calls, structured output or audio -> their "off" value; anything else is a 400 naming the
field (the model answers in plain text; a client must not take an ignored JSON schema, tool list or audio request
as obeyed)."""


def _number(body: dict, key: str, kind, lo, hi, default):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}", key)
    if not lo <= v <= hi:
        raise RequestError(f"{key} must be in [{lo}, {hi}], got {v}", key)
    return kind(v)


def _flag(body: dict, key: str) -> bool:
    """A boolean request field (absent or null: false); anything but true/false is refused, so that e.g.
    ``"stream": "no"`` is not read as true."""
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"{key} must be true or false, got {v!r}", key)
    return v


def _include_usage(body: dict) -> bool:
    """A streamed request's ``stream_options.include_usage`` (absent or null: false), checked as :func:`_flag`."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise RequestError(f"stream_options must be an object, got {opts!r}", "stream_options")
    v = opts.get("include_usage")
    if v is not None and not isinstance(v, bool):
        raise RequestError(f"stream_options.include_usage must be true or false, got {v!r}",
                           "stream_options.include_usage")
    return bool(v)


def _is_id_list(x) -> bool:
    """A JSON list of integers (token ids; booleans are not)."""
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _history_key(ids: list[int], images: list) -> str:
    """Key of a conversation prefix: its token ids and its images' pixels."""
    h = hashlib.sha256(json.dumps(ids).encode())
    for im in images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


class ChatService:
    """The request -> answer logic behind the HTTP server (usable without it).

    ``model``: an EmmaMamba, or a MambaLM with ``tokenizer``. ``defaults``: the GenerationConfig a request's fields
    override (its ``max_new_tokens`` is also the most a request may ask for unless ``max_new_tokens_limit``).
    ``state_cache``: how many conversation states to keep for follow-up requests (0: none; see the module doc).
    ``max_batch``: requests decoded together (continuous batching, :mod:`emma_mamba.inference.batching`; 1: one
    at a time). ``prefill_chunk``: the most prompt positions prefilled between two decode steps while answers
    are being decoded (chunked prefill; 0 or None: whole prompts).
    """

    def __init__(self, model, *, tokenizer=None, defaults: GenerationConfig | None = None,
                 model_name: str | Sequence[str] = "emma-mamba", allow_local_images: bool = False,
                 max_prompt_positions: int = 32768, max_new_tokens_limit: int | None = None, state_cache: int = 16,
                 max_batch: int = 8, prefill_chunk: int | None = 512):
        from emma_mamba.models.vlm import EmmaMamba

        self.vlm = model if isinstance(model, EmmaMamba) else None
        self.lm = model.lm if self.vlm is not None else model
        self.tokenizer = self.vlm.tokenizer if self.vlm is not None else tokenizer
        if self.tokenizer is None:
            raise ValueError("ChatService: a text-only MambaLM needs its tokenizer")
        self.chat = self.vlm.config.chat if self.vlm is not None else ChatConfig()  # the model's chat format
        self.defaults = defaults or GenerationConfig(max_new_tokens=256)
        # the id the API reports, then its aliases: a request's "model" must be one of them (or absent)
        self.model_names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
        if not self.model_names or not all(isinstance(m, str) and m for m in self.model_names):
            raise ValueError(f"ChatService: model_name must be a non-empty name or names, got {model_name!r}")
        self.model_name = self.model_names[0]
        self.allow_local_images = allow_local_images
        self.max_prompt_positions = max_prompt_positions
        self.max_new_tokens_limit = max_new_tokens_limit or max(self.defaults.max_new_tokens, 4096)
        self.decoder = BatchDecoder(self.lm, max_batch=max_batch, compile=self.defaults.compile,
                                    cuda_graphs=self.defaults.cuda_graphs, prefill_chunk=prefill_chunk,
                                    embed_batch=vlm_embed_batch(self.vlm) if self.vlm is not None else None)
        self.state_cache_size = state_cache
        self.states: OrderedDict[str, tuple] = OrderedDict()  # history key -> (MambaCache, pending token ids)

    @property
    def served(self) -> str:
        """The names this server answers to, for messages: 'a' or 'b'."""
        return " or ".join(repr(m) for m in self.model_names)

    def _check_model(self, body) -> None:
        """A request that names a model must name this one (or an alias): one that names another, meant for another
        server, is refused as OpenAI's API and vLLM refuse it (404, code model_not_found), not answered by this
        model under that name. No "model" at all is this one (and a body that is no object is refused by name
        where its fields are read)."""
        model = body.get("model") if isinstance(body, dict) else None
        if model is None or model in self.model_names:
            return
        raise RequestError(f"the model {str(model)[:200]!r} does not exist here: this server serves {self.served} "
                           f"(`emma-mamba serve --model-name` sets the names)", "model", 404, "model_not_found")

    def _config(self, body: dict, min_new: int = 1, choices: bool = False) -> GenerationConfig:
        """The request's GenerationConfig; ``choices``: ``n`` (1..max_batch) goes into its num_return_sequences."""
        d = self.defaults
        self._check_model(body)
        n = body.get("n")
        n = 1 if n is None else n  # null is the default, as OpenAI's API has it
        if not choices and n != 1:
            raise RequestError("only n = 1 is supported here", "n")
        top_n = self.decoder.max_batch
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top_n:
            raise RequestError(f"n must be an integer from 1 to {top_n} (this server's --max-batch), got {n!r}", "n")
        for field, off in _UNSUPPORTED_FIELDS.items():  # sampling controls this server lacks: refused, not ignored
            value = body.get(field)
            if value is not None and value != off:
                raise RequestError(f"{field} is not supported by this server (its sampling knows temperature, top_p, "
                                   f"top_k, repetition_penalty, stop and seed); send {off!r} or leave it out, "
                                   f"got {value!r}", field)
        best_of, suffix = body.get("best_of"), body.get("suffix")  # completions' controls this server lacks
        if best_of is not None and best_of not in (1, n):
            raise RequestError(f"best_of is not supported by this server (it returns every choice it samples: use "
                               f"n); send 1 or leave it out, got {best_of!r}", "best_of")
        if suffix not in (None, ""):
            raise RequestError(f"suffix is not supported by this server (no fill-in-the-middle); leave it out, got "
                               f"{str(suffix)[:80]!r}", "suffix")
        for field, off in _PLAIN_TEXT_FIELDS.items():
            value = body.get(field)
            if value is not None and value != off:
                raise RequestError(f"{field} is not supported by this server (the model answers in plain text: no "
                                   f"tool calls, structured output or audio); "
                                   f"{'leave it out' if off is None else f'send {off!r} or leave it out'}, got "
                                   f"{str(value)[:80]!r}", field)
        if body.get("stream_options") is not None and not _flag(body, "stream"):  # as OpenAI refuses it
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_new = _number(body, key, int, min_new, self.max_new_tokens_limit, d.max_new_tokens)
        kw = {k: _number(body, k, float, lo, hi, getattr(d, k)) for k, (lo, hi) in _FLOAT_FIELDS.items()}
        top_k = _number(body, "top_k", int, 0, 1 << 30, d.top_k)
        seed = body.get("seed", d.seed)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
        if seed is not None and not SEED_MIN <= seed <= SEED_MAX - (n - 1):  # choice i samples with seed + i
            raise RequestError(f"seed must be in [{SEED_MIN}, {SEED_MAX - (n - 1)}] (a 64-bit generator seed; with "
                               f"n={n} choices, seed + {n - 1} too), got {seed}", "seed")
        stop = body.get("stop")
        if stop is None:
            stops = list(d.stop_strings)
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
            stops = list(stop)
        else:
            raise RequestError("stop must be a string or a list of strings, each non-empty", "stop")
        if any(not x for x in stops):
            raise RequestError("stop must be a string or a list of strings, each non-empty, got ''", "stop")
        if stop is not None and (len(stops) > MAX_STOPS or sum(map(len, stops)) > MAX_STOP_CHARS):
            # each token's text is checked against every stop string on the decoder's thread, which serves every
            # request: a request's stop strings are bounded, as OpenAI's API bounds them (it takes 4)
            raise RequestError(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters in "
                               f"all, got {len(stops)} of {sum(map(len, stops))}", "stop")
        try:
            cfg = dataclasses.replace(d, max_new_tokens=max_new, top_k=top_k, seed=seed, stop_strings=tuple(stops),
                                      eos_token_id=self.tokenizer.eos_token_id, num_return_sequences=n, **kw)
            return self.vlm.stops(cfg) if self.vlm is not None else cfg  # + a chat format's own turn_end
        except ValueError as e:  # what GenerationConfig itself refuses (top_p 0, ...), named by its field
            field = next((k for k in ("top_p", "repetition_penalty", "temperature", "seed") if f".{k} " in str(e)),
                         None)
            raise RequestError(str(e).replace("GenerationConfig.", ""), field) from None

    def _inputs(self, body: dict):
        image_token = self.vlm.config.image_token if self.vlm is not None else "<image>"
        # a text-only LM's tokenizer has no placeholder token: "<image>" is ordinary text there
        turns, dropped = parse_messages(body.get("messages"), self.vlm is not None, self.allow_local_images,
                                        image_token if self.vlm is not None else None)
        position = self.vlm.config.vision.image_position if self.vlm is not None else "in_turn"
        ids, images, instructions, (n_hist, n_hist_images) = conversation_ids(self.tokenizer, turns, image_token,
                                                                              position, self.chat)
        if self.vlm is None:
            n_pos = len(ids)
        else:
            n_pos = len(ids) + len(images) * (self.vlm.vision.num_tokens - 1)
        if n_pos > self.max_prompt_positions:  # said before any image is decoded
            raise RequestError(f"the conversation is {n_pos} positions long (visual tokens included), more than "
                               f"this server's max_prompt_positions {self.max_prompt_positions}", "messages")
        # what the encoder's resize cannot take is this request's fault: a 400, before any work
        decode_images(turns, self.allow_local_images,
                      self.vlm.image_processor.check_size if self.vlm is not None else None)
        images = [im for t in turns for im in t.images]
        # the history before the last user turn may have a carried state
        resume = (n_hist, n_hist_images, _history_key(ids[:n_hist], images[:n_hist_images])) if n_hist else None
        return ids, images, instructions, n_pos, dropped, resume

    def prepare(self, body: dict) -> tuple:
        """A request checked and decoded (RequestError naming the field otherwise), ready for :meth:`answer`."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        want = body.get("logprobs", False)
        if want is not None and not isinstance(want, bool):
            raise RequestError(f"logprobs must be true or false, got {want!r}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise RequestError(f"top_logprobs must be an integer in [0, 20] or null, got {top!r}", "top_logprobs")
        if top is not None and not want:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        return self._config(body, choices=True), *self._inputs(body), (top or 0) if want else None

    def complete(self, body: dict, streamer: Callable[[str], None] | None = None,
                 client_gone: Callable[[], bool] | None = None) -> dict:
        """The chat.completion object for ``body`` (``streamer`` receives the text as it is produced;
        ``client_gone``: see :meth:`answer`)."""
        return self.answer(self.prepare(body), streamer, client_gone=client_gone)

    def answer(self, prepared: tuple, streamer: Callable[[str], None] | None = None,
               on_chunk: Callable[..., None] | None = None,
               client_gone: Callable[[], bool] | None = None) -> dict:
        """The chat.completion of a prepared request, decoded in the shared batch. ``streamer`` (one choice)
        receives the text as it is produced, on the calling thread; ``on_chunk(index, text)`` each choice's, and
        when the request asks for logprobs ``on_chunk(index, text, logprobs)``: the text cut at token boundaries
        and OpenAI's chunk ``logprobs`` (``{"content": [...]}``) of the tokens whose text it completes (a last call
        may carry text-less tokens with ``""``: see :class:`~emma_mamba.inference.batching._ScoredText`).
        ``n`` choices continue one prefilled state (forks of the first choice's job); choice i samples with
        ``seed + i`` when a seed is given."""
        cfg, ids, images, instructions, n_pos, dropped, resume, top = prepared
        n = cfg.num_return_sequences
        if streamer is not None:
            if n > 1:
                raise ValueError("ChatService.answer: a streamer takes one choice; pass on_chunk for n > 1")
            on_chunk = None
        info: dict = {}

        def start():  # on the decoder's thread: the state cache is touched there only
            info["t0"] = time.perf_counter()
            hit = None
            if resume is not None and self.state_cache_size:
                hit = self.states.get(resume[2])
            if hit is not None:  # continue the carried state: prefill the pending tokens and the new turn only
                self.states.move_to_end(resume[2])
                state, pending = hit
                cache = state.select([0])  # a copy: the stored state stays for other continuations
                new_ids, new_images = pending + ids[resume[0]:], images[resume[1]:]
                new_inst = instructions[resume[1]:]
            else:
                cache, new_ids, new_images, new_inst = None, ids, images, instructions
            info["hit"] = hit is not None
            if self.vlm is not None:
                inst = new_inst if new_images and self.vlm.instruction is not None else None
                # embedded by the decoder with the images of the other requests of its round (vlm_embed_batch)
                info["prefilled"] = len(new_ids) + len(new_images) * (self.vlm.vision.num_tokens - 1)
                return {"embed": (new_ids, new_images, inst), "cache": cache, "logprobs": top}
            info["prefilled"] = len(new_ids)
            # the repetition penalty counts the whole conversation, whatever part of it the state cache spares
            return {"input_ids": new_ids, "cache": cache, "seen": ids, "logprobs": top}

        def finish(seq, state, stats):
            text = seq.text()
            if self.state_cache_size:
                self._keep_state(ids, images, seq, text, state)
            out = {"text": text, "reason": seq.reason, "tokens": len(seq.tokens), "stats": stats}
            if top is not None:
                out["logprobs"] = self._chat_logprobs(seq, stats)
            return out

        streamed = streamer is not None or on_chunk is not None
        scored = on_chunk is not None and top is not None  # the chunks carry their tokens' logprobs
        jobs = [DecodeJob(dataclasses.replace(cfg, num_return_sequences=1,
                                              seed=None if cfg.seed is None else cfg.seed + i),
                          start, finish, self.tokenizer, stream=streamed, stream_logprobs=scored) for i in range(n)]
        jobs[0].forks = jobs[1:]
        merged: queue.Queue | None = queue.Queue() if on_chunk is not None else None
        if merged is not None:  # every choice's chunks into one queue, tagged with its index
            for i, job in enumerate(jobs):
                job.chunks = _Tagged(merged, i)
        self.decoder.submit(jobs[0])
        if merged is not None:
            _drain(jobs, merged, on_chunk if not scored else lambda i, item: on_chunk(
                i, item[0], {"content": [self._chat_entry(t, e) for t, e in item[1]]}))
        elif streamer is None:
            _await(jobs, client_gone)
        outs = [jobs[0].wait(streamer)] + [j.wait() for j in jobs[1:]]
        stats = outs[0]["stats"]
        n_new = sum(o["tokens"] for o in outs)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": o["text"]},
                         "logprobs": o.get("logprobs"),
                         "finish_reason": "length" if o["reason"] == "length" else "stop"} for i, o in enumerate(outs)],
            "usage": {"prompt_tokens": n_pos, "completion_tokens": n_new, "total_tokens": n_pos + n_new},
            "emma_mamba": {"seconds": time.perf_counter() - info["t0"],
                           "prefill_seconds": stats["prefill_seconds"], "finish_reason": outs[0]["reason"],
                           "dropped_system_messages": dropped, "state_cache": "hit" if info["hit"] else "miss",
                           "prefilled_positions": info["prefilled"],
                           "batch_rows": max(o["stats"]["max_batch_rows"] for o in outs),
                           "prefill_chunks": stats["prefill_chunks"]},
        }

    def _chat_logprobs(self, seq, stats: dict) -> dict:
        """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``, one entry
        per answer token (an end-of-sequence token included)."""
        return {"content": [self._chat_entry(t, e) for t, e in zip(_scored_tokens(seq), stats["logprobs"] or [])]}

    def _chat_entry(self, token: int, scores: tuple) -> dict:
        """One ``logprobs.content`` entry: ``token`` and its (logprob, [(alternative, logprob)]) ``scores``
        (:func:`~emma_mamba.inference.batching.token_logprobs`), plain or streamed alike."""
        def entry(i: int, lp: float) -> dict:
            text = self._token_text(i)
            # bytes: the token's own (a piece of a split character decodes to U+FFFD; its bytes join the character)
            return {"token": text, "logprob": lp, "bytes": list(self.tokenizer.token_bytes(i))}

        return {**entry(token, scores[0]), "top_logprobs": [entry(i, v) for i, v in scores[1]]}

    def _keep_state(self, ids: list[int], images: list, seq, text: str, state) -> None:
        """Store the state after this answer under the history a follow-up request will send, when the answer's
        text tokenises back to the generated tokens (else that request would not match the state)."""
        tok, final, reason = self.tokenizer, seq.final, seq.reason
        if final is None or reason == "stop":  # a stop string: the text is cut inside the generated tokens
            return
        sent = tok.encode(text + self.chat.turn_end)  # what the client's next request carries for this answer
        # the state holds every generated token but the last; the last (and an end of turn) are pending
        pending = pending_tokens(final, reason, tok, self.chat.turn_end)
        if sent != (seq.tokens if reason == "eos" else seq.tokens[:-1]) + pending:
            return
        key = _history_key(ids + sent, images)
        self.states[key] = (state, pending)
        self.states.move_to_end(key)
        while len(self.states) > self.state_cache_size:
            self.states.popitem(last=False)

    def close(self) -> None:
        """Stop the decoder thread."""
        self.decoder.close()

    # ------------------------------------------------------------------ text completions and the tokenizer

    def text_completion(self, body: dict, client_gone: Callable[[], bool] | None = None) -> dict:
        """The text_completion object of a ``/v1/completions`` request: raw prompts (strings or token id lists,
        one or several) continued by the LM without the chat template, with ``echo`` and ``logprobs`` (each
        token's log-probability under the model, and the ``logprobs`` most likely alternatives), as
        lm-evaluation-harness's ``local-completions`` model asks for them; ``n`` choices per prompt (prompt-major
        indices, choice i sampled with ``seed + i``), continuing one prefill of the prompt. All prompts of a request
        are decoded in the shared batch; ``client_gone``: see :meth:`answer`."""
        prompts, jobs, _, _ = self._completion_jobs(body)
        _await(jobs, client_gone)
        choices = []
        for i, job in enumerate(jobs):
            choices.append({"index": i, **job.wait()})
        n_prompt = sum(len(p) for p in prompts)  # (a prompt counts once, whatever its n)
        n_new = sum(c.pop("_completion_tokens") for c in choices)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    def stream_text_completion(self, body: dict, opened: Callable[[], None],
                               send: Callable[[dict], None]) -> None:
        """``/v1/completions`` with ``stream: true``: ``opened()`` once the request is valid (a bad field raises
        RequestError before it), then ``send(chunk)`` for every text_completion chunk, as OpenAI streams them:
        each prompt's text as it is produced under its ``index`` (its prompt first with ``echo``), a chunk with
        its ``finish_reason`` when it ends, and with ``stream_options.include_usage`` a ``usage: null`` in each of
        them and a last chunk with no choices and the ``usage`` (without it, every chunk has a choice: a client
        reading ``chunk.choices[0]``, as OpenAI's examples do, never meets an empty list). Every prompt is
        decoded in the shared batch; a ``send`` that raises (the client went away) cancels them all.

        With ``logprobs`` each text chunk carries the ``logprobs`` (``tokens``, ``token_logprobs``,
        ``top_logprobs``, ``text_offset``) of exactly the tokens whose text it holds (the text is cut at token
        boundaries; the tokens no text shows come in a last chunk, text ``""``, when no text is left), the
        offsets counted as the plain answer counts them (into the prompt's text and the completion's, from the
        prompt's length without ``echo``), so that the chunks' lists, joined, are the plain answer's. With
        ``echo`` the chunk that echoes the prompt carries its tokens' (the first without a log-probability, as in
        the plain answer), and is sent once the prompt is prefilled (its scores are the prefill's)."""
        merged: queue.Queue = queue.Queue()  # every job's text chunks, tagged with its index
        prompts, jobs, echo, top = self._completion_jobs(body, merged)
        include_usage = _include_usage(body)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        n = len(jobs) // len(prompts)
        prompt_texts = [self.tokenizer.decode(ids, skip_special_tokens=False) if echo or top is not None else ""
                        for ids in prompts]  # (without echo, the start of the logprobs' text_offset)

        def chunk(choices, **extra):
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices, **({"usage": None} if include_usage else {}), **extra}

        def text_chunk(i: int, text: str, logprobs: dict | None = None) -> None:
            send(chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": None}]))

        # where each choice's next token's text_offset starts: as _completion_choice counts them
        at = [0 if echo else len(prompt_texts[i // n]) for i in range(len(jobs))]

        def scored_chunk(i: int, item: tuple) -> None:
            text, entries = item
            if text is None:  # the prompt's scores (echo): the chunk echoing the prompt carries them
                ids = prompts[i // n]
                text, entries = prompt_texts[i // n], [(ids[0], None)] + list(zip(ids[1:], entries))
            logprobs, at[i] = self._completion_logprobs(entries, at[i])
            text_chunk(i, text, logprobs)

        opened()
        try:
            if echo and top is None:  # (with logprobs the prompt's chunk waits for its scores: scored_chunk)
                for i, text in enumerate(prompt_texts):
                    for c in range(i * n, (i + 1) * n):  # every choice of the prompt starts with it
                        text_chunk(c, text)
            _drain(jobs, merged, text_chunk if top is None else scored_chunk,
                   lambda i, res: send(chunk([{"index": i, "text": "", "logprobs": None,
                                               "finish_reason": res["finish_reason"]}])))
        except BaseException:
            for job in jobs:
                job.cancelled = True
            raise
        if include_usage:
            n_new = sum(job.result["_completion_tokens"] for job in jobs)
            n_prompt = sum(len(p) for p in prompts)
            send(chunk([], usage={"prompt_tokens": n_prompt, "completion_tokens": n_new,
                                  "total_tokens": n_prompt + n_new}))

    def _completion_jobs(self, body, merged: queue.Queue | None = None) -> tuple[list[list[int]], list[DecodeJob],
                                                                                 bool, int | None]:
        """Check a ``/v1/completions`` body and submit one job per choice: (prompts' ids, jobs, echo, logprobs).
        With ``merged`` the jobs stream, their chunks put there as (choice index, chunk); with logprobs too each
        chunk is a (text, scored tokens) pair (:class:`~emma_mamba.inference.batching.DecodeJob`)."""
        stream = merged is not None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        echo = _flag(body, "echo")
        _flag(body, "stream")  # checked here too for callers of the service without the HTTP layer
        top = body.get("logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise RequestError(f"logprobs must be an integer in [0, 20] or null, got {top!r}", "logprobs")
        if stream:
            _include_usage(body)
        cfg = self._config(body, min_new=0 if echo else 1, choices=True)
        n = cfg.num_return_sequences
        prompts = self._completion_prompts(body.get("prompt"))
        if len(prompts) * n > MAX_PROMPTS:
            raise RequestError(f"{len(prompts)} prompts x n={n} are {len(prompts) * n} answers, more than "
                               f"{MAX_PROMPTS} in one request; send them in several requests", "prompt")
        jobs = []  # choice order: prompt 0's n choices, then prompt 1's, ... (OpenAI's index = prompt * n + i)
        for ids in prompts:
            spec = {"input_ids": ids, "seen": ids, "logprobs": top, "echo_logprobs": echo and top is not None}

            def finish(seq, state, stats, ids=ids):  # (a stream's logprobs went out with its chunks)
                return self._completion_choice(ids, seq, stats, echo and not stream, None if stream else top)

            # n choices continue one prefill (forks of the first); choice i samples with seed + i
            mine = [DecodeJob(dataclasses.replace(cfg, num_return_sequences=1,
                                                  seed=None if cfg.seed is None else cfg.seed + i),
                              lambda spec=spec: spec, finish, self.tokenizer, stream=stream,
                              stream_logprobs=stream and top is not None) for i in range(n)]
            mine[0].forks = mine[1:]
            for job in mine:
                if stream:
                    job.chunks = _Tagged(merged, len(jobs))
                jobs.append(job)
            self.decoder.submit(mine[0])
        return prompts, jobs, echo, top

    def _completion_prompts(self, prompt) -> list[list[int]]:
        """``prompt`` as token id lists: a string, a list of strings, a list of ids, or a list of id lists."""
        # ids the tokenizer has a token for (a checkpoint's vocabulary may be larger: the public Mamba ones' 50280
        # rows against GPT-NeoX's 50277 tokens and the placeholder); an id past them has no text to echo or score
        vocab = output_vocab(self.lm, self.tokenizer)[0]
        # raw prompts carry no images: on a multimodal model the placeholder would read an embedding row that
        # is never trained (its slot is always replaced by visual tokens), so it is refused as text and as id
        reserved = (self.vlm.config.image_token, self.vlm.image_token_id) if self.vlm is not None else None

        def ids_of(p, where):
            if isinstance(p, str):
                if reserved is not None and reserved[0] in p:
                    raise RequestError(f"{where} holds {reserved[0]!r}, the model's image placeholder: that text is "
                                       f"reserved, and /v1/completions takes no images (send images to "
                                       f"/v1/chat/completions as image_url parts); remove it", where)
                ids = self.tokenizer.encode(p)
            elif _is_id_list(p):
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise RequestError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})", where)
                if reserved is not None and reserved[1] in p:
                    raise RequestError(f"{where}: token id {reserved[1]} is the model's image placeholder "
                                       f"{reserved[0]!r}, and /v1/completions takes no images", where)
                ids = list(p)
            else:
                raise RequestError(f"{where} must be a string or a list of token ids", where)
            if not ids:
                raise RequestError(f"{where} is empty", where)
            if len(ids) > self.max_prompt_positions:
                raise RequestError(f"{where} is {len(ids)} tokens long, more than this server's "
                                   f"max_prompt_positions {self.max_prompt_positions}", where)
            return ids

        if isinstance(prompt, str) or (prompt and _is_id_list(prompt)):
            return [ids_of(prompt, "prompt")]
        if isinstance(prompt, list) and prompt:
            if len(prompt) > MAX_PROMPTS:  # (before tokenising them): one request held the decoder for minutes
                raise RequestError(f"prompt lists {len(prompt)} prompts, more than {MAX_PROMPTS} in one request; "
                                   f"send them in several requests", "prompt")
            return [ids_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of such "
                           "lists (non-empty)", "prompt")

    def _token_text(self, i: int) -> str:
        return self.tokenizer.decode([i], skip_special_tokens=False)

    def _completion_choice(self, ids: list[int], seq, stats: dict, echo: bool, top: int | None) -> dict:
        text = seq.text()
        prompt_text = self.tokenizer.decode(ids, skip_special_tokens=False) if echo or top is not None else ""
        choice = {"text": prompt_text + text if echo else text,
                  "finish_reason": "length" if seq.reason == "length" else "stop",
                  "logprobs": None, "_completion_tokens": len(seq.tokens)}
        if top is not None:
            picked = _scored_tokens(seq)
            entries = list(zip(picked, stats["logprobs"] or []))
            if echo:
                entries = [(ids[0], None)] + list(zip(ids[1:], stats["prompt_logprobs"] or [])) + entries
            # offsets into prompt + completion, as OpenAI's (without echo the first is the prompt's length)
            choice["logprobs"], _ = self._completion_logprobs(entries, 0 if echo else len(prompt_text))
        return choice

    def _completion_logprobs(self, entries: list, at) -> tuple[dict, tuple]:
        """``/v1/completions``' ``logprobs`` of (token, scores or None) ``entries``, the first token's text at
        character offset ``at`` (an int, or what the previous call returned: where a stream's next chunk goes on
        counting). Offsets count the characters of the text the tokens' bytes decode to, as the answer's text
        holds them: a character split over byte tokens is one character, at the offset of its first piece's
        token and of the next pieces' (each piece alone decodes to U+FFFD, whose count put every later offset
        past its text)."""
        tokens = [self._token_text(t) for t, _ in entries]
        chars, utf8 = at if isinstance(at, tuple) else (at, codecs.getincrementaldecoder("utf-8")("replace"))
        offsets = []
        for t, _ in entries:
            offsets.append(chars)
            chars += len(utf8.decode(self.tokenizer.token_bytes(t)))  # an incomplete character waits in utf8
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else e[0] for _, e in entries],
                "top_logprobs": [None if e is None else {self._token_text(i): v for i, v in e[1]}
                                 for _, e in entries],
                "text_offset": offsets}, (chars, utf8)

    def tokenizer_info(self) -> dict:
        """``GET /tokenizer_info`` (vLLM's; lm-evaluation-harness's remote tokenizer reads it)."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        return {"eos_token": tok.backend.id_to_token(eos) if eos is not None else None, "bos_token": None,
                "pad_token": None, "model_max_length": self.max_prompt_positions,
                "tokenizer_class": "emma_mamba"}

    def tokenize(self, body: dict) -> dict:
        self._check_model(body)
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise RequestError("prompt must be a string", "prompt")
        ids = self.tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_prompt_positions}

    def detokenize(self, body: dict) -> dict:
        self._check_model(body)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not _is_id_list(ids):
            raise RequestError("tokens must be a list of token ids", "tokens")
        if any(not 0 <= t < len(self.tokenizer) for t in ids):
            raise RequestError("tokens: an id is outside the tokenizer's vocabulary", "tokens")
        return {"prompt": self.tokenizer.decode(ids)}


def _scored_tokens(seq) -> list[int]:
    """The tokens an answer's log-probabilities are recorded for: the generated ones and a picked end of sequence
    (scored too, though not part of the text)."""
    return seq.tokens + ([seq.final] if seq.reason == "eos" else [])


def _await(jobs, client_gone: Callable[[], bool] | None) -> None:
    """Wait for ``jobs`` (a plain, not streamed, answer), checking four times a second for a client that gave up
    (a timeout, a closed tab, a killed harness): then every job is cancelled, so that its rows stop decoding, and
    ConnectionResetError raised. (A streamed answer stops at its next chunk, which meets the closed socket.)"""
    if client_gone is None:
        return
    while True:
        pending = next((j for j in jobs if not j.done.is_set()), None)
        if pending is None:
            return
        # wait on the first unfinished job a quarter second at most, then look at the client: a request of many
        # short jobs each done within the quarter second was never checked (all() waited them out one by one)
        if pending.done.wait(0.25) and all(j.done.is_set() for j in jobs):
            return
        if client_gone():
            for j in jobs:
                j.cancelled = True
            raise ConnectionResetError("the client went away before its answer was complete")


def _error_body(message: str, param: str | None, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: every response but a stream states its length (a stream ends the connection);
    a connection idle ``keep_alive_timeout`` seconds before its next request is closed, and so is one whose
    request body was refused unread (its bytes would be read as the next request)."""

    service: ChatService
    api_key: str | None = None  # when set, every request but /health needs "Authorization: Bearer <key>"
    max_body_bytes: int = 64 << 20
    server_version = "emma-mamba"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # a keep-alive response's body is not held back behind its headers' ACK
    keep_alive_timeout: float = 15.0  # seconds a connection may wait for its next request (or its first)
    io_timeout: float = 60.0  # seconds one read of a request's body or one write of its answer may block
    cors_origins: frozenset[str] = frozenset()  # origins answered with CORS headers ("*": any); empty: no CORS

    web_ui: bool = True  # GET / answers the chat page (emma_mamba/assets/webui.html)

    def handle_one_request(self) -> None:
        """One request of the connection, once it comes: waiting for it is idle (closed by the server's stop, or
        after ``keep_alive_timeout`` seconds: the connection ends without a word, as a client expects of an idle
        keep-alive connection), handling it is not."""
        self.headers, self._status, self._connection_sent, self._body_read = None, 0, False, False
        self._unread_body = False
        self._holds_place = False  # one of max_concurrent_requests' places (a generation request's, once admitted)
        self.connection.settimeout(self.keep_alive_timeout)  # also bounds the request line and headers
        try:
            if not self.rfile.peek(1):  # the client (or the server's stop) closed the connection
                self.close_connection = True
                return
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not self.server.begin_request(self.connection):  # the server is stopping
            self.close_connection = True
            return
        try:
            super().handle_one_request()
        finally:
            self.server.end_request(self.connection)
            if self.server.stopping:
                self.close_connection = True

    def parse_request(self) -> bool:
        """The request line and headers; a query string (Azure-style clients send ``?api-version=...``) is
        dropped from the path the routes see (no endpoint reads one)."""
        ok = super().parse_request()
        if ok:
            self.path, _, self.query = self.path.partition("?")
            # the body and the answer take what they take, but no single read or write waits on the client more
            # than io_timeout (one whose upload stalls, or who stops reading its stream, would hold a thread and a
            # socket for ever)
            self.connection.settimeout(self.io_timeout)
        return ok

    def send_response_only(self, code, message=None) -> None:
        self._status, self._connection_sent = code, False
        super().send_response_only(code, message)

    def send_header(self, keyword, value) -> None:
        if keyword.lower() == "connection":
            self._connection_sent = True
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        """The headers every response gets: CORS for an allowed origin, and ``Connection: close`` where the
        connection ends after it (a body refused unread: its bytes are no next request)."""
        headers = self.headers
        if self._status >= 200:
            # no page may frame this server's (clickjacking), nor read its answers as another type
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
            self.send_header("X-Content-Type-Options", "nosniff")
            if headers is not None:
                if self.cors_origins:
                    origin = self._allowed_origin()
                    if origin is not None:
                        self.send_header("Access-Control-Allow-Origin", origin)
                    self.send_header("Vary", "Origin")
                has_body = headers.get("Transfer-Encoding") is not None \
                    or headers.get("Content-Length", "0").strip() not in ("", "0")
                if has_body and not self._body_read:
                    self.close_connection = self._unread_body = True
            if self.close_connection and not self._connection_sent:
                self.send_header("Connection", "close")
        super().end_headers()

    def finish(self) -> None:
        """After the answer: where the request's body was left unread, read and drop what the client still
        sends of it (up to its declared length, for ``LINGER_SECONDS`` at most) before the connection closes. Closing a
        socket with unread bytes in it resets the connection, and the reset discards the answer the client has
        not read yet: a client uploading a body over the limit saw "connection reset" instead of the 413."""
        super().finish()
        if not self._unread_body:
            return
        import socket

        try:
            left = int(self.headers.get("Content-Length", ""))
        except (TypeError, ValueError):
            left = 1 << 62  # chunked, or a length that was the error: until the client stops or the time is up
        conn, deadline = self.connection, time.monotonic() + self.LINGER_SECONDS
        try:
            conn.shutdown(socket.SHUT_WR)  # the answer is whole: the client reads its end
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                conn.settimeout(min(wait, 0.5))
                chunk = conn.recv(min(left, 1 << 16))
                if not chunk:  # the client closed
                    break
                left -= len(chunk)
        except OSError:  # a timeout, or the client reset it: nothing more to do
            pass

    LINGER_SECONDS = 5.0
    """How long :meth:`finish` reads the rest of a body left unread (a client's upload in progress)."""

    def _allowed_origin(self) -> str | None:
        """The request's ``Origin`` when the server answers it with CORS headers, else None."""
        origin = self.headers.get("Origin") if self.headers is not None else None
        if origin is None or not self.cors_origins:
            return None
        return origin if "*" in self.cors_origins or origin.lower() in self.cors_origins else None

    def _foreign_origin(self) -> str | None:
        """A browser's ``Origin`` of a page that is neither this server's own (its chat page) nor allowed by
        ``cors_origins``, else None. Browsers send a form or ``text/plain`` POST to any server without asking
        (no preflight): without this check any web page a user opened could make their local server generate
        (and, through --allow-local-images, read local images), unseen. Clients outside a browser send no
        Origin."""
        origin = self.headers.get("Origin") if self.headers is not None else None
        if origin is None or self._allowed_origin() is not None:
            return None
        hosts = {h.strip().lower() for h in (self.headers.get("Host"), self.headers.get("X-Forwarded-Host"))
                 if h}  # (a reverse proxy passing the page's host on)
        own = {f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")}
        return None if origin.lower() in own else origin

    def _authorized(self) -> bool:
        if self.api_key is None or self.path.rstrip("/") in ("/health", "") and self.command in ("GET", "HEAD"):
            return True  # the health check, and the chat page (static: it sends the key the user types)
        import hmac

        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110: "bearer" is "Bearer"); the key is compared in constant time
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                              self.api_key.encode()):
            return True
        self._json(401, _error_body("missing or wrong API key (Authorization: Bearer <key>)", None,
                                    "authentication_error"), {"WWW-Authenticate": 'Bearer realm="emma-mamba"'})
        return False

    def log_message(self, fmt, *args):  # through logging, not stderr prints
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        """A whole response with its length (to a HEAD request: its headers only)."""
        self._release_place()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._answer_sent()

    def _release_place(self) -> None:
        """Give back the request's place among ``max_concurrent_requests``, if it holds one: done before its answer's
        last bytes are written, so a client that sends its next request on reading them is never refused for the
        place its own last request held."""
        if self._holds_place:
            self._holds_place = False
            self.server.release()

    def _answer_sent(self) -> None:
        """The request's answer is completely written: a stop now cuts nothing off, though the handler is still
        running (:meth:`_Server.unanswered_requests`)."""
        self.server.answered(self.connection)

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own errors (a malformed request line, an unknown method): whole once sent."""
        super().send_error(code, message, explain)
        self._answer_sent()

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def do_GET(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") == "" and self.web_ui:
            return self._send(200, _web_ui_page(), "text/html; charset=utf-8")
        if self.path.rstrip("/") == "/health":
            dec = self.service.decoder
            return self._json(200, {"status": "ok", "decoding": dec.active, "prefilling": len(dec.pending),
                                    "queued": dec.queue.qsize(), "max_batch": dec.max_batch,
                                    "prefill_chunk": dec.prefill_chunk or 0})
        if self.path.rstrip("/") == "/tokenizer_info":
            return self._json(200, self.service.tokenizer_info())
        cards = [{"id": m, "object": "model", "created": 0, "owned_by": "emma-mamba"} for m in self.service.model_names]
        if self.path.rstrip("/") == "/v1/models":  # the reported name first, then its aliases (as vLLM lists them)
            return self._json(200, {"object": "list", "data": cards})
        if self.path.startswith("/v1/models/"):  # OpenAI's model retrieval (an id may hold "/", sent encoded)
            from urllib.parse import unquote

            name = unquote(self.path[len("/v1/models/"):].rstrip("/"))
            for card in cards:
                if name == card["id"]:
                    return self._json(200, card)
            return self._json(404, _error_body(f"no such model: {name!r} (this server serves {self.service.served})",
                                               "model", "not_found_error", "model_not_found"))
        if self.path.rstrip("/") in _POST_ROUTES:
            return self._json(405, _error_body(f"{self.command} {self.path}: this endpoint takes POST", None),
                              {"Allow": "POST"})
        return self._json(404, _error_body(f"no such endpoint: GET {self.path}", None, "not_found_error"))

    def do_HEAD(self):
        """A GET's status and headers, without its body."""
        self.do_GET()

    def do_OPTIONS(self):
        """A CORS preflight (no API key: browsers send none with it): for an allowed origin, the methods and
        headers its request may use. Without ``cors_origins`` a 405, as before CORS was served."""
        allow = {"Allow": "GET, HEAD, POST, OPTIONS"}
        if not self.cors_origins:
            return self._json(405, _error_body("OPTIONS: this server answers no cross-origin (CORS) requests; start "
                                               "it with --cors-origin ORIGIN to let pages of ORIGIN call it", None),
                              allow)
        origin = self.headers.get("Origin")
        if origin is None:  # not a preflight: what the server allows
            self.send_response(204)
            self.send_header("Allow", allow["Allow"])
            self.end_headers()
            return self._answer_sent()
        if self._allowed_origin() is None:
            return self._json(403, _error_body(f"origin {origin!r} is not allowed to call this server "
                                               f"(serve --cors-origin names the allowed ones)", None), allow)
        # the headers the page asks for (clients add their own, e.g. the openai package's x-stainless-*) are
        # allowed: the API key, not the header set, is what guards the API
        asked = [h.strip() for h in self.headers.get("Access-Control-Request-Headers", "").split(",")]
        names = ["Authorization", "Content-Type"] + [h for h in asked if _HEADER_NAME.fullmatch(h)
                                                     and h.lower() not in ("authorization", "content-type")]
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", ", ".join(names))
        self.send_header("Access-Control-Max-Age", str(_CORS_MAX_AGE))
        self.end_headers()
        self._answer_sent()

    def do_POST(self):
        foreign = self._foreign_origin()
        if foreign is not None:
            return self._json(403, _error_body(f"a request from a page of {foreign!r} is not allowed: this server "
                                               f"answers its own chat page and the origins serve --cors-origin "
                                               f"names", None, "permission_error"))
        if not self._authorized():
            return
        route = self.path.rstrip("/")
        others = {"/v1/completions": self.service.text_completion, "/tokenize": self.service.tokenize,
                  "/detokenize": self.service.detokenize}
        if route not in _POST_ROUTES:
            if route in _GET_ROUTES and (route or self.web_ui) or route.startswith("/v1/models/"):
                return self._json(405, _error_body(f"POST {self.path}: this endpoint takes GET", None),
                                  {"Allow": "GET, HEAD"})
            return self._json(404, _error_body(f"no such endpoint: POST {self.path}", None, "not_found_error"))
        try:
            n = self._content_length()
            if n > self.max_body_bytes:
                raise RequestError(f"the request body is {n} bytes, more than {self.max_body_bytes}", None, 413)
            raw = self.rfile.read(n)
            self._body_read = True
            if len(raw) < n:  # the client closed its connection mid-upload: no request, and no one to answer
                log.info("%s closed its connection %d bytes into a %d-byte request body", self.address_string(),
                         len(raw), n)
                self.close_connection = True
                return
            # counted in once its body is here: a client uploading slowly holds no place of the answered ones
            if route in _GENERATION_ROUTES:
                self._holds_place = self.server.admit()
                if not self._holds_place:
                    limit = self.server.max_concurrent_requests
                    raise RequestError(f"the server is busy: {limit} requests are being answered, its limit (serve "
                                       f"--max-concurrent-requests); retry shortly", None, 429, "too_many_requests")
            body = _parse_body(raw)
            # "stream" decides the response's form before the service reads the body: checked here first
            stream = _flag(body, "stream") if isinstance(body, dict) and route in _GENERATION_ROUTES else False
            if route == "/v1/completions" and stream:
                return self._stream_completion(body)
            if route in others:
                return self._json(200, others[route](body, client_gone=self._client_gone)
                                  if route == "/v1/completions" else others[route](body))
            if not stream:
                return self._json(200, self.service.complete(body, client_gone=self._client_gone))
            self._stream(body)
        except RequestError as e:
            self._json(e.status, _error_body(str(e), e.param, "rate_limit_error" if e.status == 429 else
                                             "invalid_request_error", code=e.code),
                       {"Retry-After": "1"} if e.status == 429 else None)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (mid-stream: generation stops)
            log.info("%s disconnected", self.address_string())
        except TimeoutError:
            self.close_connection = True
            if not self._body_read:  # its upload stalled: said, and the connection ends (the rest is no request)
                log.info("%s: the request body did not arrive within %g s", self.address_string(), self.io_timeout)
                self._body_read = True  # nothing more is read of it (finish() would wait for the rest)
                self._json(408, _error_body(f"the request body stopped arriving (nothing for {self.io_timeout:g} s)",
                                            None, code="request_timeout"))
            else:  # it stopped reading its answer: the connection is dropped, as a client gone is
                log.info("%s stopped reading its answer for %g s: connection closed", self.address_string(),
                         self.io_timeout)
        except DecoderClosed:  # the server is stopping (counted in its one line): not a failure to log as one
            self._json(503, _error_body("the server is stopping: this request was not answered", None,
                                        "server_error"))
        except Exception as e:  # noqa: BLE001 - the server must answer, not die
            log.exception("request failed")
            self._json(500, _error_body(f"{type(e).__name__}: {e}", None, "server_error"))
        finally:
            self._release_place()

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (its request was read whole: anything readable now is the
        end of the stream)."""
        import select
        import socket

        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _content_length(self) -> int:
        """The body's size from its Content-Length header (absent: 0). A malformed one is a 400, and the
        connection is closed after the answer: where this body ends, hence where a next request would start, is
        unknown. A chunked body (no length) is a 411: this server reads bodies of a stated length."""
        raw = self.headers.get("Content-Length")
        if raw is None and "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("the request body is sent chunked (Transfer-Encoding: chunked); send it with a "
                               "Content-Length header", None, 411)
        if raw is None:
            return 0
        try:
            n = int(raw.strip())
        except ValueError:
            n = -1
        if n < 0:  # a negative size would read until the client closes the connection
            self.close_connection = True
            raise RequestError(f"the Content-Length header {raw!r} is not a byte count (a non-negative integer)")
        return n

    def _event_stream(self) -> None:
        """A stream's headers: no length, so it ends with the connection (the close marks its end, which every
        HTTP/1.1 client reads; the next request opens a new connection)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def _event(self, obj: dict) -> None:
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def _stream_failed(self, e: Exception) -> None:
        """An error once the event stream is open: said in the stream (the caller then ends it with [DONE]); a
        server stopping cuts answers off, which is logged in one line, not as a failure."""
        if isinstance(e, DecoderClosed):
            log.info("%s: a streamed answer was cut off: the server is stopping", self.address_string())
            self._event(_error_body("the server is stopping: this answer was cut off", None, "server_error"))
            return
        log.exception("streamed request failed")
        self._event(_error_body(f"{type(e).__name__}: {e}", None, "server_error"))

    def _stream_completion(self, body: dict) -> None:
        opened = False

        def open_stream():
            nonlocal opened
            self._event_stream()
            opened = True

        try:
            self.service.stream_text_completion(body, open_stream, self._event)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, RequestError):  # (a write that timed out:
            raise  # the client stopped reading; nothing more is written to it)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream, then end it
            if not opened:
                raise
            self._stream_failed(e)
        self._release_place()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self._answer_sent()

    def _stream(self, body: dict) -> None:
        svc = self.service
        prepared = svc.prepare(body)  # a bad field is a 400 before the event stream starts
        include_usage = _include_usage(body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self._event_stream()

        def chunk(choices: list, **extra) -> dict:  # with include_usage every chunk has a usage field (null)
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": svc.model_name,
                    "choices": choices, **({"usage": None} if include_usage else {}), **extra}

        # with logprobs every choice carries them: a chunk's tokens' (see ChatService.answer), else null
        scored = prepared[-1] is not None

        def send(delta: dict, finish=None, extra: dict | None = None, index: int = 0, logprobs: dict | None = None):
            lp = {"logprobs": logprobs} if scored else {}
            self._event(chunk([{"index": index, "delta": delta, **lp, "finish_reason": finish}], **(extra or {})))

        n = prepared[0].num_return_sequences
        for i in range(n):
            send({"role": "assistant", "content": ""}, index=i)
        try:
            out = svc.answer(prepared, on_chunk=lambda i, text, logprobs=None: send({"content": text}, index=i,
                                                                                  logprobs=logprobs))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # gone, or stopped reading: nothing more to it
            raise
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream, then end it
            self._stream_failed(e)
        else:
            for c in out["choices"]:  # the usage with the last choice's finish, or in a chunk of its own
                last = c["index"] == n - 1 and not include_usage
                send({}, c["finish_reason"], {"usage": out["usage"]} if last else None, c["index"])
            if include_usage:  # OpenAI's stream_options.include_usage: no choices, the whole request's usage
                self._event(chunk([], usage=out["usage"]))
        self._release_place()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self._answer_sent()


def _parse_body(raw: bytes):
    """A request body as JSON, or a RequestError (400) saying what is wrong: not UTF-8 (the byte), not JSON, nested
    too deeply for the parser, or holding a lone UTF-16 surrogate (``"\\ud800"``: valid JSON, but no text the
    tokenizer can take)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") \
            from None
    try:
        body = json.loads(text or "null")
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300): was a 500 with a traceback
        raise RequestError(f"the request body holds a number too long to read: {str(e)[:120]}") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply to parse") from None
    # strict UTF-8 holds no surrogate: one can only come from a \uD800-\uDFFF escape, so the (whole-body) check
    # runs where the text has such an escape (a paired one passes it), not on every request's megabytes of base64
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"the request body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}), "
                               f"which is no text: send the character's pair, or the character itself") from None
        except RecursionError:
            raise RequestError("the request body is nested too deeply") from None
    return body


_GENERATION_ROUTES = frozenset(("/v1/chat/completions", "/v1/completions"))  # counted by max_concurrent_requests
_POST_ROUTES = _GENERATION_ROUTES | {"/tokenize", "/detokenize"}
_GET_ROUTES = frozenset(("", "/health", "/tokenizer_info", "/v1/models"))
"""The endpoints (without a trailing slash) by method: the other method is a 405 naming the right one."""
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
"""An HTTP header name (RFC 9110's token)."""
_CORS_MAX_AGE = 3600
"""Seconds a browser may keep a CORS preflight's answer."""
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^\s/?#@:\[\]]+)(:[0-9]{1,5})?")


def cors_origin(value: str) -> str:
    """An allowed CORS origin checked and lower-cased as browsers send it (``Origin: https://example.com:8080``):
    ``scheme://host[:port]`` without a path, or ``*`` (any origin). ValueError saying what is wrong otherwise."""
    v = value.strip().lower()
    if v == "*":
        return v
    if "://" not in v:
        raise ValueError(f"{value!r} is not an origin: give its scheme, e.g. 'https://{value.strip() or 'example.com'}'"
                         f" (or '*' for any origin)")
    m = _ORIGIN.fullmatch(v)
    if m is None:
        scheme, _, rest = v.partition("://")
        if "/" in rest:
            raise ValueError(f"{value!r} is not an origin: an origin has no path (browsers send "
                             f"'{scheme}://{rest.split('/')[0]}')")
        raise ValueError(f"{value!r} is not an origin: write it scheme://host[:port], e.g. https://example.com:8080 "
                         f"(or '*' for any origin)")
    if m.group(3) and int(m.group(3)[1:]) > 65535:
        raise ValueError(f"{value!r} is not an origin: its port {m.group(3)[1:]} is above 65535")
    return v


_SURROGATE_ESCAPE = re.compile(r"\\[uU][dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate (``\\ud800`` to ``\\udfff``)."""


def _web_ui_page() -> bytes:
    """The chat page (a client of /v1/chat/completions; no other files, nothing fetched from elsewhere)."""
    return (Path(__file__).resolve().parent.parent / "assets" / "webui.html").read_bytes()


def _drain(jobs: list[DecodeJob], merged: queue.Queue, on_text: Callable[[int, str], None],
           on_end: Callable[[int, object], None] | None = None) -> None:
    """Pass the (index, chunk) items of ``jobs``' shared chunk queue to ``on_text`` on this thread, and each job's
    result to ``on_end`` when it ends, until every job has ended; a job's error is raised; anything raised here
    (e.g. the client went away) cancels every job."""
    try:
        left = len(jobs)
        while left:
            i, text = merged.get()
            if text is not _END:
                on_text(i, text)
                continue
            left -= 1
            jobs[i].done.wait()
            if jobs[i].error is not None:
                raise jobs[i].error
            if on_end is not None:
                on_end(i, jobs[i].result)
    except BaseException:
        for job in jobs:
            job.cancelled = True
        raise


class _Server(ThreadingHTTPServer):
    """The threading HTTP server, with a client that went away logged in one line (socketserver prints a
    traceback for any exception a handler lets through; answering a client that has left raises one). It knows
    which connections are handling a request and which wait idle for their next one (keep-alive):
    :meth:`server_close` closes the idle ones at once, and :meth:`wait_for_requests` waits for the others; and
    which requests' answers are completely written (:meth:`unanswered_requests`: what a stop cuts off)."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's default of 5 reset connections when more clients came at once

    max_concurrent_requests: int | None = None  # generation requests answered at once (more: a 429); None: any

    def __init__(self, *args, **kwargs):
        self._admitted = 0  # generation requests being answered (bounded by max_concurrent_requests)
        self._busy: dict = {}  # connection -> whether it is handling a request (else idle, waiting for one)
        self._answered: set = set()  # connections whose request's answer is completely written (handler running)
        self._active_lock = threading.Condition()
        self.stopping = False  # set by server_close: connections end after their request
        super().__init__(*args, **kwargs)

    def process_request_thread(self, request, client_address) -> None:
        with self._active_lock:
            self._busy[request] = False
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._busy.pop(request, None)
                self._answered.discard(request)
                self._active_lock.notify_all()

    def admit(self) -> bool:
        """Count a generation request in, or False when ``max_concurrent_requests`` are being answered already
        (the request is refused with a 429 instead of queueing for minutes behind them)."""
        with self._active_lock:
            if self.max_concurrent_requests is not None and self._admitted >= self.max_concurrent_requests:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._active_lock:
            self._admitted -= 1

    def begin_request(self, connection) -> bool:
        """Mark ``connection`` as handling a request; False when the server is stopping (no new requests)."""
        with self._active_lock:
            if self.stopping:
                return False
            self._busy[connection] = True
            self._answered.discard(connection)
            return True

    def answered(self, connection) -> None:
        """Mark the request ``connection`` is handling as answered: its response completely written."""
        with self._active_lock:
            if self._busy.get(connection):
                self._answered.add(connection)

    def end_request(self, connection) -> None:
        with self._active_lock:
            if connection in self._busy:
                self._busy[connection] = False
            self._answered.discard(connection)
            self._active_lock.notify_all()

    def active_requests(self) -> int:
        """Requests being handled (idle keep-alive connections are not counted), answered or not."""
        with self._active_lock:
            return sum(self._busy.values())

    def unanswered_requests(self) -> int:
        """Requests being handled whose answer is not completely written yet: those a stop cuts off. A request
        whose last byte went out but whose handler has not returned yet is not one (it was counted as cut off
        when the stop came in that moment)."""
        with self._active_lock:
            return sum(busy and c not in self._answered for c, busy in self._busy.items())

    def open_connections(self) -> int:
        with self._active_lock:
            return len(self._busy)

    def wait_for_requests(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the requests being handled to end; how many are left."""
        with self._active_lock:
            self._active_lock.wait_for(lambda: not any(self._busy.values()), timeout)
            return sum(self._busy.values())

    def server_close(self) -> None:
        """Stop listening, and close the connections waiting idle for a next request (their threads would
        otherwise wait out the keep-alive timeout); a connection handling a request closes after its answer."""
        import socket

        super().server_close()
        with self._active_lock:
            self.stopping = True
            idle = [c for c, busy in self._busy.items() if not busy]
        for c in idle:
            try:
                c.shutdown(socket.SHUT_RDWR)  # its thread's wait for a request ends (EOF), and it closes
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            log.info("%s disconnected before the response was sent (%s)", client_address[0], type(err).__name__)
            return
        super().handle_error(request, client_address)


class _Tagged:
    """A job's chunk queue that puts (index, chunk) into a queue shared by several jobs."""

    def __init__(self, merged: queue.Queue, index: int):
        self.merged, self.index = merged, index

    def put(self, item) -> None:
        self.merged.put((self.index, item))


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, web_ui: bool = True, cors_origins: Sequence[str] = (),
                keep_alive_timeout: float = 15.0, io_timeout: float = 60.0,
                max_concurrent_requests: int | None = 128) -> ThreadingHTTPServer:
    """A threading HTTP server answering with ``service`` (``port`` 0: any free port; ``server.server_port``).
    ``api_key``: require ``Authorization: Bearer <api_key>`` on every endpoint but ``/health`` and the chat page.
    ``web_ui``: answer ``GET /`` with a chat page in the browser (streamed answers, an image per conversation).
    ``cors_origins``: origins (``https://example.com:8080``, ``*``: any) whose pages may call the API: CORS
    preflights answered (without the API key) and CORS headers on their responses (none: no CORS).
    ``keep_alive_timeout``: seconds an HTTP/1.1 connection may wait idle for its next request. ``io_timeout``:
    seconds one read of a request body or one write of an answer may wait on the client (a stalled upload is a
    408, a client that stops reading has its connection closed). ``max_concurrent_requests``: generation requests
    (chat and text completions) answered at once, queued ones included; one more is refused with a 429 and
    ``Retry-After`` (None: no limit)."""
    if isinstance(cors_origins, str):
        cors_origins = [cors_origins]
    try:
        origins = frozenset(cors_origin(o) for o in cors_origins)
    except ValueError as e:
        raise ValueError(f"make_server: cors_origins: {e}") from None
    for name, v in (("keep_alive_timeout", keep_alive_timeout), ("io_timeout", io_timeout)):
        if not v > 0:
            raise ValueError(f"make_server: {name} must be > 0 seconds, got {v}")
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise ValueError(f"make_server: max_concurrent_requests must be >= 1 (or None: no limit), got "
                         f"{max_concurrent_requests}")
    handler = type("Handler", (_Handler,), {"service": service, "api_key": api_key, "web_ui": web_ui,
                                            "cors_origins": origins, "keep_alive_timeout": keep_alive_timeout,
                                            "io_timeout": io_timeout})
    server = _Server((host, port), handler)
    server.max_concurrent_requests = max_concurrent_requests
    return server
