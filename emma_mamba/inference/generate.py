"""Text generation with Mamba's recurrent state: prefill once, then O(1) work per new token.

A Mamba LM carries its whole context in a fixed-size state per layer (conv window ``(b, conv_dim, d_conv)``,
conv_dim = d_inner, or d_inner + 2 * ngroups * d_state for Mamba-2; SSM state ``(b, d_inner, d_state)``; see
:class:`emma_mamba.models.mamba.MambaCache`). So generation is:

1. **prefill**: one full-sequence forward over the prompt (the parallel scan), which leaves each layer's last
   conv inputs and the scan's last state in the cache, and gives the logits of the first new token;
2. **decode**: per new token, one forward of length 1 that advances the cached states with the single-step ops
   (``causal_conv1d_update``, ``selective_state_update``); its cost does not depend on the context length.

Batches of prompts of different lengths: plain left padding, the transformer habit, is wrong for a recurrent
model (the pad tokens would flow through the state). Here a padded row also carries ``seq_idx`` (0 on the
padding, 1 on the prompt), the packed-sequence boundary of the kernels: the scan state and the conv window
restart where the prompt begins, so the padding never reaches them and the row's last state is the prompt's
own. Prompts are sorted by length and prefilled in as few padded batches as keep the padding within
``PREFILL_PAD_WASTE`` of the real tokens (prompts of one length: one batch without padding; on the CPU a batch
also stays within ``PREFILL_CPU_MAX_POSITIONS``), their states are gathered into one cache, and decoding then
runs batched. Rows that finish are dropped from the cache.

Sampling follows the usual order: repetition penalty (CTRL, Keskar et al. 2019: positive logits of seen tokens
divided by the penalty, negative ones multiplied), temperature (0 = greedy), top-k, top-p (nucleus, Holtzman
et al. 2019). The padded vocabulary rows beyond ``config.vocab_size`` are never sampled, nor, given a tokenizer,
ids it has no token for or marks as inputs only (:func:`output_vocab`). This is transformers'
order, and the distribution drawn from is that of its logits processors (tests/models/test_sampling_oracle.py),
but where its top-p cut is not determined: which of tied tokens straddling the cut are kept (either side's
``torch.sort`` decides), one token more or fewer where the k most likely hold top_p exactly (rounding).

Streaming decodes incrementally (the prefix/read-offset scheme, so multi-byte characters split across tokens
are emitted whole) and holds back any tail that could be the start of a stop string, so a stop string never
reaches the stream.
"""

from __future__ import annotations

import dataclasses
import numbers

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from emma_mamba.models.mamba import MambaCache

__all__ = ["GenerationConfig", "GenerationResult", "generate", "option_logprobs", "prefill_groups", "PREFILL_PAD_WASTE"]


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
"""The seeds a sampling generator takes (a signed 64-bit integer; torch.Generator.manual_seed overflows beyond)."""


@dataclass
class GenerationConfig:
    """How to pick new tokens and when to stop."""

    max_new_tokens: int = 32
    """Upper bound on new tokens per prompt (EOS not counted, since it is not returned)."""
    temperature: float = 0.0
    """0 = greedy (argmax); > 0 samples from softmax(logits / temperature) (below :data:`GREEDY_BELOW`: greedy,
    its limit)."""
    top_k: int = 0
    """Sample among the k most likely tokens only, and those tied with the k-th (0 = no limit)."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches top_p (1 = no limit)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt (when given as ids) or generated (1 = off)."""
    eos_token_id: int | Sequence[int] | None = 0
    """Token id(s) that end a sequence (not included in the output); None = never stop early."""
    stop_strings: Sequence[str] = ()
    """Stop when the generated text contains one of these (needs a tokenizer); the text is cut before it."""
    seed: int | None = None
    """Seed of the sampling generator (None: torch's global RNG)."""
    prefill_chunk: int | None | str = "auto"
    """Prefill long prompts this many positions at a time, the state carried from chunk to chunk (None: whole):
    the same result (to rounding) with the prefill's transient activations bounded by the chunk instead of the
    prompt, for very long prompts (documents, many images). In a batch of prompts of different lengths the first
    chunk also holds the left padding. "auto": :data:`PREFILL_CPU_CHUNK` on the CPU, whole on a GPU."""
    num_return_sequences: int = 1
    """Continuations per prompt (best-of-n, pass@k, self-consistency): each prompt is prefilled once and its
    recurrent state copied into that many rows (a Mamba state is a fixed-size row: forking it costs a copy, not a
    prefill); results are prompt-major (prompt 0's continuations, then prompt 1's, ...)."""
    cuda_graphs: bool = False
    """Replay each decode step from a CUDA graph captured once per batch size (CUDA models only; see
    :mod:`emma_mamba.inference.cuda_graphs`): one launch per token instead of hundreds."""
    compile: bool | str = False
    """Run each decode step through torch.compile (True: Inductor, or a backend's name such as "aot_eager"): one
    graph per step that fuses the norms, casts and gates around the kernels (custom ops inside the graph). The
    first steps compile (again once for a second batch size, which makes the batch dynamic). With
    ``cuda_graphs`` the compiled step is what each CUDA graph captures."""

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            raise ValueError(f"GenerationConfig.max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"GenerationConfig.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"GenerationConfig.repetition_penalty must be > 0 (1 = off), got "
                             f"{self.repetition_penalty!r}")
        c = self.prefill_chunk
        if c is not None and c != "auto" and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"GenerationConfig.prefill_chunk must be a positive integer, None or 'auto', got {c!r}")
        n = self.num_return_sequences
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"GenerationConfig.num_return_sequences must be an integer >= 1, got {n!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not SEED_MIN <= seed <= SEED_MAX):  # what torch.Generator.manual_seed takes
            raise ValueError(f"GenerationConfig.seed must be None or an integer in [{SEED_MIN}, {SEED_MAX}], got "
                             f"{seed!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"GenerationConfig.stop_strings must be non-empty strings, got {self.stop_strings!r}")
        eos = self.eos_token_id
        ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"GenerationConfig.eos_token_id must be None, a token id or a list of ids, got {eos!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"GenerationConfig.cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if isinstance(self.compile, str):
            from emma_mamba.ops._library import require_compile_backend

            require_compile_backend(self.compile, "GenerationConfig.compile (True: inductor)")
        elif not isinstance(self.compile, bool):
            raise ValueError(f"GenerationConfig.compile must be True, False or a backend name, got {self.compile!r}")

    @property
    def eos_ids(self) -> frozenset[int]:
        eos = self.eos_token_id
        return frozenset() if eos is None else frozenset((eos,) if isinstance(eos, int) else eos)

    def with_eos(self, token_id: int) -> "GenerationConfig":
        """This config also ending at ``token_id`` (a tokenizer's EOS), its own EOS ids kept."""
        import dataclasses

        own = self.eos_token_id
        eos = [] if own is None else [own] if isinstance(own, int) else list(own)
        if token_id not in eos:
            eos.append(token_id)
        return dataclasses.replace(self, eos_token_id=eos[0] if len(eos) == 1 else eos)


@dataclass
class GenerationResult:
    sequences: list[list[int]]
    """New token ids per prompt (EOS excluded; tokens through the one completing a stop string included); with
    ``num_return_sequences`` n, n entries per prompt, prompt-major (so are the other per-prompt lists)."""
    texts: list[str] | None
    """Decoded new text per prompt (cut before a stop string), when a tokenizer was given."""
    finish_reasons: list[str]
    """Per prompt: "eos", "stop" (a stop string), or "length" (max_new_tokens)."""
    prompt_lengths: list[int]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    """Batched decode forwards run (each produces one token for every unfinished prompt)."""
    stop_strings_met: list[str | None] = field(default_factory=list)
    """Per prompt: the stop string that ended it (reason "stop"; of several found in the same new text, the one
    that starts first, and of those the longest), else None."""
    final_tokens: list[int | None] = field(default_factory=list)
    """Per prompt: the last token picked (the EOS when the reason is "eos"), which the model has not consumed;
    None when no token was picked (max_new_tokens = 0)."""
    cache: MambaCache | None = None
    """The :class:`~emma_mamba.models.mamba.MambaCache` passed to :func:`generate` (continuation mode), now holding
    the prompt and every new token except ``final_tokens``."""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# prompts


def _is_id(t) -> bool:
    """One token id: a Python or numpy integer, or a 0-d integer tensor / array (not a bool)."""
    if isinstance(t, bool):
        return False
    if isinstance(t, numbers.Integral):
        return True
    if isinstance(t, torch.Tensor) or type(t).__module__ == "numpy":
        t = torch.as_tensor(t)
        return t.dim() == 0 and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    return False


def _no_huge_ids(ids, where: str) -> None:
    """Refuse a Python id beyond int64 (a uint64 from numpy) by name: the tensor conversion's "Overflow when
    unpacking long long" named neither the prompt nor the id."""
    for t in ids:
        if _is_id(t) and not -(1 << 63) <= int(t) < (1 << 63):
            raise ValueError(f"generate: {where} holds token id {int(t)}, outside any embedding (and int64)")


def _id_row(r, i: int) -> torch.Tensor:
    """Prompt ``i`` of a ragged list: a list of ids, or a 1-d integer tensor / array."""
    if isinstance(r, (list, tuple)):
        _no_huge_ids(r, f"input_ids[{i}]")
    try:
        t = torch.as_tensor(r)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is not None and t.dim() == 1 and t.numel() == 0:
        return t.long()  # an empty prompt: refused below as such
    if t is None or t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        got = type(r).__name__ if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
        raise ValueError(f"generate: input_ids[{i}] must be a list (or 1-d tensor) of integer ids, got {got}")
    return t


def _split_prompts(lm, input_ids, inputs_embeds, attention_mask):
    """-> list of (ids (l,) long or None, embeds (l, d) or None), one per prompt, padding removed."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of input_ids and inputs_embeds")
    dev = lm.device

    def masked(rows, what):
        if attention_mask is None:
            return list(rows)
        m = torch.as_tensor(attention_mask)
        if m.dim() != 2 or m.shape[0] != len(rows) or m.shape[1] != rows[0].shape[0]:
            raise ValueError(f"generate: attention_mask must be (batch={len(rows)}, seqlen={rows[0].shape[0]}) "
                             f"like {what}, got {tuple(m.shape)}")
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("generate: attention_mask must hold 0 (padding) and 1 (prompt) only")
        out = []
        for i, r in enumerate(rows):
            keep = m[i].to(torch.bool)
            pos = keep.nonzero().flatten()
            if pos.numel() and int(pos[-1] - pos[0]) + 1 != pos.numel():
                raise ValueError(f"generate: attention_mask row {i} has a hole (a 0 between 1s at position "
                                 f"{int((~keep[pos[0]:pos[-1] + 1]).nonzero()[0]) + int(pos[0])}): it marks left "
                                 f"or right padding, each prompt one run of 1s")
            out.append(r[keep.to(r.device)])
        return out

    if input_ids is not None:
        if type(input_ids).__module__ == "numpy":  # an array as a tensor (a numpy integer scalar is no prompt)
            input_ids = torch.as_tensor(input_ids)
        if isinstance(input_ids, torch.Tensor):
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dim() not in (1, 2):
                raise ValueError(f"generate: input_ids must be an integer tensor (seqlen,) or (batch, seqlen), "
                                 f"got {input_ids.dtype} {tuple(input_ids.shape)}")
            rows = [input_ids] if input_ids.dim() == 1 else list(input_ids)
        elif isinstance(input_ids, (list, tuple)) and not input_ids:
            raise ValueError("generate: input_ids is an empty list: no prompt to continue (give at least one id)")
        elif isinstance(input_ids, (list, tuple)) and all(_is_id(t) for t in input_ids):
            _no_huge_ids(input_ids, "input_ids")
            rows = [torch.tensor([int(t) for t in input_ids])]  # one prompt: ints, numpy ints, 0-d tensors
        elif isinstance(input_ids, (list, tuple)):
            if any(_is_id(t) for t in input_ids):
                raise ValueError("generate: input_ids mixes ids and lists of ids; give one prompt as a list of ids "
                                 "or several as a list of lists")
            rows = [_id_row(r, i) for i, r in enumerate(input_ids)]
        else:
            raise ValueError(f"generate: input_ids must be a tensor, a list of ids or a list of lists of ids, got "
                             f"{type(input_ids).__name__}")
        if attention_mask is not None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            rows = masked(rows, "input_ids")
        elif attention_mask is not None:
            raise ValueError("generate: attention_mask goes with a (batch, seqlen) tensor; ragged lists need none")
        prompts = [(r.to(device=dev, dtype=torch.long).reshape(-1), None) for r in rows]
    else:
        d = lm.config.d_model
        if isinstance(inputs_embeds, torch.Tensor):
            if inputs_embeds.dim() not in (2, 3) or inputs_embeds.shape[-1] != d:
                raise ValueError(f"generate: inputs_embeds must be (seqlen, {d}) or (batch, seqlen, {d}), got "
                                 f"{tuple(inputs_embeds.shape)}")
            rows = [inputs_embeds] if inputs_embeds.dim() == 2 else list(inputs_embeds)
            if attention_mask is not None and inputs_embeds.dim() != 3:
                raise ValueError("generate: attention_mask goes with a (batch, seqlen, d_model) inputs_embeds; a "
                                 "(seqlen, d_model) prompt or a ragged list needs none")
            rows = masked(rows, "inputs_embeds") if attention_mask is not None else rows
        elif isinstance(inputs_embeds, (list, tuple)) and inputs_embeds:
            if attention_mask is not None:
                raise ValueError("generate: attention_mask goes with a (batch, seqlen, d_model) tensor; a ragged "
                                 "list of inputs_embeds needs none")
            rows = list(inputs_embeds)
            for i, r in enumerate(rows):
                if not isinstance(r, torch.Tensor) or r.dim() != 2 or r.shape[-1] != d:
                    raise ValueError(f"generate: inputs_embeds[{i}] must be a (seqlen, {d}) tensor")
        else:
            raise ValueError("generate: inputs_embeds must be a tensor or a list of (seqlen, d_model) tensors")
        prompts = [(None, r.to(dev)) for r in rows]
    for i, (ids, emb) in enumerate(prompts):
        if (ids if ids is not None else emb).shape[0] == 0:
            raise ValueError(f"generate: prompt {i} is empty (after removing padding)")
    return prompts


PREFILL_PAD_WASTE = 0.25
"""A prefill batch may hold up to this fraction more (padded) positions than real prompt tokens."""
PREFILL_CPU_MAX_POSITIONS = 1024
"""On the CPU a padded prefill batch holds at most this many positions (rows x longest prompt): short prompts
batch (8 prompts of 73-108 tokens in one padded forward: 0.99-1.15x the speed of one forward per prompt over
four runs, mamba-130m shapes, 2 threads), long ones do not (8 prompts of 585-620 tokens in one batch: 0.84-0.93x;
the batch's activations no longer stay in the caches). benchmarks/prefill_batching.py measures both. On a GPU,
where one batched forward replaces several launch-bound ones, there is no cap."""


def prefill_groups(lengths: Sequence[int], pad_waste: float = PREFILL_PAD_WASTE,
                   max_positions: int | None = None) -> list[list[int]]:
    """Prompt indices in prefill batches: by increasing length, a batch grows while its padded size (rows x its
    longest prompt) stays within ``1 + pad_waste`` of its real tokens and, if given, ``max_positions``.
    ``pad_waste=0``: one batch per length."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]
        size = (len(groups[-1]) + 1) * n if groups else 0
        if groups and size <= (1 + pad_waste) * (real + n) and (max_positions is None or size <= max_positions):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups


def default_max_positions(device: torch.device) -> int | None:
    return PREFILL_CPU_MAX_POSITIONS if device.type == "cpu" else None


PREFILL_CPU_CHUNK = 1024
"""``prefill_chunk="auto"`` on the CPU: a 16384-token prompt at mamba-130m shapes (2 threads, fp32) prefilled in
16.2 / 15.7 s in chunks of 1024 against 19.8 / 19.4 s whole (two runs), with 68 MiB of peak memory instead of
644 MiB (the chunk's activations stay in the caches); at 4096 tokens 3.91 vs 4.00 s
(benchmarks/prefill_chunk_memory.py). On a GPU a whole prefill is one launch-bound pass: no chunking."""


def resolve_prefill_chunk(chunk: int | None | str, device: torch.device) -> int | None:
    if chunk == "auto":
        return PREFILL_CPU_CHUNK if device.type == "cpu" else None
    return chunk


def _chunks(longest: int, shortest: int, chunk: int | None) -> list[tuple[int, int]]:
    """[start, end) position ranges of a padded prefill of prompts of these lengths: one range without ``chunk``;
    else the first range holds every row's left padding and ``chunk`` of its real positions, the others
    ``chunk`` positions each, so that only the first range has padding (and needs ``seq_idx``)."""
    if chunk is None or longest <= chunk:
        return [(0, longest)]
    first = min(longest, longest - shortest + chunk)
    return [(0, first)] + [(s, min(s + chunk, longest)) for s in range(first, longest, chunk)]


def _prefill(lm, prompts, cache, pad_waste: float = PREFILL_PAD_WASTE, max_positions: int | None | str = "auto",
             chunk: int | None = None):
    """Prefill every prompt into its row of ``cache``; returns the next-token logits (b, padded_vocab) fp32.
    Prompts of different lengths in one batch are left-padded, with ``seq_idx`` restarting the state at each
    prompt (module docstring). ``max_positions="auto"``: :func:`default_max_positions` of the model's device.
    ``chunk``: at most that many positions per forward past the padding (:func:`_chunks`), the states carried."""
    if max_positions == "auto":
        max_positions = default_max_positions(lm.device)
    lengths = [(ids if ids is not None else emb).shape[0] for ids, emb in prompts]
    logits = torch.empty(len(prompts), lm.config.padded_vocab_size, device=lm.device, dtype=torch.float32)
    for rows in prefill_groups(lengths, pad_waste, max_positions):
        sub = lm.allocate_cache(len(rows), dtype=cache.conv_states[0].dtype)
        longest = max(lengths[i] for i in rows)
        seq_idx = None
        if any(lengths[i] != longest for i in rows):
            pos = torch.arange(longest, device=lm.device)
            start = torch.tensor([longest - lengths[i] for i in rows], device=lm.device)
            seq_idx = (pos[None, :] >= start[:, None]).to(torch.int32)  # 0: padding, 1: the prompt

        def padded(x):  # (l, ...) -> (longest, ...), zeros in front
            return x if x.shape[0] == longest else torch.cat([x.new_zeros(longest - x.shape[0], *x.shape[1:]), x])

        ids = prompts[rows[0]][0] is not None
        x = torch.stack([padded(prompts[i][0 if ids else 1]) for i in rows])  # (rows, longest[, d_model])
        for s, e in _chunks(longest, min(lengths[i] for i in rows), chunk):
            sid = seq_idx[:, s:e] if seq_idx is not None and s == 0 else None  # later chunks: no padding
            out = lm(input_ids=x[:, s:e], seq_idx=sid, cache=sub, num_last_tokens=1) if ids else \
                lm(inputs_embeds=x[:, s:e], seq_idx=sid, cache=sub, num_last_tokens=1)
        idx = torch.tensor(rows, device=lm.device)
        logits.index_copy_(0, idx, out.logits[:, -1].float())
        cache.index_copy_(idx, sub)
    cache.seqlen_offset = max(lengths)  # rows differ; nonzero marks the states as live
    return logits


def _continue(lm, prompt, cache, chunk: int | None = None) -> torch.Tensor:
    """Prefill one prompt (ids, embeds) on top of a one-row cache's context (``chunk`` positions at a time); the
    next-token logits (1, V) fp32."""
    ids, emb = prompt
    x = ids if ids is not None else emb
    for s, e in _chunks(x.shape[0], x.shape[0], chunk):
        out = lm(input_ids=x[None, s:e], cache=cache, num_last_tokens=1) if ids is not None else \
            lm(inputs_embeds=x[None, s:e], cache=cache, num_last_tokens=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def option_logprobs(lm, options: Sequence[Sequence[int]], input_ids=None, inputs_embeds=None, attention_mask=None,
                    prefill_chunk: int | None | str = "auto", greedy: bool = False):
    """The log-probability of every option continuing every prompt: ``(n_prompts, n_options)`` fp32, entry
    ``[i, j]`` = log P(``options[j]``'s tokens | prompt i) = the sum of each option token's log-softmax over the
    real vocabulary (the padded rows left out) at its position. With ``greedy=True`` also (same shape, bool)
    whether greedy decoding from prompt i gives option j: every one of its tokens the argmax at its position
    (lm-evaluation-harness' ``is_greedy``); returned as ``(logprobs, greedy)``.

    Closed-set benchmarks (a true/false statement, a lettered choice) score the options' likelihood instead of
    parsing a generated reply (as Prismatic's evaluation does). Prompts are given as for :func:`generate` and
    prefilled once (padded batches, ``seq_idx``, chunked as ``prefill_chunk``); an option of one token reads
    the prefill's next-token distribution, a longer one continues a copy of the prompt's state over its tokens
    but the last (one forward for every prompt at once).
    """
    prompts = _split_prompts(lm, input_ids, inputs_embeds, attention_mask)
    opts = [list(map(int, o)) for o in options]
    vocab = lm.config.vocab_size
    if not opts:
        raise ValueError("option_logprobs: no options")
    for j, o in enumerate(opts):
        if not o:
            raise ValueError(f"option_logprobs: option {j} has no tokens")
        bad = [t for t in o if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"option_logprobs: option {j} holds token ids outside the vocabulary [0, {vocab}): {bad}")
    n = len(prompts)
    cache = lm.allocate_cache(n)
    first = _prefill(lm, prompts, cache, chunk=resolve_prefill_chunk(prefill_chunk, lm.device))
    first = torch.log_softmax(first[:, :vocab].float(), dim=-1)
    out = torch.empty(n, len(opts), dtype=torch.float32, device=lm.device)
    top = torch.empty(n, len(opts), dtype=torch.bool, device=lm.device)
    for j, o in enumerate(opts):
        lp = first[:, o[0]]
        top[:, j] = first.argmax(-1) == o[0]
        if len(o) > 1:  # the rest of the option from a copy of each prompt's state
            rest = torch.tensor(o, device=lm.device).expand(n, -1)
            logits = lm(input_ids=rest[:, :-1], cache=cache.select(list(range(n)))).logits[..., :vocab].float()
            lp = lp + torch.log_softmax(logits, dim=-1).gather(-1, rest[:, 1:, None]).squeeze(-1).sum(-1)
            top[:, j] &= (logits.argmax(-1) == rest[:, 1:]).all(-1)
        out[:, j] = lp
    return (out, top) if greedy else out


# ---------------------------------------------------------------------------------------------------------
# sampling


def _step_logits(lm, tokens: torch.Tensor, cache) -> torch.Tensor:
    """The traced decode step: tokens (b, 1) -> next-token logits (b, padded_vocab), the cache advanced (through
    ``inputs_embeds``: the ids path's range check is for user input, these ids come from the sampler)."""
    return lm(inputs_embeds=lm.embeddings(tokens), cache=cache).logits[:, -1]


_COMPILED_STEPS: dict[str, Callable] = {}


def decode_step(lm, tokens: torch.Tensor, cache, compile: bool | str = False) -> torch.Tensor:
    """One decode step from ``tokens`` (b, 1): the next-token logits (b, padded_vocab); the cache advances.
    The ids are the sampler's (inside the padded vocabulary): they skip ``MambaLM.forward``'s range check of user
    input, whose ``min()`` / ``max()`` would wait for the GPU twice a step.

    ``compile``: through ``torch.compile`` (True: Inductor; or a backend name), one compiled function for every
    model and batch size (Dynamo guards on them). The cache's position counter is held at 0 while the graph
    runs (a decode step does not read it; as a traced constant that changed every token it would recompile
    every token) and advanced here instead.
    """
    if not compile:  # as traced below: through the embedding, no range check (two host syncs a step on a GPU)
        return _step_logits(lm, tokens, cache)
    backend = "inductor" if compile is True else compile
    fn = _COMPILED_STEPS.get(backend)
    if fn is None:
        fn = _COMPILED_STEPS[backend] = torch.compile(_step_logits, fullgraph=True, backend=backend)
    offset = cache.seqlen_offset
    cache.seqlen_offset = 0
    try:
        return fn(lm, tokens, cache)
    finally:
        cache.seqlen_offset = offset + tokens.shape[1]


GREEDY_BELOW = 1e-5
"""A temperature below this samples greedily (the limit of softmax(logits / T) as T -> 0; dividing by a tinier one
overflows to inf and the sampling fails), as vLLM does."""


def output_vocab(lm, tokenizer) -> tuple[int, list[int]]:
    """(n, suppressed): the ids a sampler may pick are those below n and not in ``suppressed``. n is the LM's
    ``vocab_size`` (the embedding's padded rows are not tokens), and with a ``tokenizer`` no more than its size: a
    checkpoint's vocabulary may have rows its tokenizer has no token for (the public Mamba checkpoints' 50280
    against GPT-NeoX's 50277 tokens and the image placeholder), which no text could show; ``suppressed``, the
    tokenizer's :attr:`~emma_mamba.models.tokenizer.Tokenizer.input_only_ids` (the VLM's image placeholder: a
    reply holding it could not be sent back in a conversation, where the placeholder text is reserved)."""
    n = lm.config.vocab_size
    if tokenizer is None:
        return n, []
    try:
        size = len(tokenizer)
    except TypeError:  # a tokenizer-like object without __len__ (e.g. a wrapper forwarding attributes)
        size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        n = min(n, size)
    return n, sorted(i for i in getattr(tokenizer, "input_only_ids", ()) if i < n)


def mask_unpickable(logits: torch.Tensor, vocab_size: int, suppressed: Sequence[int] = ()) -> None:
    """Set, in place, the logits (a, V) of the ids a sampler may not pick to -inf: those from ``vocab_size`` on
    and the ``suppressed`` ones (:func:`output_vocab`)."""
    logits[:, vocab_size:] = float("-inf")
    if suppressed:
        logits[:, list(suppressed)] = float("-inf")


def _pick(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenerationConfig, vocab_size: int,
          generator: torch.Generator | None, suppressed: Sequence[int] = ()) -> torch.Tensor:
    """logits (a, V) fp32 -> next token ids (a,), among the ids below ``vocab_size`` and not ``suppressed``."""
    logits = logits.clone()
    mask_unpickable(logits, vocab_size, suppressed)  # (the padded rows of the embedding are not tokens either)
    if seen is not None:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature < GREEDY_BELOW:  # 0, or so small that logits / temperature would overflow: its limit
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the ones before it already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        drop[:, 0] = False  # also where top_p is below float32's range (1e-300 compares as 0): never an empty set
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------
# text


class _TextTracker:
    """Incremental detokenisation of one sequence, with stop-string detection and a stream-safe boundary."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        self.tok = tokenizer
        self.stops = stop_strings
        self.max_stop = max((len(s) for s in stop_strings), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.emitted = 0
        self.stopped = False
        self.met: str | None = None  # the stop string found

    def push(self, token: int) -> None:
        self.ids.append(token)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        # a trailing U+FFFD means the last token ended inside a multi-byte character: wait for the rest
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stops:
                start = max(0, old_len - self.max_stop + 1)
                hits = [(p, -len(s), s) for p, s in ((self.text.find(s, start), s) for s in self.stops) if p >= 0]
                if hits:
                    pos, _, self.met = min(hits)
                    self.text = self.text[:pos]
                    self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        for n in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def take(self, final: bool) -> str:
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        chunk = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return chunk


class _Sequence:
    """One prompt's decoding: its new tokens, why it ended, its text (stop strings) and its stream. Shared by
    :func:`generate` and the server's batched decoding (:mod:`emma_mamba.inference.batching`)."""

    def __init__(self, cfg: GenerationConfig, tokenizer=None, streamer: Callable[[str], None] | None = None):
        self.cfg, self.eos, self.tokenizer, self.streamer = cfg, cfg.eos_ids, tokenizer, streamer
        self.tokens: list[int] = []
        self.reason = "length"
        self.final: int | None = None
        self.tracker = _TextTracker(tokenizer, cfg.stop_strings) if tokenizer is not None else None

    def push(self, token: int, seen: torch.Tensor | None = None) -> bool:
        """Take the token picked for this prompt (marking it in ``seen``, its repetition-penalty row); returns
        whether decoding goes on."""
        self.final = token
        go_on = False
        if token in self.eos:
            self.reason = "eos"
        else:
            self.tokens.append(token)
            if seen is not None:
                seen[token] = True
            if self.tracker is not None:
                self.tracker.push(token)
                if self.tracker.stopped:
                    self.reason = "stop"
            go_on = self.reason != "stop" and len(self.tokens) < self.cfg.max_new_tokens
        if self.streamer is not None:
            chunk = self.tracker.take(final=not go_on)
            if chunk:
                self.streamer(chunk)
        return go_on

    def text(self) -> str:
        """The answer's text (cut before a stop string); streams what the incremental decode still held back."""
        if self.reason == "stop":
            return self.tracker.text
        full = self.tokenizer.decode(self.tokens)
        tr = self.tracker
        if self.streamer is not None and full.startswith(tr.text) and len(full) > tr.emitted:
            self.streamer(full[tr.emitted:])  # bytes the incremental decode was still waiting on
        return full


# ---------------------------------------------------------------------------------------------------------
# the loop


@torch.inference_mode()
def generate(lm, input_ids=None, inputs_embeds=None, attention_mask=None, config: GenerationConfig | None = None,
             tokenizer=None, streamer: Callable[[str], None] | None = None, cache=None,
             **options) -> GenerationResult:
    """Generate continuations of one or several prompts with ``lm`` (a :class:`~emma_mamba.models.mamba.MambaLM`).

    Prompts: ``input_ids`` as a (seqlen,) or (batch, seqlen) tensor, a list of ids, or a list of lists of ids
    (ragged); or ``inputs_embeds`` as (seqlen, d_model), (batch, seqlen, d_model), or a list of (seqlen_i,
    d_model) tensors (the VLM splices image features into these). ``attention_mask`` (batch, seqlen) marks the
    real positions of a padded tensor (left or right padding): the padding is dropped, never fed to the model.
    ``streamer`` (one prompt only, needs ``tokenizer``) receives the new text as it is produced.

    ``cache`` (continuation, one prompt): a one-row :class:`~emma_mamba.models.mamba.MambaCache` holding an earlier
    context (e.g. the previous turns of a chat, see :class:`emma_mamba.inference.chat.ChatSession`). The prompt is
    prefilled on top of it (chunked prefill: its cost depends on the prompt only, not on the context), the cache
    is advanced in place and returned as ``result.cache``; the last picked token (``result.final_tokens``) is not
    in it. Without ``cache`` every prompt starts from an empty state.

    ``options``: :class:`GenerationConfig` fields (``generate(lm, ids, max_new_tokens=20)``), over ``config``.
    """
    cfg = config if config is not None else GenerationConfig()
    if not isinstance(cfg, GenerationConfig):
        raise TypeError(f"generate: config must be a GenerationConfig, got {type(cfg).__name__}")
    if options:
        names = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"generate: unknown option(s) {unknown}; the GenerationConfig fields are "
                            f"{', '.join(sorted(names))}")
        cfg = dataclasses.replace(cfg, **options)
    if (cfg.stop_strings or streamer is not None) and tokenizer is None:
        raise ValueError("generate: stop_strings and streamer need a tokenizer to turn tokens into text")
    prompts = _split_prompts(lm, input_ids, inputs_embeds, attention_mask)
    n_ret = cfg.num_return_sequences
    B = len(prompts) * n_ret  # rows decoded: every prompt's continuations
    if streamer is not None and B != 1:
        raise ValueError(f"generate: streaming supports a single prompt and one continuation, got {len(prompts)} "
                         f"prompts x {n_ret}")
    prompt_lengths = [(ids if ids is not None else emb).shape[0] for ids, emb in prompts for _ in range(n_ret)]
    if cache is not None:
        from emma_mamba.models.mamba import MambaCache
        if not isinstance(cache, MambaCache):
            raise TypeError(f"generate: cache must be a MambaCache (lm.allocate_cache(1)), got {type(cache).__name__}")
        if B != 1 or cache.batch_size != 1:
            raise ValueError(f"generate: continuing a cache takes one prompt, one continuation and a one-row cache, "
                             f"got {len(prompts)} prompts x {n_ret} and {cache.batch_size} cache rows")
    vocab, suppressed = output_vocab(lm, tokenizer)
    generator = None
    if cfg.seed is not None and cfg.temperature > 0:
        generator = torch.Generator(device=lm.device).manual_seed(cfg.seed)

    seqs = [_Sequence(cfg, tokenizer, streamer) for _ in range(B)]
    result = GenerationResult([q.tokens for q in seqs], None, ["length"] * B, prompt_lengths,
                              stop_strings_met=[None] * B, final_tokens=[None] * B, cache=cache)
    if cfg.max_new_tokens == 0 and cache is None:
        result.texts = [""] * B if tokenizer is not None else None
        return result

    graphs = None
    if cfg.cuda_graphs:
        from emma_mamba.inference.cuda_graphs import decoder_for
        graphs = decoder_for(lm, compile=cfg.compile)  # errors here, before any work, when not on a GPU
    caller_cache = cache
    t0 = time.perf_counter()
    if cache is None:
        cache = lm.allocate_cache(len(prompts))
        logits = _prefill(lm, prompts, cache, chunk=resolve_prefill_chunk(cfg.prefill_chunk, lm.device))
    else:  # chunked prefill on top of the cached context
        logits = _continue(lm, prompts[0], cache, resolve_prefill_chunk(cfg.prefill_chunk, lm.device))
    if n_ret > 1:  # fork: every prompt's state and next-token logits copied into its n rows
        fork = torch.arange(len(prompts), device=lm.device).repeat_interleave(n_ret)
        cache, logits = cache.select(fork), logits.index_select(0, fork)
        prompts = [p for p in prompts for _ in range(n_ret)]
    result.prefill_seconds = time.perf_counter() - t0
    if cfg.max_new_tokens == 0:  # a continued cache: it now holds the prompt, no token is picked
        result.texts = [""] * B if tokenizer is not None else None
        return result

    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=lm.device)
        for i, (ids, _) in enumerate(prompts):
            if ids is not None:
                seen[i, ids] = True

    t1 = time.perf_counter()
    active = list(range(B))  # original prompt index of each cache row (with graphs: of each active row)
    rows = torch.arange(B, device=lm.device)  # the same on the device, updated only when rows finish
    static = graphs.load(cache) if graphs is not None else None  # rows stay put: a finished row keeps stepping
    while True:
        tokens = _pick(logits, seen[rows] if seen is not None else None, cfg, vocab, generator, suppressed)
        keep = [j for j, (i, t) in enumerate(zip(active, tokens.tolist()))
                if seqs[i].push(t, seen[i] if seen is not None else None)]
        if not keep:
            break
        if len(keep) < len(active):
            if static is None:
                cache = cache.select(keep)
            active = [active[j] for j in keep]
            kept = torch.tensor(keep, device=tokens.device)
            tokens, rows = tokens[kept], rows[kept]
        if static is None:
            logits = decode_step(lm, tokens[:, None], cache, cfg.compile).float()
        else:
            fed = static.tokens.new_zeros(B).index_copy_(0, rows, tokens)  # finished rows: any valid id
            logits = graphs.step(static, fed)[rows].float()
        result.decode_steps += 1
    result.decode_seconds = time.perf_counter() - t1
    if static is not None and caller_cache is not None:  # the caller's cache continues from the decoded state
        caller_cache.copy_(static.cache)

    result.finish_reasons = [q.reason for q in seqs]
    result.stop_strings_met = [q.tracker.met if q.tracker is not None else None for q in seqs]
    result.final_tokens = [q.final for q in seqs]
    if tokenizer is not None:
        result.texts = [q.text() for q in seqs]
    return result
