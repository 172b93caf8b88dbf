"""`emma-mamba bench latency`: EMMA-Mamba against a transformer MLLM of matched size, one command, one JSON.

The paper's headline claim (EMMA-Mamba / Cobra: a Mamba MLLM answers faster than a transformer MLLM of similar
size) checked on the user's hardware. Both models are built from the same preset: EMMA-Mamba
(:class:`~emma_mamba.models.vlm.EmmaMamba`) and :class:`~emma_mamba.models.baseline.TransformerMLLM`, which
shares EMMA-Mamba's vision front and projector (same modules, same weights) and has a Llama-style LM from
transformers (SDPA attention, KV cache, random init) solved to the Mamba LM's parameter count. With ``--peer``
transformers' ``MambaForCausalLM`` holding our LM's exact weights runs the same LM-only shapes too.

Sections of one run (all under ``torch.inference_mode``, medians, after warm-up; timers synchronised: CUDA
events on the GPU, ``perf_counter`` on the CPU):

* ``ttft``: time to first token of an image-chat prompt with 1, 2, 4, ... images (``--images``): preprocessed
  pixels -> ViT taps -> MFF -> instruction fusion -> projector -> splice into the prompt embeddings -> LM
  prefill (filling the cache) -> argmax. Reported against the number of image tokens.
* ``decode``: per-token decode latency at context C (``--contexts``): prefill C random tokens into the cache
  (untimed), ``--warmup`` untimed steps, then ``--new-tokens`` steps each timed alone (one token forward with
  the cache + argmax); the median step. So this is the cost of one new token given C tokens of context, not a
  prefill time. Ours should be flat in C; attention over the KV cache grows linearly. The models' timed steps
  (and TTFT runs) are interleaved, one of each in turn, so a shared machine's drifting load hits all alike.
* ``memory``: at each context, the bytes of the inference state computed from the real cache tensors (Mamba:
  conv + SSM states, constant in C; transformer: the K/V entries holding the C context tokens, linear in C),
  and on CUDA the peak ``max_memory_allocated`` over each model's prefill + warm-up steps (absolute, which counts
  every model's weights and the live states of the runners prefilled before it, and above what was resident
  before it: the runner's own, which the memory plot draws).
* ``throughput``: decode tokens/s, aggregate over the batch (batch / median step time), at context
  ``--batch-context`` for each ``--batch-sizes``.
* ``crossover``: the smallest measured context from which our per-token decode is faster than the
  transformer's at it and at every larger measured context (and a log-linear interpolation between the
  bracketing points).
* ``checks`` (run first): each model's prefill + cached decode steps against its own cache-free forward at batch 1
  and 2, and the peer's logits against ours, so a broken cache path cannot produce a fast but meaningless
  number: ``checks_ok`` (each within ``checks_tolerance``) and ``ratios_valid`` say whether it passed, and a
  failure is printed as a warning (the timings are still written).

On CUDA, ``--cuda-graphs`` adds ``emma-mamba+graphs``: our decode step captured once per batch size into a
``torch.cuda.CUDAGraph`` over a static cache and a static token buffer, then replayed (:class:`CudaGraphDecoder`),
and ``transformer+graphs``: the transformer's step captured the same way over its StaticCache
(:class:`TransformerGraphRunner`), so the headline compares graphs with graphs: at 2.8B and batch 1 both steps
read all their weights, and removing the host's launch overhead on one side only would credit the architecture
with it. Neither path has run on a GPU yet; a transformers release whose step cannot be captured is reported
(``runners_failed``) and the headline then compares with the eager transformer (``ratios_against`` names which).
``--compile`` adds ``emma-mamba+compile``, our decode step through torch.compile (Inductor fuses the norms, casts
and gates around the kernels), and with ``--cuda-graphs`` also ``emma-mamba+graphs+compile``, that compiled step
captured in the graphs. The headline ratios (``ratios_of`` against ``ratios_against`` in the JSON) are those of
the most optimised variant of ours asked for, in this order: graphs+compile, graphs, compile, eager (chosen by the
flags, not by the measured times), against the graphed transformer with ``--cuda-graphs`` and the eager one
otherwise; ``ratios_eager`` keeps ours eager against the transformer eager (the architectures alone), and
``ratios_against_eager_transformer`` ours graphed against the transformer eager. The
transformer's KV cache is transformers' ``StaticCache`` (preallocated to C + warm-up + timed steps, written in
place; SDPA then attends over that length with a mask, so it is sized tightly) unless ``--kv-cache dynamic``
(``DynamicCache``, which concatenates each step).

Results go to ``--out`` (default ``bench_results/latency_<device>_<name>.json``) with machine, versions, shapes,
parameter counts, dtype, backend and load average, after each section (Ctrl-C leaves the finished ones, marked
``"interrupted": true``), plus PNG plots (decode latency, memory vs context; TTFT vs image
tokens; tokens/s vs batch) when matplotlib is installed (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from emma_mamba.bench import record

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SIZES: dict[str, dict] = {
    # the preset's vision front with a wider, deeper LM: big enough on a CPU for attention over the KV cache
    # to matter against per-layer overheads, small enough to prefill 4k tokens in seconds on one core
    "small": {"lm": {"d_model": 512, "n_layer": 8, "d_state": 16}},
}
"""Named LM size overrides for ``--size`` (applied on top of the preset)."""

DEFAULTS = {
    "cpu": {"contexts": [256, 512, 1024, 2048, 4096, 8192], "batch_sizes": [1, 2, 4, 8], "batch_context": 2048,
            "images": [1, 2, 4, 8, 16, 32, 64], "dtype": "float32"},
    "cuda": {"contexts": [256, 512, 1024, 2048, 4096, 8192], "batch_sizes": [1, 2, 4, 8, 16, 32, 64],
             "batch_context": 2048, "images": [1, 2, 4], "dtype": "bfloat16"},
}

OURS, TRANSFORMER, PEER, GRAPHS = "emma-mamba", "transformer", "transformers-mamba", "emma-mamba+graphs"
COMPILED, GRAPHS_COMPILED = "emma-mamba+compile", "emma-mamba+graphs+compile"
TRANSFORMER_GRAPHS = "transformer+graphs"
# a decode step run another way (same prefill, same state): left out of the TTFT section
VARIANTS = (GRAPHS, COMPILED, GRAPHS_COMPILED, TRANSFORMER_GRAPHS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    pos = record.positive_int
    p.add_argument("--preset", default="tiny", help="model preset (see `emma-mamba info`; default tiny)")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="LM size override on top of the preset: small = d_model 512, 8 layers")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, dotted key, YAML value (e.g. lm.n_layer=12); repeatable")
    p.add_argument("--contexts", type=pos, nargs="+", action=record.SortedUnique, default=None,
                   help="decode context lengths, sorted, each once (default 256 512 ... 8192)")
    p.add_argument("--batch-sizes", type=pos, nargs="+", action=record.SortedUnique, default=None,
                   help="batch sizes of the throughput section, sorted, each once (default cpu: 1 2 4 8, "
                        "cuda: 1..64)")
    p.add_argument("--batch-context", type=pos, default=None,
                   help="context length of the throughput section (default 2048)")
    p.add_argument("--images", type=pos, nargs="+", action=record.SortedUnique, default=None,
                   help="images per prompt in the TTFT section, sorted, each once (default cpu: 1 2 4 ... 64, "
                        "cuda: 1 2 4)")
    p.add_argument("--new-tokens", type=pos, default=32, help="timed decode steps per point (median reported)")
    p.add_argument("--warmup", type=record.non_negative_int, default=3,
                   help="untimed decode steps / TTFT runs first")
    p.add_argument("--repeats", type=pos, default=5, help="timed TTFT runs (median reported)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=pos, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--kv-cache", choices=("static", "dynamic"), default="static",
                   help="transformers cache of the baseline (default static: preallocated, in-place)")
    p.add_argument("--cuda-graphs", action="store_true", help="also time our decode replayed from CUDA graphs")
    p.add_argument("--compile", action="store_true",
                   help="also time our decode step through torch.compile (Inductor), and with --cuda-graphs "
                        "that step captured in CUDA graphs")
    p.add_argument("--peer", action="store_true", help="also run transformers' MambaForCausalLM (our weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=record.out_path, default=None,
                   help="JSON path (default bench_results/latency_<device>_<name>.json)")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: next to the JSON)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# ------------------------------------------------------------------------------------------------ timing

class _Clock:
    """Synchronised wall time of a region: CUDA events on a GPU, perf_counter on the CPU. Seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t


# ----------------------------------------------------------------------------------------------- runners
# One interface over the LMs: prefill(ids|embeds, max_len) -> (next-token logits (b, V), state);
# step(state, tok (b, 1)) -> (logits (b, V), state); state_bytes(state, context) -> bytes of the context state.

class OursRunner:
    """MambaLM with its recurrent :class:`~emma_mamba.models.mamba.MambaCache` (the generate() path)."""

    name = OURS

    def __init__(self, lm):
        self.lm = lm

    def prefill(self, ids=None, embeds=None, max_len=None):
        b = (ids if ids is not None else embeds).shape[0]
        cache = self.lm.allocate_cache(b)
        out = self.lm(input_ids=ids, inputs_embeds=embeds, cache=cache, num_last_tokens=1)
        return out.logits[:, -1], cache

    def step(self, cache, tok):  # generate()'s eager step (no host-synchronising id range check)
        from emma_mamba.inference.generate import decode_step

        return decode_step(self.lm, tok, cache), cache

    def full(self, ids):
        """Logits (b, l, V) of one cache-free forward: the oracle of prefill + steps."""
        return self.lm(ids).logits

    @staticmethod
    def state_bytes(cache, context=None) -> int:
        return sum(t.nbytes for t in cache.conv_states + cache.ssm_states)


class CompiledRunner(OursRunner):
    """Our decode step through torch.compile (what ``generate(..., compile=True)`` runs); prefill is ours."""

    name = COMPILED

    def step(self, cache, tok):
        from emma_mamba.inference.generate import decode_step

        return decode_step(self.lm, tok, cache, compile=True), cache


class CudaGraphDecoder(OursRunner):
    """Our decode step replayed from CUDA graphs, captured once per batch size
    (:class:`emma_mamba.inference.cuda_graphs.GraphDecoder`, what ``generate(..., cuda_graphs=True)`` uses;
    ``compile``: the captured step is the torch.compile'd one). Prefill writes straight into the static cache of
    its batch size (zeroed in place first: the graph keeps reading those addresses)."""

    name = GRAPHS

    def __init__(self, lm, compile: bool = False):
        from emma_mamba.inference.cuda_graphs import GraphDecoder

        super().__init__(lm)
        self.name = GRAPHS_COMPILED if compile else GRAPHS
        self.decoder = GraphDecoder(lm, compile=compile)
        self._static: dict[int, object] = {}  # batch -> StaticStep of the last prefill

    def prefill(self, ids=None, embeds=None, max_len=None):
        b = (ids if ids is not None else embeds).shape[0]
        s = self._static[b] = self.decoder.static(b)
        s.cache.reset()
        out = self.lm(input_ids=ids, inputs_embeds=embeds, cache=s.cache, num_last_tokens=1)
        return out.logits[:, -1], s.cache

    def step(self, cache, tok):
        s = self._static[tok.shape[0]]
        assert cache is s.cache, "CudaGraphDecoder.step: the state must come from this decoder's prefill"
        return self.decoder.step(s, tok), cache


class TransformerRunner:
    """transformers' LlamaForCausalLM (SDPA) with a StaticCache (default) or a DynamicCache."""

    name = TRANSFORMER

    def __init__(self, lm, kv_cache: str = "static"):
        from emma_mamba.models.baseline import llama_cache_keyword

        self.lm, self.kv_cache = lm, kv_cache
        # the cache keyword of this transformers release (the deprecation shim of `past_key_values` would add a
        # FutureWarning and a kwargs rewrite to every call: ~60 us a step on a CPU, timed on this side only)
        self.kw = llama_cache_keyword(lm)

    def _new_cache(self, max_len):
        import transformers

        if self.kv_cache == "static":
            return transformers.StaticCache(config=self.lm.config, max_cache_len=max_len)
        return transformers.DynamicCache(config=self.lm.config)

    def prefill(self, ids=None, embeds=None, max_len=None):
        L = (ids if ids is not None else embeds).shape[1]
        cache = self._new_cache(max_len or L + 64)
        out = self.lm(input_ids=ids, inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{self.kw: cache})
        return out.logits[:, -1], getattr(out, self.kw)

    def step(self, cache, tok):
        out = self.lm(input_ids=tok, use_cache=True, **{self.kw: cache})
        return out.logits[:, -1], getattr(out, self.kw)

    def full(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits

    @staticmethod
    def state_bytes(cache, context: int) -> int:
        """K/V bytes holding the first ``context`` positions, read off the real per-layer tensors."""
        n = 0
        for layer in cache.layers:
            for t in (layer.keys, layer.values):  # (b, kv_heads, positions, head_dim)
                n += t[:, :, :context].nbytes
        return n

    @staticmethod
    def allocated_bytes(cache) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


class _GraphedStep:
    """A transformer decode step captured in a CUDA graph over one StaticCache: the token buffer the graph reads,
    ``run()`` (replay, then the logits tensor the graph writes), the cache it updates in place."""

    def __init__(self, cache, tok, run):
        self.cache, self.tok, self.run = cache, tok, run

    @property
    def layers(self):  # state_bytes / allocated_bytes read the cache's layers
        return self.cache.layers


class TransformerGraphRunner(TransformerRunner):
    """The transformer's decode step replayed from a CUDA graph, as ours is with ``--cuda-graphs``, so the headline
    compares like with like (graphs remove the host's launch overhead on both sides; at 2.8B and batch 1 both
    steps are bound by reading the weights, and launch overhead is a large part of an eager step). One graph per
    prefill (the StaticCache is sized to its context, as the eager runner's is, so SDPA attends over the same
    length), captured after the prefill, untimed. transformers' StaticCache keeps its position as a device tensor
    advanced in place (``cumulative_length``, transformers 5.x; where the model takes ``cache_position``, a static
    position tensor advanced inside the graph is passed), so the captured step needs no host value.

    The prefill runs the context's last token through the step to be captured (its warm-up run, on a side stream
    as CUDA graphs require), so the cache holds the whole context when the capture starts and the capture itself
    (which records the kernels without running them) advances nothing. ``capture=False`` (tests on the CPU) runs
    that step eagerly in place of the replay: the same buffers, positions and logits."""

    name = TRANSFORMER_GRAPHS
    optional = True  # a transformers release whose step cannot be captured: reported, the run goes on without it

    def __init__(self, lm, capture: bool = True):
        super().__init__(lm, "static")
        self.capture = capture
        import inspect

        self.cache_position = "cache_position" in inspect.signature(type(lm.model).forward).parameters

    def prefill(self, ids=None, embeds=None, max_len=None):
        if ids is None or ids.shape[1] < 2:
            raise ValueError(f"{self.name}: prefill needs token ids, at least 2 (its last runs through the graph)")
        L = ids.shape[1]
        cache = self._new_cache(max_len or L + 64)
        self.lm(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, **{self.kw: cache})
        tok = ids[:, -1:].clone()  # the buffer the graph reads
        kw = {self.kw: cache}
        if self.cache_position:
            kw["cache_position"] = pos = torch.full((1,), L - 1, dtype=torch.long, device=ids.device)

        def step():
            logits = self.lm(input_ids=tok, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
            if self.cache_position:
                pos.add_(1)
            return logits

        if not self.capture:
            return step(), _GraphedStep(cache, tok, step)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the warm-up run: the context's last token
            first = step().clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()

        def run():
            graph.replay()
            return logits

        return first, _GraphedStep(cache, tok, run)

    def step(self, state, tok):
        state.tok.copy_(tok)
        return state.run(), state


class PeerRunner:
    """transformers' MambaForCausalLM (Mamba2ForCausalLM for a Mamba-2 LM) holding our LM's weights (its own
    cache, its own code path)."""

    name = PEER

    def __init__(self, hf):
        self.hf = hf
        from emma_mamba.bench.lm import hf_cache_keyword

        self.kw = hf_cache_keyword(hf)

    def prefill(self, ids=None, embeds=None, max_len=None):
        out = self.hf(input_ids=ids, inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], getattr(out, self.kw)

    def step(self, cache, tok):
        out = self.hf(tok, use_cache=True, **{self.kw: cache})
        return out.logits[:, -1], getattr(out, self.kw)

    def full(self, ids):
        return self.hf(input_ids=ids, use_cache=False).logits

    @staticmethod
    def state_bytes(cache, context=None) -> int:
        """Bytes of every tensor the cache holds (transformers keeps per-layer dicts of conv/recurrent states)."""
        seen: dict[int, int] = {}

        def walk(x):
            if isinstance(x, torch.Tensor):
                seen[id(x)] = x.nbytes
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)
            elif hasattr(x, "__dict__") and not isinstance(x, (torch.device, torch.dtype)):
                for v in vars(x).values():
                    walk(v)

        walk(getattr(cache, "layers", cache))
        return sum(seen.values())


# ---------------------------------------------------------------------------------------------- sections

def _error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (300 characters at most) of an optional runner's failure."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def decode_latency(runners, clock, batch: int, context: int, steps: int, warmup: int, vocab: int,
                   generator: torch.Generator, device) -> dict[str, dict]:
    """Per-token decode latency of each runner at ``context``: {runner name: row}.

    Every runner prefills the same ``context`` random tokens (untimed) and takes ``warmup`` untimed steps; then
    the timed steps *interleave* the runners (one step of each in turn, the order alternating), so that a
    machine whose load drifts (a shared CPU) slows every runner alike instead of whichever ran last.
    """
    ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
    cuda = device.type == "cuda"
    states, toks, rows = {}, {}, {}

    def drop(r, kind, error):
        """Record that ``r`` cannot run at this (batch, context) (``kind``: "oom", or "failed": an optional runner
        that cannot run here) and free what it held; the others go on."""
        states.pop(r.name, None)
        toks.pop(r.name, None)
        rows[r.name] = {"context": context, "batch": batch, kind: True, "error": error,
                        "state_bytes": None, "median_s": None, "tokens_per_s": None}

    def out_of_memory(r, e):
        drop(r, "oom", str(e).splitlines()[0][:200])
        if cuda:
            torch.cuda.empty_cache()
        print(f"out of memory: {r.name} at batch {batch}, context {context}", flush=True)

    def failed(r, e):
        drop(r, "failed", _error_line(e))
        print(f"{r.name} failed at batch {batch}, context {context}: {rows[r.name]['error']}", flush=True)

    for r in runners:
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            logits, state = r.prefill(ids=ids, max_len=context + warmup + steps + 1)
            row = {"context": context, "batch": batch, "state_bytes": r.state_bytes(state, context)}
            if isinstance(r, TransformerRunner):
                row["allocated_state_bytes"] = r.allocated_bytes(state)
            tok = logits.argmax(-1, keepdim=True)  # (b, 1)
            for _ in range(warmup):
                logits, state = r.step(state, tok)
                tok = logits.argmax(-1, keepdim=True)
        except torch.cuda.OutOfMemoryError as e:  # e.g. a transformer's KV cache at batch 64 x 2048 tokens
            logits = state = tok = None
            out_of_memory(r, e)
            continue
        except Exception as e:  # noqa: BLE001 - an optional runner (a graph capture) that cannot run here
            if not getattr(r, "optional", False):
                raise
            logits = state = tok = None
            failed(r, e)
            continue
        if cuda:  # this runner's prefill + first steps, above what was resident before (weights, other states)
            torch.cuda.synchronize(device)
            # the absolute peak counts everything resident: every model's weights and the states of the runners
            # prefilled before this one at this point (the peer's includes the transformer's KV cache); the
            # increment above it is this runner's own
            peak = torch.cuda.max_memory_allocated(device)
            row["cuda_peak_allocated_bytes"], row["cuda_resident_before_bytes"] = peak, base
            row["cuda_peak_above_baseline_bytes"] = peak - base
        states[r.name], toks[r.name], rows[r.name] = state, tok, row

    live = [r for r in runners if r.name in states]
    times: dict[str, list[float]] = {r.name: [] for r in live}
    for i in range(steps):
        for r in (live if i % 2 == 0 else live[::-1]):
            if r.name not in states:
                continue

            def one():
                logits, states[r.name] = r.step(states[r.name], toks[r.name])
                toks[r.name] = logits.argmax(-1, keepdim=True)

            try:
                times[r.name].append(clock.time(one)[1])
            except torch.cuda.OutOfMemoryError as e:
                out_of_memory(r, e)
    for name in states:
        med = statistics.median(times[name])
        rows[name].update({"median_s": med, "tokens_per_s": batch / med, "steps_s": times[name]})
    return {r.name: rows[r.name] for r in runners}


def consistency_checks(runners, vocab: int, device, prompt: int = 24, steps: int = 4,
                       failed: dict | None = None) -> dict:
    """Each runner's prefill + decode steps against its own cache-free forward on the same tokens (max |diff|
    of the logits over the prompt's last position and every step), at batch 1 and 2 (the graph runners capture
    one graph per batch size), and the peer's logits against ours (same weights). Run before timing, so a broken
    cache path cannot produce a fast but meaningless number. An optional runner that fails (a graph capture this
    transformers release cannot make) goes into ``failed`` (name -> error) instead of stopping the run."""
    g = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, vocab, (b, prompt + steps), generator=g).to(device) for b in (1, 2)]
    out, fulls = {}, {}
    for r in runners:
        diffs = []
        try:
            for ids in batches:
                full = r.full(ids).float()  # (b, prompt + steps, V)
                fulls.setdefault(r.name, full)  # batch 1's
                logits, state = r.prefill(ids=ids[:, :prompt], max_len=prompt + steps + 1)
                diffs.append((logits.float() - full[:, prompt - 1]).abs().max().item())
                for i in range(steps):
                    logits, state = r.step(state, ids[:, prompt + i:prompt + i + 1])
                    diffs.append((logits.float() - full[:, prompt + i]).abs().max().item())
        except Exception as e:  # noqa: BLE001 - an optional runner that cannot run here: reported, dropped
            if not getattr(r, "optional", False) or failed is None:
                raise
            failed[r.name] = _error_line(e)
            continue
        out[f"{r.name}: cached decode vs full forward, max abs logit diff"] = max(diffs)
    if PEER in fulls and OURS in fulls:
        out[f"{PEER} vs {OURS}: full forward, max abs logit diff"] = (fulls[PEER] - fulls[OURS]).abs().max().item()
    return out


def find_crossover(contexts, ours, theirs) -> dict:
    """First measured context from which ours < theirs at it and every larger context; interpolated point.

    A None time is a runner that ran out of memory there: it loses to any measured time. Each context once (a
    context measured twice has no single answer to "faster at it")."""
    dup = sorted({c for c in contexts if list(contexts).count(c) > 1})
    if dup:
        raise ValueError(f"find_crossover: contexts given more than once: {dup}")
    inf = float("inf")
    pts = sorted((c, inf if o is None else o, inf if t is None else t) for c, o, t in zip(contexts, ours, theirs))
    beats = [o < t for _, o, t in pts]
    first = None
    for i in range(len(pts)):
        if all(beats[i:]):
            first = pts[i][0]
            break
    interp = None
    if first is not None:
        i = [c for c, _, _ in pts].index(first)
        if i == 0:
            interp = None  # faster already at the smallest measured context
        else:
            (c0, o0, t0), (c1, o1, t1) = pts[i - 1], pts[i]
            if inf not in (o0, t0, o1, t1):  # no interpolation across an out-of-memory point
                d0, d1 = t0 - o0, t1 - o1  # <= 0 then > 0
                f = d0 / (d0 - d1) if d0 != d1 else 0.0
                interp = math.exp(math.log(c0) + f * (math.log(c1) - math.log(c0)))
    return {"ours_faster_from_context": first, "interpolated_context": interp,
            "ours_faster_at_all_measured": bool(pts) and all(beats),
            "ours_faster_at_none": bool(pts) and not any(beats),
            "rule": "smallest measured context C with median decode step(ours) < (transformer) at C and at every "
                    "larger measured context; interpolated_context: the zero of (theirs - ours) between the "
                    "bracketing points, linear in log C"}


# -------------------------------------------------------------------------------------------------- run

def config_name(args) -> str:
    """The model's name in the output file: the preset, ``-<size>``, ``-custom`` with overrides."""
    return args.preset + (f"-{args.size}" if args.size else "") + ("-custom" if args.override else "")


def build_models(args, device, dtype):
    """(EmmaMamba, TransformerMLLM, config name) on ``device`` in ``dtype``, seeded."""
    from emma_mamba.config import apply_dotted_overrides, apply_overrides, get_preset
    from emma_mamba.models.baseline import TransformerMLLM
    from emma_mamba.models.vlm import EmmaMamba

    cfg = get_preset(args.preset)
    if args.size:
        apply_overrides(cfg, SIZES[args.size], source=f"--size {args.size}")
    apply_dotted_overrides(cfg, args.override)
    cfg.align.enabled = False  # training-only head: never part of inference
    cfg.validate()
    torch.manual_seed(args.seed)
    emma = EmmaMamba(cfg, for_training=False, device=device, dtype=dtype).eval()
    base = TransformerMLLM.from_emma(emma).eval()
    return emma, base, config_name(args)


def _check_args(args):
    """What the option types cannot say alone (they check each value: counts >= 1, lists sorted and unique)."""
    if args.warmup == 0 and (args.compile or args.cuda_graphs):
        # the first steps at a new shape compile (or capture): with no untimed step they land in the timings
        raise SystemExit("emma-mamba bench latency: --compile / --cuda-graphs need --warmup >= 1 (the first step "
                         "at each batch size compiles or captures; it must not be timed)")
    for name in ("contexts", "batch_sizes", "images"):  # the defaults, or a caller's namespace
        vals = getattr(args, name)
        if any(v < 1 for v in vals) or len(set(vals)) != len(vals):
            raise SystemExit(f"emma-mamba bench latency: --{name.replace('_', '-')} must be distinct values >= 1, "
                             f"got {vals}")
        setattr(args, name, sorted(vals))
    if args.plots_dir and os.path.exists(args.plots_dir) and not os.path.isdir(args.plots_dir):
        raise SystemExit(f"emma-mamba bench latency: --plots-dir {args.plots_dir} is not a directory")


def run(args) -> int:
    from emma_mamba.bench.lm import _hide_cuda_only_packages

    start = record.run_start()
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in DEFAULTS:
        raise SystemExit(f"emma-mamba bench latency: --device {args.device!r}: expected cpu or cuda[:i]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("emma-mamba bench latency: --device cuda but torch sees no CUDA device")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, streams and graphs use the current device
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("emma-mamba bench latency: --cuda-graphs needs --device cuda")
    if device.type == "cpu" and args.peer:
        _hide_cuda_only_packages()  # transformers' Mamba must take its PyTorch path on the CPU
    d = DEFAULTS[device.type]
    for key in ("contexts", "batch_sizes", "batch_context", "images"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    args.dtype = args.dtype or d["dtype"]
    _check_args(args)
    out = args.out or record.default_out(f"latency_{device.type}_{config_name(args)}.json")
    problem = record.out_problem(out)
    if problem:
        raise SystemExit(f"emma-mamba bench latency: --out: {problem}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]

    from emma_mamba import ops
    from emma_mamba.config import ConfigError
    from emma_mamba.models.baseline import count_parameters, describe_match
    from emma_mamba.models.mamba import CheckpointError

    try:
        emma, base, name = build_models(args, device, dtype)
    except (CheckpointError, FileNotFoundError) as e:  # a configured file: reported as a config error
        raise ConfigError(str(e)) from None
    lm = emma.lm
    print(describe_match(lm, base.lm), flush=True)
    runners = [OursRunner(lm), TransformerRunner(base.lm, args.kv_cache)]
    if args.compile:
        runners.insert(1, CompiledRunner(lm))
    if args.cuda_graphs:
        runners.insert(1, CudaGraphDecoder(lm))
        if args.compile:
            runners.insert(2, CudaGraphDecoder(lm, compile=True))
        if args.kv_cache == "static":  # the transformer's step graphed too: the headline compares like with like
            runners.append(TransformerGraphRunner(base.lm))
    if args.peer:
        from emma_mamba.bench.lm import _hf_twin

        runners.append(PeerRunner(_hf_twin(lm, dtype).to(device)))
    backend = ops.get_backend(device)
    clock = _Clock(device)
    V = lm.config.vocab_size  # real tokens only (the padded rows are not tokens)
    load_before = start["loadavg_1_5_15_before"] or [float("nan")] * 3
    print(f"device {device}, {args.dtype}, backend {backend!r}, {torch.get_num_threads()} threads, "
          f"{emma.vision.num_tokens} image tokens per image, KV cache {args.kv_cache}, "
          f"load average {load_before[0]:.2f}", flush=True)
    results: dict = {"ttft": {}, "decode": {}, "throughput": {}}
    # the headline ratios: the most optimised way of decoding that was asked for (by the flags, not the times)
    ours_key = (GRAPHS_COMPILED if args.compile else GRAPHS) if args.cuda_graphs else (COMPILED if args.compile
                                                                                       else OURS)
    c, h = lm.config, base.lm.config
    res = {
        "benchmark": "latency", "device": str(device), "machine": record.machine_info(device, args.threads, start),
        "backend": backend, "dtype": args.dtype,
        "model": name, "preset": args.preset, "size": args.size, "overrides": args.override,
        "shapes": {
            "image_size": list(emma.vision.image_size), "image_tokens_per_image": emma.vision.num_tokens,
            "mamba_lm": {"ssm_layer": c.ssm_layer, "d_model": c.d_model, "n_layer": c.n_layer, "d_state": c.d_state,
                         "d_conv": c.d_conv, "expand": c.expand, "d_inner": c.d_inner, "vocab": c.padded_vocab_size,
                         "tie_embeddings": c.tie_embeddings,
                         **({"headdim": c.headdim, "ngroups": c.ngroups} if c.ssm_layer == "mamba2" else {})},
            "transformer_lm": {"arch": "LlamaForCausalLM", "attn_implementation": h._attn_implementation,
                               "hidden_size": h.hidden_size, "n_layer": h.num_hidden_layers,
                               "heads": h.num_attention_heads, "kv_heads": h.num_key_value_heads,
                               "head_dim": h.head_dim, "intermediate_size": h.intermediate_size,
                               "vocab": h.vocab_size, "tie_word_embeddings": h.tie_word_embeddings,
                               "kv_cache": args.kv_cache},
            "contexts": args.contexts, "batch_sizes": args.batch_sizes, "batch_context": args.batch_context,
            "images": args.images, "new_tokens": args.new_tokens,
        },
        "parameters": {"mamba_lm": count_parameters(lm), "transformer_lm": count_parameters(base.lm),
                       "mamba_lm_non_embedding": count_parameters(lm, (lm.embeddings.weight,)),
                       "transformer_lm_non_embedding": count_parameters(
                           base.lm, (base.lm.get_input_embeddings().weight,)),
                       "shared_front": count_parameters(torch.nn.ModuleList(
                           [m for m in (emma.vision, emma.mff, emma.instruction, emma.projector) if m is not None]))},
        "timing": {"statistic": "median", "warmup": args.warmup, "repeats_ttft": args.repeats,
                   "decode_steps_timed": args.new_tokens,
                   "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
                   "inference_mode": True, "threads": torch.get_num_threads()},
        "cuda_graphs": bool(args.cuda_graphs), "compile": bool(args.compile), "ratios_of": ours_key,
        "checks": {}, "results": results, "complete": False,
    }
    save = record.saver(out, device, args.threads, start)
    try:
        _measure(args, emma, base, runners, clock, V, device, dtype, res, save)
    except KeyboardInterrupt:
        res["machine"] = record.machine_info(device, args.threads, start)
        return record.interrupted(res, out)

    decode = results["decode"]
    # with --cuda-graphs the transformer's step is graphed too, and the headline compares graphs with graphs;
    # where its capture failed (runners_failed) the headline is against the eager transformer, and says so
    theirs = TRANSFORMER_GRAPHS if any(x["median_s"] for x in decode.get(TRANSFORMER_GRAPHS, [])) else TRANSFORMER

    def crossover(ours: str, other: str) -> dict:
        return find_crossover(args.contexts, [x["median_s"] for x in decode[ours]],
                              [x["median_s"] for x in decode[other]])

    cross = crossover(OURS, TRANSFORMER)
    for key, variant in (("with_cuda_graphs", GRAPHS), ("with_compile", COMPILED),
                         ("with_cuda_graphs_and_compile", GRAPHS_COMPILED)):
        if variant in decode:
            cross[key] = crossover(variant, TRANSFORMER)
    if theirs == TRANSFORMER_GRAPHS:
        cross["graphs_against_transformer_graphs"] = crossover(ours_key, TRANSFORMER_GRAPHS)

    def ratios_for(key: str, other: str = TRANSFORMER) -> dict:  # their step time / ours, our tokens/s / theirs
        out = {f"decode_speedup_at_{row['context']}": t["median_s"] / row["median_s"]
               for row, t in zip(decode[key], decode[other]) if row["median_s"] and t["median_s"]}
        out.update({f"tokens_per_s_ratio_batch_{row['batch']}": row["tokens_per_s"] / t["tokens_per_s"]
                    for row, t in zip(results["throughput"][key], results["throughput"][other])
                    if row["tokens_per_s"] and t["tokens_per_s"]})
        return out

    ratios = ratios_for(ours_key, theirs)
    # beside the headline: ours eager against the transformer eager (the architectures alone), and with
    # --cuda-graphs our graphed step against the transformer decoding eagerly
    ratios_eager = ratios_for(OURS)
    extra = {"ratios_against_eager_transformer": ratios_for(ours_key)} if theirs != TRANSFORMER else {}
    if args.cuda_graphs and theirs == TRANSFORMER:
        why = res.get("runners_failed", {}).get(TRANSFORMER_GRAPHS, "no measurement")
        print(f"note: the transformer's graphed step did not run ({why}): the headline ratios compare {ours_key} "
              f"with the transformer decoding eagerly", flush=True)
    if ours_key != OURS:
        last = f"decode_speedup_at_{args.contexts[-1]}"
        if last in ratios and last in ratios_eager:
            print(f"decode speedup at context {args.contexts[-1]}: {ratios[last]:.2f}x ({ours_key} against "
                  f"{theirs}), {ratios_eager[last]:.2f}x eager against eager")
    oom = [f"{k} at batch {x['batch']}, context {x['context']}" for section in ("decode", "throughput")
           for k, rows in results[section].items() for x in rows if x.get("oom")]
    first = cross["ours_faster_from_context"]
    print(f"crossover: ours faster per decoded token from context "
          f"{first if first is not None else 'none of the measured'}"
          + (f" (interpolated ~{cross['interpolated_context']:.0f})" if cross["interpolated_context"] else ""))
    res.update({"crossover": cross, "ratios": ratios, "ratios_against": theirs, **extra,
                "ratios_eager": ratios_eager, "ratios_valid": res["checks_ok"], "out_of_memory": oom,
                "complete": True})
    if not res["checks_ok"]:
        print("WARNING: the consistency checks failed (above): these ratios are not valid", flush=True)
    res["machine"] = record.machine_info(device, args.threads, start)
    load_after = res["machine"]["loadavg_1_5_15_after"] or [float("nan")] * 3
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    if not args.no_plots:
        stem = os.path.splitext(os.path.basename(out))[0]
        res["plots"] = plot(res, args.plots_dir or os.path.dirname(out) or ".", stem)
    record.write_json(res, out)
    print(f"wrote {out}")
    for p in res.get("plots", []):
        print(f"wrote {p}")
    return 0


def _measure(args, emma, base, runners, clock, V, device, dtype, res, save) -> None:
    """The sections, in order: checks, TTFT, decode vs context, throughput vs batch; ``res`` filled in place and
    ``save(res)`` after each (a run stopped by Ctrl-C or a time limit keeps the finished ones)."""
    results = res["results"]
    with torch.inference_mode():
        failed: dict = {}
        res["checks"] = checks = consistency_checks(runners, V, device, failed=failed)
        if failed:  # an optional runner (the transformer's graph capture) that cannot run here: the rest go on
            res["runners_failed"] = failed
            runners[:] = [r for r in runners if r.name not in failed]
            for name, err in failed.items():
                print(f"check  {name}: FAILED, left out of the run: {err}", flush=True)
        scale = 1e-3 if dtype == torch.float32 else 0.25
        res["checks_tolerance"] = scale
        for k, v in checks.items():
            print(f"check  {k}: {v:.2e}{'  <-- LARGE' if not v <= scale else ''}", flush=True)
        res["checks_ok"] = all(v <= scale for v in checks.values())  # NaN fails too
        if not res["checks_ok"]:
            print("WARNING: a cached decode path disagrees with its model's full forward beyond the tolerance: "
                  "the timings below are not valid (the JSON's checks_ok and ratios_valid are false)", flush=True)

        # --- TTFT: image(s) + prompt -> first token, against the number of image tokens. Our decode variants
        # are left out: their prefill is ours.
        H, W = emma.vision.image_size
        ttft_runners = [r for r in runners if r.name not in VARIANTS]
        results["ttft"] = {r.name: [] for r in ttft_runners}
        for k in args.images:
            g = torch.Generator().manual_seed(args.seed + k)
            pixels = torch.randn(k, 3, H, W, generator=g).to(device, dtype)
            text = emma.build_prompt("Describe the image in detail.", k)
            ids = torch.tensor([emma.tokenizer.encode(text)], device=device)
            inst = (emma.tokenize_instructions(["Describe the image in detail."] * k).to(device)
                    if emma.instruction is not None else None)

            def first_token(r):
                front = base if r.name == TRANSFORMER else emma  # the peer reads our (identical) embeddings
                visual = front.encode_images(pixels, inst)
                embeds = front._splice(ids, visual, None, None, None, None)[0]  # (1, L, d)
                logits, _ = r.prefill(embeds=embeds)
                return logits.argmax(-1), embeds.shape[1]

            for r in ttft_runners:
                for _ in range(args.warmup):
                    first_token(r)
            times = {r.name: [] for r in ttft_runners}
            seq = None
            for i in range(args.repeats):  # interleaved, like the decode steps
                for r in (ttft_runners if i % 2 == 0 else ttft_runners[::-1]):
                    (_, seq), dt = clock.time(lambda: first_token(r))
                    times[r.name].append(dt)
            for r in ttft_runners:
                med = statistics.median(times[r.name])
                results["ttft"][r.name].append({"images": k, "image_tokens": k * emma.vision.num_tokens,
                                                "prompt_tokens": seq, "median_s": med, "runs_s": times[r.name]})
                print(f"ttft   {r.name:<20} {k:3d} image(s) {k * emma.vision.num_tokens:6d} image tokens "
                      f"({seq:6d} in all)  {med * 1e3:9.2f} ms", flush=True)
        save(res)

        # --- per-token decode latency and state memory against the context length (batch 1)
        results["decode"] = {r.name: [] for r in runners}
        for C in args.contexts:
            g = torch.Generator().manual_seed(args.seed + C)
            rows = decode_latency(runners, clock, 1, C, args.new_tokens, args.warmup, V, g, device)
            for r in runners:
                row = rows[r.name]
                results["decode"][r.name].append(row)
                if row.get("median_s") is not None:
                    print(f"decode {r.name:<20} context {C:6d}  {row['median_s'] * 1e3:9.3f} ms/token  "
                          f"state {row['state_bytes'] / 2**20:9.2f} MiB", flush=True)
            del rows
        save(res)

        # --- tokens/s against the batch size at a fixed context
        results["throughput"] = {r.name: [] for r in runners}
        for B in args.batch_sizes:
            g = torch.Generator().manual_seed(args.seed + 100_000 + B)
            rows = decode_latency(runners, clock, B, args.batch_context, args.new_tokens, args.warmup, V, g, device)
            for r in runners:
                row = rows[r.name]
                results["throughput"][r.name].append(row)
                if row.get("median_s") is not None:
                    print(f"batch  {r.name:<20} batch {B:4d} context {args.batch_context}  "
                          f"{row['tokens_per_s']:10.1f} tokens/s", flush=True)
            del rows
        save(res)


# ------------------------------------------------------------------------------------------------ plots

_STYLE = {OURS: ("tab:blue", "o"), GRAPHS: ("tab:cyan", "D"), COMPILED: ("tab:purple", "v"),
          GRAPHS_COMPILED: ("tab:olive", "P"), TRANSFORMER: ("tab:red", "s"), PEER: ("tab:green", "^"),
          TRANSFORMER_GRAPHS: ("tab:orange", "X")}
_LINE = {PEER: dict(ls="--", mfc="none", ms=8)}  # hollow and dashed: the peer's state curve lies on ours


def plot(res: dict, out_dir: str, stem: str) -> list[str]:
    """Four PNGs: decode latency and state memory vs context, TTFT vs image tokens, tokens/s vs batch."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plots written")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    r = res["results"]
    title = (f"{res['model']} on {res['machine'].get('gpu') or res['machine'].get('cpu_model', 'cpu')}, "
             f"{res['dtype']}, {res['timing']['threads']} thread(s)" if res["device"] == "cpu" else
             f"{res['model']} on {res['machine'].get('gpu')}, {res['dtype']}")
    s = res["shapes"]
    mamba2 = s["mamba_lm"].get("ssm_layer") == "mamba2"
    label = {OURS: f"EMMA-Mamba (Mamba{'-2' if mamba2 else ''} {s['mamba_lm']['n_layer']}L x "
                   f"{s['mamba_lm']['d_model']})",
             GRAPHS: "EMMA-Mamba + CUDA graphs", COMPILED: "EMMA-Mamba + torch.compile",
             GRAPHS_COMPILED: "EMMA-Mamba + torch.compile + CUDA graphs",
             TRANSFORMER: f"Transformer (Llama {s['transformer_lm']['n_layer']}L x {s['transformer_lm']['hidden_size']},"
                          f" {s['transformer_lm']['kv_cache']} KV cache)",
             PEER: f"transformers Mamba{'2' if mamba2 else ''}ForCausalLM (same weights)",
             TRANSFORMER_GRAPHS: "Transformer + CUDA graphs"}
    paths = []

    def save(fig, suffix):
        p = os.path.join(out_dir, f"{stem}_{suffix}.png")
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    # top: latency; bottom: transformer / ours, measured step-interleaved, so it holds even when the
    # machine's load (and with it every absolute number) shifts between contexts
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    # out-of-memory (or failed) points are not drawn
    fits = lambda rows: [x for x in rows if x.get("median_s") is not None]  # noqa: E731
    for k, rows in r["decode"].items():
        rows = fits(rows)
        ax.plot([x["context"] for x in rows], [x["median_s"] * 1e3 for x in rows], marker=_STYLE[k][1],
                color=_STYLE[k][0], label=label[k], **_LINE.get(k, {}))
    cx = res["crossover"]["ours_faster_from_context"]
    if cx is not None and not res["crossover"]["ours_faster_at_all_measured"]:
        xi = res["crossover"]["interpolated_context"] or cx
        ax.axvline(xi, color="gray", ls="--", lw=1)
        ax.annotate(f"crossover ~{xi:.0f} (interpolated)\nours faster at every measured C >= {cx}",
                    (xi, ax.get_ylim()[1]), xytext=(4, -24), textcoords="offset points", fontsize=8,
                    color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens already in the cache)")
    ax.set_ylabel("per-token decode latency, median (ms)")
    ax.set_title(f"Decode latency vs context, batch 1\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_xlabel("")
    theirs = {x["context"]: x["median_s"] for x in fits(r["decode"][TRANSFORMER])}
    for k, rows in r["decode"].items():
        if k == TRANSFORMER:
            continue
        rows = [x for x in fits(rows) if x["context"] in theirs]
        ax2.plot([x["context"] for x in rows], [theirs[x["context"]] / x["median_s"] for x in rows],
                 marker=_STYLE[k][1], color=_STYLE[k][0], **_LINE.get(k, {}))
    ax2.axhline(1.0, color="gray", lw=1)
    ax2.set_ylabel("transformer / this\n(> 1: faster)", fontsize=8)
    ax2.set_xlabel("context length (tokens already in the cache)")
    ax2.grid(True, which="both", alpha=0.3)
    save(fig, "decode")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, rows in r["decode"].items():
        if k in VARIANTS:
            continue  # same state as ours
        rows = fits(rows)
        if not rows:
            continue
        ax.plot([x["context"] for x in rows], [x["state_bytes"] / 2**20 for x in rows], marker=_STYLE[k][1],
                color=_STYLE[k][0], label=label[k] + ": state", **_LINE.get(k, {}))
        if "cuda_peak_above_baseline_bytes" in rows[0]:
            # this runner's own increment: the absolute peak also counts the other models' weights and the states
            # of the runners prefilled before it (the peer's would grow with the transformer's KV cache)
            ax.plot([x["context"] for x in rows], [x["cuda_peak_above_baseline_bytes"] / 2**20 for x in rows],
                    ls=":", marker=_STYLE[k][1], color=_STYLE[k][0],
                    label=label[k] + ": CUDA peak of prefill + steps, above resident")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("MiB (batch 1)")
    ax.set_title(f"Inference state (KV cache / recurrent state) vs context\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "memory")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, rows in r["ttft"].items():
        ax.plot([x["image_tokens"] for x in rows], [x["median_s"] * 1e3 for x in rows], marker=_STYLE[k][1],
                color=_STYLE[k][0], label=label[k], **_LINE.get(k, {}))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"image tokens in the prompt ({s['image_tokens_per_image']} per image)")
    ax.set_yscale("log")  # the stock peer can be an order of magnitude slower; keep ours vs transformer legible
    ax.set_ylabel("time to first token, median (ms)")
    ax.set_title(f"TTFT (vision front + projector + prefill) vs image tokens\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "ttft")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, rows in r["throughput"].items():
        rows = fits(rows)
        ax.plot([x["batch"] for x in rows], [x["tokens_per_s"] for x in rows], marker=_STYLE[k][1],
                color=_STYLE[k][0], label=label[k], **_LINE.get(k, {}))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"batch size (context {s['batch_context']} tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode throughput vs batch size\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    save(fig, "throughput")
    return paths
