"""Continuous batching of decode steps: requests join and leave one running batch (``emma-mamba serve``).

A Mamba sequence's whole context is its recurrent state, a fixed-size row of a
:class:`~emma_mamba.models.mamba.MambaCache`, so batching requests that arrive at different times needs no paged
KV memory: a new request is prefilled into a one-row cache of its own, which is concatenated to the running
batch's cache; a finished one's row is taken out (and may be kept by the caller, e.g. the server's state cache).
Between joins and departures every active request advances by one token per decode step, in one forward over
the batch. Each request keeps its own sampling settings, seed, repetition-penalty mask, stop strings and
stream; the tokens it gets are those :func:`~emma_mamba.inference.generate.generate` gives it alone, up to the
rounding of a batched GEMM against a one-row one.

One thread (:class:`BatchDecoder`) owns the model. Callers submit a :class:`DecodeJob` and wait on it; a
streamed job's text goes through a queue that the caller's thread drains, so a slow or vanished client never
stalls the batch (a caller that cannot deliver a chunk cancels its job, whose row leaves at the next step). A
streamed job that records log-probabilities can have them streamed too (``stream_logprobs``): its text is then
cut at token boundaries, each piece put with the scores of exactly the tokens whose text it completes (a token
whose text the detokenizer holds back, an incomplete UTF-8 character or the start of a possible stop string,
waits with its score for that text), so the pieces' scores, in order, are the answer's scores. With
``cuda_graphs`` each batch size's step is captured once (:mod:`emma_mamba.inference.cuda_graphs`) and the batch's
states live in that size's static buffers between joins and departures.

Chunked prefill. New requests are prefilled between decode steps. While the batch is decoding, at most
``prefill_chunk`` prompt positions are prefilled between two steps: a long prompt (an image's hundreds of visual
tokens, a long document) is prefilled in chunks, its state carried from one chunk to the next (a Mamba prefill
continues from a state exactly as a chat turn continues a conversation), so the answers already streaming get a
token after every chunk instead of waiting for the whole prompt. Waiting prompts are served first come, first
served; one whose rest fits the step's budget and starts from an empty state is prefilled in one padded prefill
with the others that do and are of its kind, token ids or embeddings (as
:func:`~emma_mamba.inference.generate.generate` prefills a batch). With nothing
decoding, every admitted prompt is prefilled whole at once (no one waits on it). ``prefill_chunk`` None: no limit
(each prompt whole between two steps). However scheduled, a prefill runs at most
:func:`~emma_mamba.inference.generate.resolve_prefill_chunk`'s ``"auto"`` positions per forward (1024 on the CPU,
where that is faster and bounds the activations; no limit on a GPU), and an echoed prompt whose every position is
scored at most ``ECHO_CHUNK`` (its logits are positions x vocabulary), the state carried between the forwards.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from emma_mamba.inference.generate import (GenerationConfig, _continue, _pick, _prefill, _Sequence, _split_prompts,
                                           decode_step, mask_unpickable, output_vocab, resolve_prefill_chunk)

__all__ = ["BatchDecoder", "DecodeJob", "token_logprobs", "vlm_embed_batch", "ECHO_CHUNK"]

ECHO_CHUNK = 1024
"""Positions per forward when every position's logits are kept (an echoed prompt scored token by token)."""

log = logging.getLogger(__name__)


class DecoderClosed(RuntimeError):
    """The error of the requests a closed decoder held (the server stopping): not a fault of theirs."""

_END = object()  # end of a job's chunk stream


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top: int, vocab_size: int,
                   suppressed: list[int] | None = None) -> list:
    """Per position: (log-probability of ``targets[i]`` under ``logits[i]``, [(token id, log-probability)] of the
    ``top`` most likely tokens) from the model's distribution over its ``vocab_size`` real tokens (less the
    ``suppressed`` ids: what the sampler may pick, :func:`~emma_mamba.inference.generate.output_vocab`)."""
    logits = logits[:, :vocab_size].float()
    if suppressed:
        logits = logits.clone()
        mask_unpickable(logits, vocab_size, suppressed)
    lp = torch.log_softmax(logits, dim=-1)
    picked = lp.gather(1, targets.long().reshape(-1, 1).to(lp.device))[:, 0].tolist()
    if top > 0:
        vals, ids = lp.topk(top, dim=-1)
        alts = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        alts = [[] for _ in picked]
    return list(zip(picked, alts))


def vlm_embed_batch(vlm) -> Callable[[list[tuple]], list]:
    """A :class:`BatchDecoder` ``embed_batch`` for an EmmaMamba ``vlm``: the ``embed`` requests (token ids, images,
    instructions or None) of one admission round -> their (L_i, d_model) embeddings, every image through the
    vision side together (:meth:`EmmaMamba.batch_embeds`)."""

    def embed(requests: list[tuple]) -> list:
        inst = [r[2] for r in requests]
        return vlm.batch_embeds([r[0] for r in requests], [r[1] for r in requests],
                                inst if any(i is not None for i in inst) else None)

    return embed


class DecodeJob:
    """One request for a :class:`BatchDecoder`.

    ``start()`` runs on the decoder's thread when the job is admitted and returns a dict: the prompt as
    ``input_ids`` (a list or 1-D tensor) or ``inputs_embeds`` (seqlen, d_model); ``cache``, a one-row MambaCache
    to continue (None or absent: an empty state); ``seen``, the token ids the repetition penalty counts as
    already seen (or None); ``logprobs`` (int), to record each picked token's log-probability and that many
    alternatives; ``echo_logprobs``, to also score the prompt's own tokens (``input_ids`` from an empty state).
    Instead of ``inputs_embeds`` it may return ``embed``, a request the decoder's ``embed_batch`` turns into them
    (a multimodal prompt: its token ids, images and instructions), so that the images of every job admitted in
    the same round go through the vision encoder together. The decoder prefills it (the jobs admitted together
    that start from an empty state in one padded prefill).

    ``finish(seq, state, stats)`` runs there when the answer ends: ``seq`` is its
    :class:`~emma_mamba.inference.generate._Sequence` (tokens, reason, final token, ``seq.text()``), ``state``
    the one-row cache after every token but the final one, ``stats`` a dict (``decode_steps``,
    ``max_batch_rows``: the most requests decoded together while it ran, ``prefill_seconds``, ``prefill_chunks``
    (the forwards its prompt took: 1 unless chunked), ``logprobs`` and
    ``prompt_logprobs``: lists of :func:`token_logprobs` entries, or None); its return value is the job's
    result.

    ``stream``: the text is put in ``chunks`` as it is produced (strings; ``_END`` last). With ``stream_logprobs``
    too, and ``logprobs`` in the spec, each chunk is instead a pair ``(text, [(token id, entry)])``: the text cut
    at a token boundary and the :func:`token_logprobs` entries of the tokens whose text it completes (see
    :class:`_ScoredText`; the tokens the text never shows, those cut with a stop string and a picked end of
    sequence, come with the last piece, whose text may be empty); with ``echo_logprobs`` a first pair ``(None,
    prompt entries)`` carries the prompt's scores once it is prefilled (:func:`token_logprobs` entries of its
    tokens but the first). The pairs' entries, in order, are ``stats["logprobs"]`` paired with the scored tokens.
    """

    def __init__(self, cfg: GenerationConfig, start: Callable, finish: Callable, tokenizer=None,
                 stream: bool = False, forks: list["DecodeJob"] | None = None, stream_logprobs: bool = False):
        if stream and tokenizer is None:
            raise ValueError("DecodeJob: streaming needs a tokenizer")
        self.cfg, self.start, self.finish, self.tokenizer = cfg, start, finish, tokenizer
        self.stream_logprobs = stream_logprobs
        # jobs that continue this job's prompt from a copy of its prefilled state (n choices of one request: one
        # prefill); each has its own settings (e.g. seed), finish, stream and result; their start() is not called
        self.forks: list[DecodeJob] = list(forks or [])
        self.chunks: queue.Queue | None = queue.Queue() if stream else None
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.cancelled = False

    def emit(self, chunk) -> None:
        self.chunks.put(chunk)

    def _settle(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.chunks is not None:
            self.chunks.put(_END)

    def _fail(self, error: BaseException) -> None:
        """Settle this job and its forks, which never started, with ``error``."""
        for job in [self] + self.forks:
            job._settle(error=error)

    def wait(self, streamer: Callable[[str], None] | None = None, timeout: float | None = None):
        """The job's result (its error re-raised), passing each text chunk to ``streamer`` on this thread; a
        streamer that raises cancels the job and the error propagates."""
        if self.chunks is not None and streamer is not None:
            while True:
                chunk = self.chunks.get(timeout=timeout)
                if chunk is _END:
                    break
                try:
                    streamer(chunk)
                except BaseException:
                    self.cancelled = True
                    raise
        if not self.done.wait(timeout):
            raise TimeoutError("the decode job did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Pending:
    """An admitted job whose prompt is (partly) not yet prefilled."""
    job: DecodeJob
    spec: dict
    ids: torch.Tensor | None  # the prompt as token ids, or
    emb: torch.Tensor | None  # as embeddings (seqlen, d_model)
    cache: object | None  # its one-row state: carried, or allocated at its first chunk (None: untouched and empty)
    carried: bool
    done: int = 0  # prompt positions prefilled so far
    chunks: int = 0
    seconds: float = 0.0
    prompt_logprobs: list | None = None

    @property
    def length(self) -> int:
        return (self.ids if self.ids is not None else self.emb).shape[0]

    @property
    def echo(self) -> bool:
        return bool(self.spec.get("echo_logprobs"))


@dataclass
class _Row:
    job: DecodeJob
    seq: _Sequence
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (V,) bool
    offset: int  # positions in the row's state
    steps: int = 0
    prefill_chunks: int = 1
    max_rows: int = 1
    prefill_seconds: float = 0.0
    logprobs: int | None = None  # record each picked token's logprob (and this many alternatives)
    prompt_logprobs: list | None = None
    picked_logprobs: list | None = None
    scored: "_ScoredText | None" = None  # a job streaming its log-probabilities: its text re-cut at token bounds
    allowed: tuple = (0, [])  # what the row may pick: output_vocab of its job's tokenizer, set by _row


class _ScoredText:
    """A streamed answer's text re-cut at token boundaries, each piece put (``emit((text, [(token id, entry)])``)
    with the log-probability entries of exactly the tokens whose text it completes, so that a client reading a
    chunk's tokens reads that chunk's text.

    The detokenizer (:class:`~emma_mamba.inference.generate._TextTracker`) releases text as it can: a token ending
    inside a multi-byte UTF-8 character is held back until the character is whole (its text comes with a later
    token's), and text that may be the start of a stop string is held back until it is not (which can cut a
    token's text in two). Here a token's text is complete once the tracker has decoded it (``read_offset`` passed
    it), and a piece goes out up to the last complete token's end within the released text; the rest waits for
    the next piece. What is left when the answer ends (the tail :meth:`_Sequence.text` releases, the tokens cut
    with a stop string, a picked end of sequence: scored, but shown by no text) goes out in :meth:`flush`."""

    def __init__(self, emit: Callable):
        self.emit = emit
        self.held = ""  # text released by the detokenizer and not yet put (its token is not complete yet)
        self.put_chars = 0  # characters of the answer put so far
        self.ends: list[int] = []  # per token whose text is complete: where its text ends in the answer
        self.put_tokens = 0  # tokens whose entries were put

    def text(self, chunk: str) -> None:
        """The sequence's streamer: the text the detokenizer released."""
        self.held += chunk

    @staticmethod
    def _entries(seq, scores: list, a: int, b: int) -> list:
        """(token, entry) of scored tokens a..b: the answer's tokens, then a picked end of sequence, as the scores
        are recorded (sliced, not the whole answer copied at every step)."""
        ids = seq.tokens[a:b]
        if seq.reason == "eos" and a <= len(seq.tokens) < b:
            ids.append(seq.final)
        return list(zip(ids, scores[a:b]))

    def step(self, seq, scores: list | None) -> None:
        """After a token was pushed to ``seq`` (and scored in ``scores``): put what is now complete."""
        tr = seq.tracker
        self.ends += [len(tr.text)] * (tr.read_offset - len(self.ends))  # tokens decoded by this push end here
        released = self.put_chars + len(self.held)
        k = self.put_tokens
        while k < len(self.ends) and self.ends[k] <= released:
            k += 1
        if k > self.put_tokens:
            n = self.ends[k - 1] - self.put_chars
            self.emit((self.held[:n], self._entries(seq, scores or [], self.put_tokens, k)))
            self.held, self.put_chars, self.put_tokens = self.held[n:], self.ends[k - 1], k

    def flush(self, seq, scores: list | None) -> None:
        """When the answer has ended (after :meth:`_Sequence.text`): the text and entries not yet put."""
        scores = scores or []
        if self.held or self.put_tokens < len(scores):
            self.emit((self.held, self._entries(seq, scores, self.put_tokens, len(scores))))
            self.put_chars += len(self.held)
            self.held, self.put_tokens = "", len(scores)


class BatchDecoder:
    """Runs :class:`DecodeJob` s on ``lm`` in one thread, up to ``max_batch`` decoded together (module doc).
    ``compile`` / ``cuda_graphs``: how each decode step runs, as in :class:`GenerationConfig`. ``prefill_chunk``:
    the most prompt positions prefilled between two decode steps while the batch decodes (chunked prefill, module
    doc; None or 0: no limit). ``embed_batch(requests) -> [inputs_embeds]``: embeds the ``embed`` requests of the
    jobs admitted in one round together (e.g. :meth:`EmmaMamba.batch_embeds`, which encodes their images in one
    vision-encoder batch). ``min_join``: while the batch decodes, queued jobs join only once at least this many
    rows are free, so that their prefills and images are batched (throughput, e.g. ``eval``; an idle decoder
    admits what is queued; default 1: a job joins at the next step, the lowest latency)."""

    def __init__(self, lm, max_batch: int = 8, compile: bool | str = False, cuda_graphs: bool = False,
                 prefill_chunk: int | None = 512, embed_batch: Callable | None = None, min_join: int = 1):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"BatchDecoder: max_batch must be a positive integer, got {max_batch!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 0):
            raise ValueError(f"BatchDecoder: prefill_chunk must be a non-negative integer or None, got "
                             f"{prefill_chunk!r}")
        if isinstance(min_join, bool) or not isinstance(min_join, int) or not 1 <= min_join <= max_batch:
            raise ValueError(f"BatchDecoder: min_join must be an integer in [1, max_batch={max_batch}], got "
                             f"{min_join!r}")
        self.lm, self.max_batch, self.compile, self.cuda_graphs = lm, max_batch, compile, cuda_graphs
        self.min_join = min_join
        self.prefill_chunk = prefill_chunk or None
        self.embed_batch = embed_batch
        self.embed_batches = 0  # calls of embed_batch (read by tests: one per admission round with images)
        self.pending: list[_Pending] = []  # admitted, prompt not yet wholly prefilled (read by health checks)
        self._held: DecodeJob | None = None  # taken from the queue, waiting for room for it and its forks
        self.graphs = None
        if cuda_graphs:
            from emma_mamba.inference.cuda_graphs import decoder_for

            self.graphs = decoder_for(lm, compile=compile)  # errors now, not at the first request, off a GPU
        self.queue: queue.Queue = queue.Queue()
        self.active = 0  # rows in the running batch (read by tests and health checks)
        self.decode_steps = 0
        self._open = threading.Event()
        self._open.set()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._rows_now: list = []  # the decoding rows as of the loop's last update (failed should the thread die)

    # ------------------------------------------------------------------------------------------ callers

    def submit(self, job: DecodeJob) -> DecodeJob:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._run, name="emma-mamba-decoder", daemon=True)
                self._thread.start()
        self.queue.put(job)
        return job

    def run(self, job: DecodeJob, streamer: Callable[[str], None] | None = None):
        """Submit ``job`` and wait for its result."""
        return self.submit(job).wait(streamer)

    @contextlib.contextmanager
    def hold(self):
        """Pause the decoder while inside: jobs submitted meanwhile queue up and are admitted together when it
        ends (tests; a warm-up that wants its requests in one batch)."""
        self._open.clear()
        try:
            yield self
        finally:
            self._open.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: the requests being decoded and those still queued fail ("the decoder was closed")."""
        if self._thread is not None:
            self._closing = True  # seen between steps, also when a full batch reads no queue
            self.queue.put(None)  # wakes an idle thread
            self._thread.join(timeout)
            self._thread = None

    # --------------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug: no request may wait forever on a thread that is gone
            log.exception("the decoder thread failed; the requests it held fail with the error")
            self._fail_all(RuntimeError(f"the decoder failed: {type(e).__name__}: {e}"))

    def _fail_all(self, error: BaseException) -> None:
        """Fail every request this decoder holds: decoding (``_rows_now``), being prefilled, held back and queued."""
        for r in self._rows_now:
            r.job._settle(error=error)
        self._rows_now = []
        for p in self.pending:
            p.job._fail(error)
        self.pending = []
        if self._held is not None:
            self._held._fail(error)
            self._held = None
        while not self.queue.empty():  # nobody would ever admit them
            job = self.queue.get_nowait()
            if job is not None:
                job._fail(error)
        self.active = 0

    def _loop(self) -> None:
        rows: list[_Row] = []
        self._rows_now = rows
        with torch.inference_mode():
            cache = logits = static = None
            while True:
                self._open.wait()
                stop, rows, cache, logits, joined = self._admit(rows, cache, logits)
                self._rows_now = rows
                if joined:
                    static = None
                if stop or self._closing:
                    self._fail_all(DecoderClosed("the decoder was closed (the server is stopping)"))
                    return
                if not rows:
                    continue
                try:
                    rows, cache, logits, static = self._advance(rows, cache, logits, static)
                except Exception as e:  # noqa: BLE001 - a failed step (e.g. out of memory) fails its batch only
                    log.exception("decode step failed")
                    for r in rows:
                        r.job._settle(error=e)
                    rows, cache, logits, static = [], None, None, None
                self._rows_now = rows
                self.active = len(rows)

    def _admit(self, rows, cache, logits):
        """Take queued jobs while there is room (blocking when idle), prefill what the step's budget allows of
        the waiting prompts (module doc: chunked prefill) and append those now wholly prefilled to the batch."""
        stop = False

        started: list[tuple[DecodeJob, dict]] = []  # admitted this round; embedded together below

        def taken():  # rows decoding or being prefilled (a job with forks takes a row for each)
            return len(rows) + sum(1 + len(p.job.forks) for p in self.pending) \
                + sum(1 + len(j.forks) for j, _ in started)

        joining = not rows or self.max_batch - taken() >= self.min_join
        while joining and taken() < self.max_batch:
            if self._held is not None:
                job, self._held = self._held, None
            else:
                try:
                    idle = not rows and not self.pending and not started
                    job = self.queue.get(block=idle, timeout=None if idle else 0)
                except queue.Empty:
                    break
                self._open.wait()  # held while this thread waited for the job: admit it (and others) once released
            if job is None:
                stop = True
                break
            if job.cancelled:
                job._fail(RuntimeError("cancelled"))
                continue
            if (rows or self.pending or started) and taken() + 1 + len(job.forks) > self.max_batch:
                self._held = job  # its rows do not fit yet: first in line when rows free up
                break
            try:
                started.append((job, job.start()))
            except Exception as e:  # noqa: BLE001 - a request that cannot start fails alone
                job._fail(e)
                continue
        for job, spec in self._embed_round(started):
            try:
                prompt = _split_prompts(self.lm, spec.get("input_ids"), spec.get("inputs_embeds"), None)
                if len(prompt) != 1:
                    raise ValueError(f"DecodeJob.start: one prompt, got {len(prompt)}")
            except Exception as e:  # noqa: BLE001 - a request that cannot start fails alone
                job._fail(e)
                continue
            if spec.get("echo_logprobs") and (spec.get("cache") is not None or prompt[0][0] is None):
                job._fail(ValueError("DecodeJob.start: echo_logprobs needs input_ids and no carried cache"))
                continue
            carried = spec.get("cache")
            self.pending.append(_Pending(job, spec, prompt[0][0], prompt[0][1], carried, carried is not None))
        if stop:
            return stop, rows, cache, logits, False
        ready = self._prefill_pending(budget=self.prefill_chunk if rows else None)
        new_caches, new_logits = [], []
        for p, first in ready:
            if not p.carried:  # (a carried state's offset was advanced by its prefill)
                p.cache.seqlen_offset = p.length
            # the job's own row, then its forks' rows on copies of the prefilled state
            for job, row_cache in [(p.job, p.cache)] + [(f, p.cache.select([0])) for f in p.job.forks]:
                try:
                    row = self._row(job, first, row_cache, p.spec, p.seconds, p.prompt_logprobs)
                except Exception as e:  # noqa: BLE001 - a request whose row cannot be made fails alone
                    log.exception("a request could not start decoding")
                    job._fail(e)
                    continue
                if row is not None:
                    row.prefill_chunks = p.chunks
                    rows.append(row)
                    new_caches.append(row_cache)
                    new_logits.append(first)
        if new_caches:
            cache = type(new_caches[0]).cat(([cache] if cache is not None else []) + new_caches)
            logits = torch.cat(([logits] if logits is not None else []) + new_logits)
        return stop, rows, cache, logits, bool(new_caches)

    def _embed_round(self, started: list[tuple[DecodeJob, dict]]) -> list[tuple[DecodeJob, dict]]:
        """The round's specs with every ``embed`` request turned into ``inputs_embeds``: one ``embed_batch`` call
        for all of them; if it fails, one call per job, so that only a job whose request cannot be embedded fails
        (with its own error). Jobs that failed are left out."""
        todo = [i for i, (_, spec) in enumerate(started) if "embed" in spec]
        if not todo:
            return started
        if self.embed_batch is None:
            for i in todo:
                started[i][0]._fail(ValueError("DecodeJob.start returned 'embed' but the decoder has no embed_batch"))
            return [x for i, x in enumerate(started) if i not in set(todo)]
        failed = set()
        try:
            self.embed_batches += 1
            embeds = self.embed_batch([started[i][1]["embed"] for i in todo])
        except Exception:  # noqa: BLE001 - find the request(s) at fault: each alone
            embeds = []
            for i in todo:
                try:
                    self.embed_batches += 1
                    embeds.append(self.embed_batch([started[i][1]["embed"]])[0])
                except Exception as e:  # noqa: BLE001 - a request that cannot start fails alone
                    started[i][0]._fail(e)
                    failed.add(i)
                    embeds.append(None)
        out = []
        for i, (job, spec) in enumerate(started):
            if i in failed:
                continue
            if i in todo:
                spec = {**{k: v for k, v in spec.items() if k != "embed"}, "inputs_embeds": embeds[todo.index(i)]}
            out.append((job, spec))
        return out

    def _prefill_pending(self, budget: int | None) -> list:
        """Prefill up to ``budget`` positions (None: all) of the waiting prompts, first come first served;
        returns [(pending, next-token logits (1, V) fp32)] of those now wholly prefilled, in arrival order. A
        failed prefill fails its own requests."""
        whole, parts, left = [], [], budget
        for p in self.pending:
            if left is not None and left <= 0:
                break
            rest = p.length - p.done
            n = rest if left is None else min(rest, left)
            if n == rest and p.cache is None and not p.echo:
                whole.append(p)  # from an empty state in one go: prefilled with the others that are
            else:
                parts.append((p, n))
            if left is not None:
                left -= n
        firsts, failed = {}, set()
        # one padded prefill per prompt kind: _prefill stacks a group's prompts into one tensor, token ids or
        # embeddings (a chat request's embedded image prompt and a text completion's ids may arrive together)
        for group in ([p for p in whole if p.ids is not None], [p for p in whole if p.ids is None]):
            if not group:
                continue
            t0 = time.perf_counter()
            try:  # one padded prefill over the group (seq_idx resets), as generate() prefills a batch
                group_cache = self.lm.allocate_cache(len(group))
                first = _prefill(self.lm, [(p.ids, p.emb) for p in group], group_cache,
                                 chunk=resolve_prefill_chunk("auto", self.lm.device))
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                for p in group:
                    p.job._fail(e)
                    failed.add(id(p))
            else:
                seconds = time.perf_counter() - t0
                for k, p in enumerate(group):
                    p.cache, p.done, p.chunks, p.seconds = group_cache.select([k]), p.length, 1, seconds
                    firsts[id(p)] = first[k:k + 1]
        for p, n in parts:
            t0 = time.perf_counter()
            try:
                last = self._prefill_chunk(p, n)
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                p.job._fail(e)
                failed.add(id(p))
                continue
            p.seconds += time.perf_counter() - t0
            if p.done == p.length:
                firsts[id(p)] = last
        ready = [(p, firsts[id(p)]) for p in self.pending if id(p) in firsts]
        self.pending = [p for p in self.pending if id(p) not in firsts and id(p) not in failed]
        return ready

    def _prefill_chunk(self, p: _Pending, n: int) -> torch.Tensor:
        """Prefill the next ``n`` positions of ``p``'s prompt on its state; the last position's logits (1, V)."""
        if p.cache is None:
            p.cache = self.lm.allocate_cache(1)
        s, e = p.done, p.done + n
        if p.echo:  # every position's logits: each scores the prompt's next token
            for a in range(s, e, ECHO_CHUNK):  # the logits of at most ECHO_CHUNK positions at a time
                b = min(a + ECHO_CHUNK, e)
                out = self.lm(input_ids=p.ids[None, a:b], cache=p.cache).logits[0].float()
                k = min(b - a, p.length - 1 - a)  # positions whose next token is in the prompt
                p.prompt_logprobs = (p.prompt_logprobs or []) + token_logprobs(
                    out[:k], p.ids[a + 1:a + 1 + k], int(p.spec.get("logprobs") or 0),
                    *output_vocab(self.lm, p.job.tokenizer))  # the distribution the picks are drawn from
            last = out[-1:]
        else:
            last = _continue(self.lm, (None if p.ids is None else p.ids[s:e], None if p.emb is None else p.emb[s:e]),
                             p.cache, resolve_prefill_chunk("auto", self.lm.device))
        p.done, p.chunks = e, p.chunks + 1
        return last

    def _row(self, job: DecodeJob, first: torch.Tensor, row_cache, spec: dict, prefill_seconds: float,
             prompt_logprobs: list | None = None):
        """The batch row of a prefilled job (None when it asks for no new token: finished at once)."""
        cfg, seen_ids = job.cfg, spec.get("seen")
        scored = None
        if job.chunks is not None and job.stream_logprobs and spec.get("logprobs") is not None:
            scored = _ScoredText(job.emit)
            if spec.get("echo_logprobs"):  # the prompt's scores, before any of the answer's text
                job.emit((None, list(prompt_logprobs or [])))
        seq = _Sequence(cfg, job.tokenizer, scored.text if scored is not None
                        else job.emit if job.chunks is not None else None)
        row = _Row(job, seq, None, None, row_cache.seqlen_offset, prefill_seconds=prefill_seconds,
                   logprobs=spec.get("logprobs"), prompt_logprobs=prompt_logprobs, scored=scored,
                   allowed=output_vocab(self.lm, job.tokenizer))  # once per job, not per decode step
        if cfg.max_new_tokens == 0:
            self._finish(row, row_cache)
            return None
        if cfg.seed is not None and cfg.temperature > 0:
            row.generator = torch.Generator(device=self.lm.device).manual_seed(cfg.seed)
        if cfg.repetition_penalty != 1.0:
            row.seen = torch.zeros(first.shape[-1], dtype=torch.bool, device=first.device)
            if seen_ids is not None:
                row.seen[torch.as_tensor(seen_ids, dtype=torch.long, device=first.device)] = True
        return row

    def _finish(self, row: _Row, state) -> None:
        state.seqlen_offset = row.offset
        try:
            result = row.job.finish(row.seq, state, {"decode_steps": row.steps, "max_batch_rows": row.max_rows,
                                                     "prefill_seconds": row.prefill_seconds,
                                                     "prefill_chunks": row.prefill_chunks,
                                                     "prompt_logprobs": row.prompt_logprobs,
                                                     "logprobs": row.picked_logprobs})
            if row.scored is not None:  # after finish: its seq.text() may have released the text's tail
                row.scored.flush(row.seq, row.picked_logprobs)
        except Exception as e:  # noqa: BLE001
            row.job._settle(error=e)
        else:
            row.job._settle(result)

    def _advance(self, rows: list[_Row], cache, logits, static):
        """Pick every row's next token; finished rows leave (their states handed to their jobs); one decode step
        for the rest. Returns the new (rows, cache, logits, static)."""
        keep, tokens = [], []
        # what each row may pick (its job's tokenizer decides: output_vocab); the rows' logits masked once, so
        # the picks, greedy or sampled, and the logprobs are the model's distribution over those tokens
        vocab = self.lm.config.vocab_size
        if any(r.allowed != (vocab, []) for r in rows):
            logits = logits.clone()
            for j, r in enumerate(rows):
                mask_unpickable(logits[j:j + 1], *r.allowed)
        # the greedy rows' picks in one argmax (one device sync), the others row by row with their own settings
        greedy = [j for j, r in enumerate(rows) if r.job.cfg.temperature == 0 and r.seen is None]
        picks = {}
        if greedy:
            at = torch.tensor(greedy, device=logits.device)
            picks = dict(zip(greedy, logits.index_select(0, at)[:, :vocab].argmax(-1).tolist()))
        for j, r in enumerate(rows):
            if r.job.cancelled:
                r.job._settle(error=RuntimeError("cancelled"))
                continue
            try:
                t = picks[j] if j in picks else int(_pick(logits[j:j + 1], r.seen[None] if r.seen is not None
                                                          else None, r.job.cfg, vocab, r.generator))
            except Exception as e:  # noqa: BLE001 - this row's sampling failed (e.g. non-finite probabilities)
                r.job._settle(error=e)
                continue
            if r.logprobs is not None:  # the model's own distribution (before penalties and temperature)
                r.picked_logprobs = r.picked_logprobs or []
                r.picked_logprobs += token_logprobs(logits[j:j + 1], torch.tensor([t], device=logits.device),
                                                    r.logprobs, vocab)
            try:
                go_on = r.seq.push(t, r.seen)
                if r.scored is not None:
                    r.scored.step(r.seq, r.picked_logprobs)
            except Exception as e:  # noqa: BLE001 - a job's own callbacks failed
                r.job._settle(error=e)
                continue
            if go_on:
                keep.append(j)
                tokens.append(t)
            else:
                self._finish(r, cache.select([j]))
        if len(keep) < len(rows):
            rows = [rows[j] for j in keep]
            if not rows:
                return [], None, None, None
            cache, static = cache.select(keep), None
        fed = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        if self.graphs is not None:
            if static is None:
                static = self.graphs.load(cache)
                cache = static.cache
            logits = self.graphs.step(static, fed).float()
        else:
            logits = decode_step(self.lm, fed[:, None], cache, self.compile).float()
        self.decode_steps += 1
        for r in rows:
            r.offset += 1
            r.steps += 1
            r.max_rows = max(r.max_rows, len(rows))
        return rows, cache, logits, static
