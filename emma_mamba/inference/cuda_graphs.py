"""Decode steps replayed from CUDA graphs (``GenerationConfig(cuda_graphs=True)``, ``--cuda-graphs``).

A decode step of a Mamba LM is a few hundred small kernels (per layer: the projections, the conv and scan
update steps, the norm); launched one by one from Python, the launches and the dispatch take longer than the
GPU work at batch sizes of a chat or an evaluation. As the fastest Mamba implementations do, the step is
captured once into a ``torch.cuda.CUDAGraph`` and then replayed: one launch per token.

A graph replays fixed kernels on fixed addresses, so everything a step touches is static, per batch size: a
:class:`~emma_mamba.models.mamba.MambaCache`, a token buffer ``(b, 1)`` and the logits the captured step wrote.
:func:`emma_mamba.inference.generate.generate` prefills as usual, copies the states into the static cache, feeds
each step's tokens through the buffer (rows that finished keep stepping, their tokens ignored, so one graph
serves the whole batch), and copies the states back when the caller owns the cache (a chat). The step is
captured through ``inputs_embeds``: the ``input_ids`` path checks the id range on the host, a synchronisation
that capture forbids. Warm-up steps run on a side stream first (lazy initialisation, the mixers' cached fp32
SSM parameters), as ``torch.cuda.graphs`` requires.

A model's captured steps live in a :class:`GraphDecoder` attached to it (:func:`decoder_for`), reused across
calls and batch sizes, and captured again when a parameter moved or changed in place (their addresses and
version counters are compared at each use: a graph would otherwise keep reading the old ones).
``release(lm)`` frees them.

How steps are captured and replayed is a small strategy object: :class:`CudaGraphs` on a GPU;
:class:`EagerReplay` re-runs the step on the same static buffers instead, which lets the CPU tests check
everything around the graph (buffers, copies, batch handling) against plain decoding.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = ["GraphDecoder", "CudaGraphs", "EagerReplay", "decoder_for", "attach", "release"]


class CudaGraphs:
    """Capture with ``torch.cuda.graph`` (after warm-up on a side stream), replay with ``graph.replay()``. The
    graphs of one decoder share one memory pool."""

    def __init__(self):
        self.pool = None

    def capture(self, fn, warmup: int = 3):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        return graph, out

    @staticmethod
    def replay(handle) -> None:
        handle.replay()


class EagerReplay:
    """A stand-in for :class:`CudaGraphs` on any device: capture runs the step once, replay runs it again on
    the same static buffers and copies the result into the captured output (what a replay leaves there)."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def capture(self, fn):
        self.captures += 1
        out = fn()
        return (fn, out), out

    def replay(self, handle) -> None:
        self.replays += 1
        fn, out = handle
        out.copy_(fn())


@dataclass
class StaticStep:
    """The static buffers of one batch size and the captured step that reads and writes them."""

    cache: object  # MambaCache
    tokens: torch.Tensor  # (b, 1) long
    logits: torch.Tensor  # (b, padded_vocab), written by each replay
    handle: object


class GraphDecoder:
    """The captured decode steps of one model (``compile``: each step through torch.compile before capture, see
    :func:`emma_mamba.inference.generate.decode_step`)."""

    def __init__(self, lm, api=None, compile: bool | str = False):
        self.lm = lm
        self.compile = compile
        if api is None:
            if lm.device.type != "cuda":
                raise ValueError(f"cuda_graphs: CUDA graphs need a model on a CUDA device, this one is on "
                                 f"{lm.device}")
            api = CudaGraphs()
        self.api = api
        self.steps: dict[int, StaticStep] = {}
        self._fingerprint = None

    def _current_fingerprint(self):
        from emma_mamba.models.mamba import param_version

        return tuple((p.data_ptr(), param_version(p), p.dtype) for p in self.lm.parameters())

    def static(self, batch: int) -> StaticStep:
        """The static buffers of ``batch`` rows, capturing the step first if needed (or again, when the model's
        parameters moved or changed since the capture)."""
        fp = self._current_fingerprint()
        if fp != self._fingerprint:
            self.steps.clear()
            self._fingerprint = fp
        if batch not in self.steps:
            self.steps[batch] = self._capture(batch)
        return self.steps[batch]

    def _capture(self, batch: int) -> StaticStep:
        lm = self.lm
        cache = lm.allocate_cache(batch)
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=lm.device)

        from emma_mamba.inference.generate import _step_logits, decode_step

        def step():
            if self.compile:
                return decode_step(lm, tokens, cache, self.compile)
            return _step_logits(lm, tokens, cache)

        with torch.inference_mode():
            handle, logits = self.api.capture(step)
        return StaticStep(cache, tokens, logits, handle)

    def load(self, cache) -> StaticStep:
        """The static step of ``cache``'s batch size, its states set to ``cache``'s."""
        s = self.static(cache.batch_size)
        if s.cache is not cache:
            s.cache.copy_(cache)
        return s

    def step(self, s: StaticStep, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of every row of ``s`` from ``tokens`` (b,) or (b, 1); returns the logits buffer
        (b, padded_vocab), overwritten by the next step."""
        offset = s.cache.seqlen_offset  # a replay runs no Python: the count is kept here
        s.tokens.copy_(tokens.reshape(-1, 1))
        self.api.replay(s.handle)
        s.cache.seqlen_offset = offset + 1
        return s.logits


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decoder_for(lm, compile: bool | str = False) -> GraphDecoder:
    """The model's :class:`GraphDecoder`, created (with :class:`CudaGraphs`) on first use, and again when
    ``compile`` differs from the existing one's (its captures hold the other kind of step)."""
    dec = _DECODERS.get(lm)
    if dec is None or dec.compile != compile:
        dec = _DECODERS[lm] = GraphDecoder(lm, dec.api if dec is not None else None, compile)
    return dec


def attach(lm, api, compile: bool | str = False) -> GraphDecoder:
    """Give ``lm`` a decoder with capture strategy ``api`` (e.g. :class:`EagerReplay` in tests)."""
    dec = _DECODERS[lm] = GraphDecoder(lm, api, compile)
    return dec


def release(lm) -> None:
    """Drop the model's captured steps and their static buffers."""
    _DECODERS.pop(lm, None)
