"""The Mamba language model (Mamba-1: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", 2023; and, with ``ssm_layer="mamba2"``, Mamba-2: Dao & Gu, "Transformers are SSMs", 2024, see
:class:`Mamba2Mixer`), its recurrent inference cache, and loading/saving of the public checkpoints.

Architecture (the paper's Figure 3 block, stacked as in mamba-ssm's ``MixerModel``)::

    x_0 = embed(tokens)
    x_i = x_{i-1} + Mixer_i(RMSNorm_i(x_{i-1}))        i = 1..n_layer  (residual stream, fp32 if residual_in_fp32)
    logits = RMSNorm_f(x_n) @ embed.weight^T             (LM head tied to the embedding by default)

    Mixer(h):  x, z = split(in_proj(h))                  (b, l, 2*d_inner)
               x = SiLU(causal_depthwise_conv1d(x))
               dt, B, C = split(x_proj(x))               (dt_rank, d_state, d_state)
               dt = dt_proj.weight @ dt                  (its bias enters the scan as delta_bias, under softplus)
               y = selective_scan(x, dt, A=-exp(A_log), B, C, D, z)   (paper eq. 2 with ZOH-style discretisation,
                                                                       output gated by SiLU(z))
               out = out_proj(y)

Every kernel call goes through :mod:`emma_mamba.ops` (whichever backend is active), never a compiled module
directly. Notable choices:

* Parameter names equal those of both public layouts (``layers.N.mixer.in_proj.weight``, ``conv1d.weight`` of
  shape ``(d_inner, 1, d_conv)``, ``A_log``, ``D``, ...), so checkpoint conversion is a key rename.
* ``A_log`` and ``D`` are created in fp32 whatever the factory dtype (as mamba-ssm does); every small SSM
  parameter is cast to fp32 at use, since the ops take A, D and delta_bias in fp32.
* The in_proj matmul is written ``W @ h^T`` so it lands channels-first ``(b, 2*d_inner, l)``, the layout the
  conv and the scan read, without a transpose copy (mamba-ssm's trick).
* ``seq_idx`` (packed rows) resets both the conv window and the scan state at sequence boundaries.
* Inference: with a :class:`MambaCache`, a forward of length > 1 (prefill) runs the full-sequence ops starting
  from the cached state and leaves the last ``d_conv`` conv inputs and the scan's last state in the cache; a
  forward of length 1 (decode) runs the two single-step ops, so a token costs the same at any context length.
* Vocabulary padded up to a multiple of ``pad_vocab_size_multiple`` (the original checkpoints' 50277 -> 50280);
  the padded logits are never sampled (see :mod:`emma_mamba.inference.generate`).

Checkpoints: :meth:`MambaLM.from_pretrained` reads the original ``state-spaces/mamba-*`` and ``mamba2-*``
layout (config.json with d_model/n_layer/ssm_cfg, ``ssm_cfg.layer`` Mamba1 or Mamba2,
``backbone.embedding.weight``, pytorch_model.bin) and the transformers layouts (MambaConfig / Mamba2Config,
``backbone.embeddings.weight``, safetensors, optionally sharded with ``model.safetensors.index.json``). ``.bin`` files are read with ``torch.load(weights_only=True)``; nothing
in a checkpoint is ever executed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from emma_mamba import ops
from emma_mamba.models.lora import LoRALinear, export_state, has_lora, weight_of
from emma_mamba.ops._inner import gemm_cf, no_weight_grad

if TYPE_CHECKING:
    from emma_mamba.inference.generate import GenerationResult

__all__ = [
    "MambaConfig", "MambaMixer", "Mamba2Mixer", "GatedRMSNorm", "MambaBlock", "MambaLM", "MambaCache", "MambaLMOutput",
    "RMSNorm", "resolve_dtype",
    "CheckpointError", "MAMBA_PRESETS", "load_state_dict_from_dir", "config_from_dir",
]

log = logging.getLogger("emma_mamba.models.mamba")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, unrecognisable, or disagrees with its own config."""


# ---------------------------------------------------------------------------------------------------------
# config


@dataclass
class MambaConfig:
    """Shape and init of a Mamba-1 or Mamba-2 language model (field names follow mamba-ssm's
    ``MambaConfig``/``ssm_cfg``)."""

    d_model: int = 768
    """Width of the residual stream."""
    n_layer: int = 24
    """Number of (RMSNorm -> mixer -> residual) blocks."""
    vocab_size: int = 50277
    """Real vocabulary size (tokens the tokenizer can produce); the embedding holds ``padded_vocab_size`` rows."""
    d_state: int = 16
    """SSM state size N per channel."""
    d_conv: int = 4
    """Width of the causal depthwise convolution (the ops support 2..4)."""
    expand: int = 2
    """d_inner = expand * d_model."""
    dt_rank: int | str = "auto"
    """Rank of the delta projection; "auto" = ceil(d_model / 16)."""
    dt_min: float = 0.001
    """Initial delta is log-uniform in [dt_min, dt_max] (through the inverse-softplus dt_proj bias)."""
    dt_max: float = 0.1
    """See dt_min."""
    dt_init: str = "random"
    """dt_proj weight init: "random" (uniform +-std) or "constant" (std), std = dt_rank**-0.5 * dt_scale."""
    dt_scale: float = 1.0
    """Scale of the dt_proj weight init."""
    dt_init_floor: float = 1e-4
    """Lower clamp of the initial delta."""
    conv_bias: bool = True
    """Bias in the depthwise conv."""
    bias: bool = False
    """Bias in in_proj and out_proj."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    residual_in_fp32: bool = True
    """Keep the residual stream in fp32 when the model runs in fp16/bf16."""
    pad_vocab_size_multiple: int = 8
    """The embedding/LM head rows are vocab_size rounded up to this multiple."""
    tie_embeddings: bool = True
    """LM head shares the embedding matrix."""
    initializer_range: float = 0.02
    """Std of the embedding init (and of the untied LM head)."""
    rescale_prenorm_residual: bool = True
    """Divide out_proj's init by sqrt(n_layer) (GPT-2 scheme, as mamba-ssm does)."""
    ssm_layer: str = "mamba1"
    """The mixer: "mamba1" (the paper's; x_proj / dt_proj, A of shape (d_inner, d_state)) or "mamba2" (Dao & Gu
    2024, "Transformers are SSMs": A and dt one scalar per head of ``headdim`` channels, B and C from in_proj in
    ``ngroups`` groups, a gated RMSNorm before out_proj; :class:`Mamba2Mixer`). Both run on the same ops."""
    headdim: int = 64
    """Mamba-2: channels per head (d_inner must be a multiple of it)."""
    ngroups: int = 1
    """Mamba-2: groups of heads sharing one B and C (must divide the head count)."""

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"MambaConfig.{name} must be {want}, got {getattr(self, name)!r}")

        for name in ("d_model", "n_layer", "vocab_size", "d_state", "expand", "pad_vocab_size_multiple"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "a positive integer")
        if isinstance(self.d_conv, bool) or not isinstance(self.d_conv, int) or not 2 <= self.d_conv <= 4:
            bad("d_conv", "an integer in 2..4 (the conv kernels' supported widths)")
        if self.dt_rank != "auto" and (isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int)
                                       or self.dt_rank < 1):
            bad("dt_rank", '"auto" or a positive integer')
        if self.dt_init not in ("random", "constant"):
            bad("dt_init", '"random" or "constant"')
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"MambaConfig needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", "positive")
        if not self.initializer_range > 0:
            bad("initializer_range", "positive")
        if self.ssm_layer not in ("mamba1", "mamba2"):
            bad("ssm_layer", '"mamba1" or "mamba2"')
        for name in ("headdim", "ngroups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "a positive integer")
        if self.ssm_layer == "mamba2":
            if self.d_inner % self.headdim:
                raise ValueError(f"MambaConfig: a Mamba-2 mixer needs d_inner (expand * d_model = {self.d_inner}) "
                                 f"to be a multiple of headdim {self.headdim}")
            if self.nheads % self.ngroups:
                raise ValueError(f"MambaConfig: ngroups {self.ngroups} must divide the head count "
                                 f"{self.nheads} (d_inner {self.d_inner} / headdim {self.headdim})")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """Mamba-2 heads (d_inner / headdim)."""
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv (and its cached state): x for Mamba-1; x, B and C for Mamba-2."""
        return self.d_inner + (2 * self.ngroups * self.d_state if self.ssm_layer == "mamba2" else 0)

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MambaConfig: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MambaConfig":
        if name not in MAMBA_PRESETS:
            raise ValueError(f"unknown Mamba preset {name!r}; choose one of {', '.join(MAMBA_PRESETS)}")
        return cls(**{**MAMBA_PRESETS[name], **overrides})


MAMBA_PRESETS: dict[str, dict] = {
    # a model for tests and smoke runs: random weights, the real tokenizer's vocabulary
    "tiny": dict(d_model=64, n_layer=2, vocab_size=50277),
    # the public state-spaces/mamba-* shapes
    "mamba-130m": dict(d_model=768, n_layer=24, vocab_size=50277),
    "mamba-370m": dict(d_model=1024, n_layer=48, vocab_size=50277),
    "mamba-790m": dict(d_model=1536, n_layer=48, vocab_size=50277),
    "mamba-1.4b": dict(d_model=2048, n_layer=48, vocab_size=50277),
    "mamba-2.8b": dict(d_model=2560, n_layer=64, vocab_size=50277),
    # the public state-spaces/mamba2-* shapes (mamba-ssm's Mamba2 defaults: d_state 128, headdim 64, 1 group)
    "mamba2-tiny": dict(ssm_layer="mamba2", d_model=64, n_layer=2, d_state=16, headdim=16, vocab_size=50277),
    "mamba2-130m": dict(ssm_layer="mamba2", d_model=768, n_layer=24, d_state=128, vocab_size=50277,
                        pad_vocab_size_multiple=16),
    "mamba2-370m": dict(ssm_layer="mamba2", d_model=1024, n_layer=48, d_state=128, vocab_size=50277,
                        pad_vocab_size_multiple=16),
    "mamba2-780m": dict(ssm_layer="mamba2", d_model=1536, n_layer=48, d_state=128, vocab_size=50277,
                        pad_vocab_size_multiple=16),
    "mamba2-1.3b": dict(ssm_layer="mamba2", d_model=2048, n_layer=48, d_state=128, vocab_size=50277,
                        pad_vocab_size_multiple=16),
    "mamba2-2.7b": dict(ssm_layer="mamba2", d_model=2560, n_layer=64, d_state=128, vocab_size=50277,
                        pad_vocab_size_multiple=16),
}


# ---------------------------------------------------------------------------------------------------------
# inference cache


@dataclass
class MambaCache:
    """Per-layer recurrent state for incremental decoding.

    ``conv_states[i]``: ``(b, conv_dim, d_conv)``, the last d_conv inputs of layer i's conv, oldest first (conv_dim:
    d_inner for Mamba-1, d_inner + 2 * ngroups * d_state for Mamba-2).
    ``ssm_states[i]``: ``(b, d_inner, d_state)`` fp32, the scan state after the last token.
    ``seqlen_offset``: tokens consumed so far (the same for every row); 0 means the states are all zero.
    """

    conv_states: list[torch.Tensor]
    ssm_states: list[torch.Tensor]
    seqlen_offset: int = 0
    # what this cache's last decode step ran with, its inputs checked (MambaLM._decode_step_key): a step with the same
    # key calls the kernels directly
    _checked_step: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # the kernels the decode step now running calls directly (None: through the public ops, checked)
    step_kernels: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.ssm_states[0].shape[0]

    @property
    def n_layer(self) -> int:
        return len(self.ssm_states)

    def select(self, index: torch.Tensor | list[int]) -> "MambaCache":
        """A new cache holding rows ``index`` (e.g. to drop finished sequences)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.ssm_states[0].device)
        return MambaCache([c.index_select(0, index) for c in self.conv_states],
                          [s.index_select(0, index) for s in self.ssm_states], self.seqlen_offset)

    def index_copy_(self, index: torch.Tensor | list[int], other: "MambaCache") -> "MambaCache":
        """Write ``other``'s rows into rows ``index`` of this cache (in place)."""
        if other.n_layer != self.n_layer:
            raise ValueError(f"MambaCache.index_copy_: {other.n_layer} layers into {self.n_layer}")
        index = torch.as_tensor(index, dtype=torch.long, device=self.ssm_states[0].device)
        for mine, theirs in zip(self.conv_states + self.ssm_states, other.conv_states + other.ssm_states):
            mine.index_copy_(0, index, theirs.to(mine.dtype))
        return self

    def copy_(self, other: "MambaCache") -> "MambaCache":
        """Take ``other``'s states (same shapes) and offset, in place: this cache's tensors keep their addresses."""
        for mine, theirs in zip(self.conv_states + self.ssm_states, other.conv_states + other.ssm_states):
            mine.copy_(theirs)
        self.seqlen_offset = other.seqlen_offset
        return self

    def reset(self) -> None:
        for t in self.conv_states + self.ssm_states:
            t.zero_()
        self.seqlen_offset = 0

    @staticmethod
    def cat(caches: Sequence[MambaCache]) -> MambaCache:
        """One cache holding the rows of ``caches`` in order (a batch that sequences join); its offset is the
        largest (rows differ: nonzero marks the states as live)."""
        if not caches:
            raise ValueError("MambaCache.cat: no caches")
        if len({c.n_layer for c in caches}) != 1:
            raise ValueError(f"MambaCache.cat: caches of {sorted({c.n_layer for c in caches})} layers")
        n = caches[0].n_layer
        return MambaCache([torch.cat([c.conv_states[i] for c in caches]) for i in range(n)],
                          [torch.cat([c.ssm_states[i] for c in caches]) for i in range(n)],
                          max(c.seqlen_offset for c in caches))


@dataclass
class MambaLMOutput:
    logits: torch.Tensor
    """(b, l, padded_vocab) (or the last num_last_tokens positions, or (n, padded_vocab) at a logits_mask's n
    positions), in the model's dtype."""
    last_hidden_state: torch.Tensor
    """(b, l, d_model) after the final norm."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """n_layer+1 tensors (b, l, d_model): [0] the input embeddings, [i] the residual stream after block i (not
    normed: ``last_hidden_state`` is the final norm's output). transformers' Mamba differs: its n_layer+1 entries
    are the streams after blocks 1..n_layer (its [i] is our [i+1]), then the final norm's output (our
    ``last_hidden_state``); it has no entry for the embeddings. transformers' Mamba-2 has ours but the last: [0] the
    embeddings, [i] the stream after block i for i < n_layer, then the final norm's output."""
    loss: torch.Tensor | None = None
    """With ``labels``: the mean next-token cross-entropy (fp32) over the labels that are not -100, as
    transformers' causal LMs compute it (position t's logits against labels[t + 1])."""


# a pytree node, so torch.export / torch.compile / FSDP see the tensors inside (as transformers' ModelOutput)
torch.export.register_dataclass(MambaLMOutput, serialized_type_name="emma_mamba.models.mamba.MambaLMOutput")


_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, where: str, auto: torch.dtype | None = None) -> torch.dtype | None:
    """A model dtype given as a torch dtype or a name (``"bf16"``, ``"bfloat16"``, ``"torch.float16"``, as the CLI
    and transformers take it) -> the torch dtype, or None for None. ``"auto"``: ``auto`` (the checkpoint's own,
    where the caller knows it). Anything else, float64 included (the kernels take fp32, bf16 and fp16), is a
    ValueError naming ``where``."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto" and auto is not None:
            return auto
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    names = "a name such as 'bf16' or 'bfloat16'" + (", or 'auto': the checkpoint's own" if auto is not None else "")
    raise ValueError(f"{where}: dtype must be float32, bfloat16 or float16 (a torch dtype, or {names}), got "
                     f"{dtype!r}")


# ---------------------------------------------------------------------------------------------------------
# modules


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in fp32, returned in the weight's dtype."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def param_version(p: torch.Tensor) -> int:
    """p's version counter (moves on every in-place update), or 0 for a tensor created under
    torch.inference_mode (a model built or loaded there), which keeps none."""
    try:
        return p._version
    except RuntimeError:
        return 0


def _init_dt_bias(cfg: MambaConfig, n: int, device) -> torch.Tensor:
    """``n`` delta biases such that softplus(bias) is log-uniform in [dt_min, dt_max], floored at dt_init_floor
    (mamba-ssm's init of Mamba-1's dt_proj bias and Mamba-2's dt_bias)."""
    dt = torch.exp(torch.rand(n, device=device, dtype=torch.float32)
                   * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    dt = dt.clamp(min=cfg.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


def _prefill_conv_state(cache: MambaCache, layer_idx: int, x: torch.Tensor, seq_idx: torch.Tensor | None):
    """Before a prefill of ``x`` (b, conv_dim, l) into ``cache``: the conv's initial states (its last d_conv - 1
    inputs, or None for a fresh cache) and the scan's initial state (or None); then leaves the conv state after
    this chunk in the cache (its last d_conv inputs, oldest first; zeros where l < d_conv on a fresh cache)."""
    conv_state = cache.conv_states[layer_idx]
    conv_init = ssm_init = None
    if cache.seqlen_offset > 0:  # continue from the cached context (chunked prefill)
        conv_init = conv_state[..., 1:].to(x.dtype, copy=True)
        ssm_init = cache.ssm_states[layer_idx].clone()
    b, w = x.shape[0], conv_state.shape[-1]
    window = torch.cat([conv_state.to(x.dtype), x[..., -w:]], dim=-1)[..., -w:]  # (b, conv_dim, d_conv)
    if seq_idx is not None:
        # a packed row continues its *last* sequence: inputs of earlier sequences are not its context
        sid = torch.cat([seq_idx[:, :1].expand(b, w), seq_idx[:, -w:]], dim=1)[:, -w:]
        window = window * (sid == seq_idx[:, -1:])[:, None, :].to(window.dtype)
    conv_state.copy_(window)
    return conv_init, ssm_init


def _conv_step(mixer: nn.Module, x: torch.Tensor, cache: MambaCache) -> torch.Tensor:
    """A mixer's conv decode step (SiLU) on its cached window: the checked op, or the kernels the cache's step
    trusts (``cache.step_kernels``, :meth:`MambaLM._decode_step_key`)."""
    state, kern, w = cache.conv_states[mixer.layer_idx], cache.step_kernels, mixer.conv1d.weight.squeeze(1)
    if kern is None or torch.compiler.is_compiling():  # a compiled block (compile_blocks) traces the custom ops
        return ops.causal_conv1d_update(x, state, w, mixer.conv1d.bias, activation="silu")
    return ops.causal_conv1d_update_unchecked(kern, x, state, w, mixer.conv1d.bias, True)


def _scan_step(mixer: nn.Module, cache: MambaCache, x, dt, A, B, C, D, z, dt_bias) -> torch.Tensor:
    """A mixer's selective-scan decode step (softplus on dt) on its cached state, as :func:`_conv_step` runs."""
    state, kern = cache.ssm_states[mixer.layer_idx], cache.step_kernels
    if kern is None or torch.compiler.is_compiling():
        return ops.selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
    return ops.selective_state_update_unchecked(kern, state, x, dt, A, B, C, D, z, dt_bias, True)


class MambaMixer(nn.Module):
    """The Mamba-1 mixer: in_proj -> causal conv -> SiLU -> selective scan (gated by SiLU(z)) -> out_proj.

    Built on its own (``init_ssm=True``, the default) its SSM parameters take mamba-ssm's init, as
    ``mamba_ssm.Mamba``'s constructor gives them; :class:`MambaLM` builds its blocks with ``init_ssm=False`` and
    initialises every parameter once in :meth:`MambaLM.reset_parameters`. Same for :class:`Mamba2Mixer` and
    :class:`MambaBlock`."""

    def __init__(self, config: MambaConfig, layer_idx: int = 0, device=None, dtype=None, init_ssm: bool = True):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.d_inner = config.d_inner
        self.dt_rank = config.resolved_dt_rank
        di, n, r = self.d_inner, self.d_state, self.dt_rank

        self.in_proj = nn.Linear(config.d_model, 2 * di, bias=config.bias, **fk)
        # an nn.Conv1d only to own a (d_inner, 1, d_conv) weight with the checkpoints' name and PyTorch's init;
        # the forward runs ops.causal_conv1d on it
        self.conv1d = nn.Conv1d(di, di, kernel_size=config.d_conv, groups=di, padding=config.d_conv - 1,
                                bias=config.conv_bias, **fk)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False, **fk)
        self.dt_proj = nn.Linear(r, di, bias=True, **fk)
        self.A_log = nn.Parameter(torch.empty(di, n, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(di, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(di, config.d_model, bias=config.bias, **fk)
        self._init_cfg = config
        # training: recompute the conv output and delta in the backward instead of keeping them (ops.mamba_inner)
        self.recompute_activations = True
        if init_ssm and self.A_log.device.type != "meta":
            self.reset_ssm_parameters()

    def projections(self) -> tuple[nn.Linear, ...]:
        """The mixer's linear layers (initialised by :meth:`MambaLM.reset_parameters`)."""
        return self.in_proj, self.x_proj, self.out_proj

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba-ssm's init of the SSM parameters: S4D-real A, D = 1, and delta in [dt_min, dt_max]."""
        cfg = self._init_cfg
        # S4D-real: A[:, n] = -(n + 1) for every channel, stored as log so A stays negative under training
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5 * cfg.dt_scale
        if cfg.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(_init_dt_bias(cfg, self.d_inner, self.dt_proj.bias.device))

    def _ssm_params(self):
        """A = -exp(A_log) (d_inner, d_state), D and the delta bias, all fp32: computed at every call, as
        mamba-ssm does (a copy kept between no-grad calls, keyed on the parameters' version counters, went stale
        after ``p.data.copy_(...)`` or a ``load_state_dict`` under ``torch.inference_mode``, which move none;
        it saved 2-3 % of a CPU decode step)."""
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()

    def forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None,
                cache: MambaCache | None = None) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model).

        With ``cache``: l == 1 is a decode step from the cached state; l > 1 is a prefill from the cached state
        that leaves this layer's states in the cache.
        """
        if cache is not None and hidden_states.shape[1] == 1:
            return self._step(hidden_states, cache)
        b, l, _ = hidden_states.shape
        A, D, dt_bias = self._ssm_params()

        # (2*d_inner, d_model) @ (b, d_model, l) -> (b, 2*d_inner, l): lands channels-first, the layout of the
        # conv and the scan, with the transpose folded into the GEMM
        # at batch > 1 without a weight gradient x and z come from two GEMMs over the halves of in_proj: each is
        # then contiguous, where the halves of one (b, 2*d_inner, l) result would be copied by the kernels' input
        # checks (with a weight gradient the slices' gradients would each be a full-size zero-padded tensor)
        h_cf, di = hidden_states.transpose(1, 2), self.d_inner
        if isinstance(self.in_proj, LoRALinear):  # frozen W @ h + s B (A h): no gradient GEMM for W
            x, z = self.in_proj.gemm_cf_halves(h_cf)
        else:
            W = self.in_proj.weight
            x, z = (gemm_cf(W[:di], h_cf), gemm_cf(W[di:], h_cf)) if b > 1 and no_weight_grad(W) else \
                gemm_cf(W, h_cf).chunk(2, dim=1)  # (b, d_inner, l) each
        if self.in_proj.bias is not None:
            x, z = x + self.in_proj.bias[:di].to(x.dtype)[:, None], z + self.in_proj.bias[di:].to(z.dtype)[:, None]
        conv_w = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)

        # conv -> x_proj -> dt_proj -> scan -> out_proj as one op; in training its backward recomputes the conv
        # output, delta and the scan output rather than keeping them (three (b, d_inner, l) activations less per
        # layer; ops.mamba_inner)
        if cache is None:
            # a LoRA out_proj runs in activation space (W y + s B A dropout(y)): the op stops at the scan output y
            lora_out = isinstance(self.out_proj, LoRALinear)
            out = ops.mamba_inner(x, z, conv_w, self.conv1d.bias, weight_of(self.x_proj), weight_of(self.dt_proj),
                                  A, D, dt_bias, seq_idx, out_proj_weight=None if lora_out else self.out_proj.weight,
                                  out_proj_bias=None if lora_out else self.out_proj.bias,
                                  recompute=self.recompute_activations)
            return self.out_proj.project_out_cf(out) if lora_out else out

        # prefill into the cache: from the cached states (if any), leaving this chunk's last ones
        conv_init, ssm_init = _prefill_conv_state(cache, self.layer_idx, x, seq_idx)
        out, last_state = ops.mamba_inner(x, z, conv_w, self.conv1d.bias, weight_of(self.x_proj),
                                          weight_of(self.dt_proj), A, D, dt_bias, seq_idx,
                                          out_proj_weight=weight_of(self.out_proj), out_proj_bias=self.out_proj.bias,
                                          conv_initial_states=conv_init, initial_state=ssm_init,
                                          return_last_state=True)
        cache.ssm_states[self.layer_idx].copy_(last_state)
        return out

    def _step(self, hidden_states: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One decode step: (b, 1, d_model) -> (b, 1, d_model), advancing this layer's cached states."""
        n, r = self.d_state, self.dt_rank
        A, D, dt_bias = self._ssm_params()
        # weights cast to the activations' dtype as the full forward's kernels cast them (a LoRA projection's merged
        # weight is fp32 over a bf16 base; a no-op for a plain one)
        h = hidden_states[:, 0]
        xz = F.linear(h, weight_of(self.in_proj).to(h.dtype), self.in_proj.bias)  # (b, 2*d_inner)
        x, z = xz.chunk(2, dim=-1)
        x = _conv_step(self, x, cache)  # (b, d_inner)
        dt, B, C = torch.split(F.linear(x, weight_of(self.x_proj).to(x.dtype)), [r, n, n], dim=-1)
        dt = F.linear(dt, weight_of(self.dt_proj).to(dt.dtype))  # (b, d_inner); its bias goes in as dt_bias
        y = _scan_step(self, cache, x, dt, A, B, C, D, z, dt_bias)
        return F.linear(y, weight_of(self.out_proj).to(y.dtype), self.out_proj.bias)[:, None]


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(y * SiLU(z)) over groups of ``group_size`` channels (mamba-ssm's
    ``RMSNormGated`` with norm_before_gate=False, one group per B/C group), computed in fp32."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., d) -> (..., d) in y's dtype."""
        g = y.float() * F.silu(z.float())
        g = g.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (g * self.weight.float()).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs", mamba-ssm's ``Mamba2``), run on the selective
    scan of :mod:`emma_mamba.ops`::

        z, xBC, dt = split(in_proj(h))                   (d_inner, d_inner + 2*ngroups*d_state, nheads)
        x, B, C = split(SiLU(causal_depthwise_conv1d(xBC)))
        y = SSM(x, dt, A, B, C, D)                       per head: scalar A_h = -exp(A_log_h), dt_h, D_h
        out = out_proj(GatedRMSNorm(y, z))

    Mamba-2's SSM is the selective scan with its per-head scalars repeated over the head's ``headdim``
    channels (A_h over the d_state columns too) and channel c = h * headdim + j reading B/C group
    c // (d_inner / ngroups), the ops' group layout: so every backend (CUDA, Triton, CPU, reference) runs it,
    packing (seq_idx), chunked prefill and the decode step included. mamba-ssm computes the same recurrence
    with its chunked SSD matmuls; here the state is expanded per channel as for Mamba-1 (d_inner x d_state
    per row, its cached state in Mamba-2's own layout (b, nheads * headdim, d_state)), which is exact but
    does d_state / 16 times Mamba-1's scan work per channel on a GPU, where SSD's tensor-core chunks are faster.
    Parameter names and shapes are those of both public layouts (``in_proj``, ``conv1d`` over x, B and C,
    ``dt_bias``, ``A_log`` and ``D`` per head, ``norm.weight``, ``out_proj``).
    """

    def __init__(self, config: MambaConfig, layer_idx: int = 0, device=None, dtype=None, init_ssm: bool = True):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.layer_idx = layer_idx
        self.d_model, self.d_state, self.d_conv = config.d_model, config.d_state, config.d_conv
        self.d_inner, self.headdim, self.ngroups = config.d_inner, config.headdim, config.ngroups
        self.nheads, self.conv_dim = config.nheads, config.conv_dim
        di, h = self.d_inner, self.nheads
        self.in_proj = nn.Linear(config.d_model, di + self.conv_dim + h, bias=config.bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=config.d_conv, groups=self.conv_dim,
                                padding=config.d_conv - 1, bias=config.conv_bias, **fk)
        self.dt_bias = nn.Parameter(torch.empty(h, device=device, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(h, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(h, device=device, dtype=torch.float32))
        self.norm = GatedRMSNorm(di, di // self.ngroups, eps=config.rms_norm_eps, **fk)
        self.out_proj = nn.Linear(di, config.d_model, bias=config.bias, **fk)
        self._init_cfg = config
        if init_ssm and self.A_log.device.type != "meta":
            self.reset_ssm_parameters()

    def projections(self) -> tuple[nn.Linear, ...]:
        return self.in_proj, self.out_proj

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """mamba-ssm's Mamba2 init: A_h uniform in [1, 16] (stored as log), D = 1, delta in [dt_min, dt_max],
        the gated norm's weight 1."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.D.fill_(1.0)
        self.dt_bias.copy_(_init_dt_bias(self._init_cfg, self.nheads, self.dt_bias.device))
        self.norm.weight.fill_(1.0)

    def _ssm_params(self):
        """The per-head A, D and dt bias repeated to the scan's per-channel (d_inner, d_state), (d_inner,),
        (d_inner,), fp32, computed at every call (see :meth:`MambaMixer._ssm_params`)."""
        p, n = self.headdim, self.d_state
        A = (-torch.exp(self.A_log.float())).repeat_interleave(p)[:, None].expand(-1, n).contiguous()
        return A, self.D.float().repeat_interleave(p), self.dt_bias.float().repeat_interleave(p)

    def _split_xbc(self, xbc: torch.Tensor):
        """x (b, d_inner, ...), B and C (b, ngroups, d_state, ...) of the conv output (b, conv_dim, ...)."""
        di, gn = self.d_inner, self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [di, gn, gn], dim=1)
        return x, B.unflatten(1, (self.ngroups, self.d_state)), C.unflatten(1, (self.ngroups, self.d_state))

    def forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None,
                cache: MambaCache | None = None) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model); ``cache`` as in :meth:`MambaMixer.forward`."""
        if cache is not None and hidden_states.shape[1] == 1:
            return self._step(hidden_states, cache)
        A, D, dt_bias = self._ssm_params()
        z, xbc, dt = torch.split(self.in_proj(hidden_states), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = xbc.transpose(1, 2)  # (b, conv_dim, l), channels-first for the conv
        conv_init = ssm_init = None
        if cache is not None:
            conv_init, ssm_init = _prefill_conv_state(cache, self.layer_idx, xbc, seq_idx)
        xbc = ops.causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                initial_states=conv_init, seq_idx=seq_idx)
        x, B, C = self._split_xbc(xbc)  # (b, d_inner, l), (b, g, n, l) x 2
        delta = dt.transpose(1, 2).repeat_interleave(self.headdim, dim=1)  # (b, nheads, l) -> (b, d_inner, l)
        y = ops.selective_scan(x, delta, A, B, C, D, delta_bias=dt_bias, delta_softplus=True,
                               return_last_state=cache is not None, initial_state=ssm_init, seq_idx=seq_idx)
        if cache is not None:
            y, last_state = y
            cache.ssm_states[self.layer_idx].copy_(last_state)
        return self.out_proj(self.norm(y.transpose(1, 2), z))

    def _step(self, hidden_states: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One decode step: (b, 1, d_model) -> (b, 1, d_model), advancing this layer's cached states."""
        A, D, dt_bias = self._ssm_params()
        z, xbc, dt = torch.split(self.in_proj(hidden_states[:, 0]), [self.d_inner, self.conv_dim, self.nheads],
                                 dim=-1)
        xbc = _conv_step(self, xbc, cache)  # (b, conv_dim)
        x, B, C = self._split_xbc(xbc)  # (b, d_inner), (b, g, n) x 2
        y = _scan_step(self, cache, x, dt.repeat_interleave(self.headdim, dim=-1), A, B, C, D, None, dt_bias)
        return self.out_proj(self.norm(y, z))[:, None]


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + Mixer(RMSNorm(x)), the residual kept in fp32 if ``residual_in_fp32``."""

    def __init__(self, config: MambaConfig, layer_idx: int, device=None, dtype=None, init_ssm: bool = True):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, device=device, dtype=dtype)
        mixer = Mamba2Mixer if config.ssm_layer == "mamba2" else MambaMixer
        self.mixer = mixer(config, layer_idx=layer_idx, device=device, dtype=dtype, init_ssm=init_ssm)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None,
                cache: MambaCache | None = None) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x), seq_idx=seq_idx, cache=cache)


class MambaLM(nn.Module):
    """Mamba language model: embedding, ``n_layer`` :class:`MambaBlock` (Mamba-1 or Mamba-2 mixers), final RMSNorm,
    (tied) LM head."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"MambaLM expects a MambaConfig, got {type(config).__name__}")
        self.config = config
        V = config.padded_vocab_size
        self.embeddings = nn.Embedding(V, config.d_model, device=device, dtype=dtype)
        # the blocks' SSM parameters are initialised by reset_parameters() below (or loaded), not twice
        self.layers = nn.ModuleList(MambaBlock(config, i, device=device, dtype=dtype, init_ssm=False)
                                    for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, V, bias=False,
                                                                   device=device, dtype=dtype)
        self.gradient_checkpointing = False
        self.checkpoint_layout: str | None = None  # "original" or "hf" when loaded by from_pretrained
        if self.embeddings.weight.device.type != "meta":
            self.reset_parameters()

    # -- init -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba-ssm's init (``_init_weights`` of MixerModel plus the mixer's own SSM init)."""
        cfg = self.config
        nn.init.normal_(self.embeddings.weight, std=cfg.initializer_range)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range)
        for block in self.layers:
            block.norm.weight.fill_(1.0)
            m = block.mixer
            for lin in m.projections():
                lin.reset_parameters()
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            m.conv1d.reset_parameters()
            m.reset_ssm_parameters()
            if cfg.rescale_prenorm_residual:
                # GPT-2 scheme: each block adds one residual branch, so scale by 1/sqrt(n_layer)
                nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
                m.out_proj.weight.div_(math.sqrt(cfg.n_layer))
        self.norm_f.weight.fill_(1.0)

    # -- API ----------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only; ignored with a cache)."""
        self.gradient_checkpointing = bool(enabled)

    def set_mixer_recompute(self, enabled: bool = True) -> None:
        """Whether each mixer's backward recomputes its conv output, delta and scan output (default) rather than
        keeping them from the forward (:func:`emma_mamba.ops.mamba_inner`): three (b, d_inner, l) activations less
        per layer for one more depthwise conv and a rank-dt_rank GEMM. Gradients are the same up to rounding."""
        for block in self.layers:
            if isinstance(block.mixer, MambaMixer):  # (Mamba-1's fused op; a Mamba-2 mixer keeps its activations)
                block.mixer.recompute_activations = bool(enabled)

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None, mixer_only: bool = False) -> None:
        """torch.compile each block in place (``nn.Module.compile``: parameter names, state dicts and checkpoints
        stay as they are), each as one graph (fullgraph) with the kernels inside as custom ops
        (:mod:`emma_mamba.ops._library`). All blocks share the compiled code: their graphs differ only in the
        parameters, which are graph inputs. ``mixer_only``: compile each block's mixer and leave the block's
        own call (norm, residual, and the hooks FSDP puts on it) eager."""
        for block in self.layers:
            (block.mixer if mixer_only else block).compile(fullgraph=True, backend=backend, mode=mode)

    def allocate_cache(self, batch_size: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> MambaCache:
        """Zero states for ``batch_size`` sequences. ``dtype`` is the conv state's (default fp32); the SSM state
        is always fp32 (the scan accumulates in fp32 and takes its initial state in fp32)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"allocate_cache: batch_size must be a positive integer, got {batch_size!r}")
        cfg = self.config
        device = self.device if device is None else torch.device(device)
        conv_dtype = torch.float32 if dtype is None else dtype
        conv = [torch.zeros(batch_size, cfg.conv_dim, cfg.d_conv, device=device, dtype=conv_dtype)
                for _ in range(cfg.n_layer)]
        ssm = [torch.zeros(batch_size, cfg.d_inner, cfg.d_state, device=device, dtype=torch.float32)
               for _ in range(cfg.n_layer)]
        return MambaCache(conv, ssm, 0)

    def _check_inputs(self, input_ids, inputs_embeds, seq_idx, cache):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MambaLM.forward: pass exactly one of input_ids and inputs_embeds")
        V = self.config.padded_vocab_size
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
                raise ValueError(f"MambaLM.forward: input_ids must be an integer tensor (batch, seqlen), got "
                                 f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
            b, l = input_ids.shape
            if torch.compiler.is_compiling():  # no host sync inside a graph: an assert op checks the ids
                # ... except with gradient checkpointing: AOTAutograd's partitioner of torch 2.11 refuses any
                # impure op in a graph it recomputes parts of ("Trying to apply AC on a graph with impure op";
                # 2.15 accepts it); there the embedding lookup's own bounds check is what fails
                if not self.gradient_checkpointing:
                    torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(),
                                        f"MambaLM.forward: a token id is outside the embedding [0, {V})")
            elif input_ids.numel():
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= V:
                    raise ValueError(f"MambaLM.forward: token id {hi if hi >= V else lo} is outside the embedding "
                                     f"[0, {V}) (vocab_size={self.config.vocab_size}, padded to {V})")
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                    or inputs_embeds.shape[-1] != self.config.d_model:
                raise ValueError(f"MambaLM.forward: inputs_embeds must be (batch, seqlen, d_model="
                                 f"{self.config.d_model}), got "
                                 f"{tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__}")
            b, l = inputs_embeds.shape[:2]
        if l == 0:
            raise ValueError("MambaLM.forward: the sequence is empty (seqlen 0)")
        if seq_idx is not None:
            if not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != (b, l) or seq_idx.is_floating_point():
                raise ValueError(f"MambaLM.forward: seq_idx must be an integer tensor of shape ({b}, {l}), got "
                                 f"{tuple(seq_idx.shape) if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__}")
            seq_idx = seq_idx.to(torch.int32)
        if cache is not None:
            if not isinstance(cache, MambaCache):
                raise TypeError(f"MambaLM.forward: cache must be a MambaCache (see allocate_cache), got "
                                f"{type(cache).__name__}")
            if cache.batch_size != b or cache.n_layer != self.config.n_layer:
                raise ValueError(f"MambaLM.forward: the cache holds {cache.batch_size} rows x {cache.n_layer} layers, "
                                 f"the input has {b} rows and the model {self.config.n_layer} layers")
        return seq_idx

    def _decode_step_key(self, cache: MambaCache, x: torch.Tensor) -> tuple | None:
        """What a decode step on ``cache`` runs with: the first step on a cache goes through the public ops, whose
        checks then hold for its later steps with the same key (this model, the kernels, the activations' and the
        states' dtypes, autocast's dtype; the inputs are built the same way each step): those call the kernels
        directly (:func:`ops.step_kernels`, ~20 us less per op and layer on a CPU). None: through the public ops
        (grad mode, torch.compile, the torch reference, an empty batch, or states not of this model's shapes)."""
        kern = ops.step_kernels(x.device)
        cfg = self.config
        ssm, conv = cache.ssm_states[0], cache.conv_states[0]
        if kern is None or not ssm.shape[0] or ssm.shape[1:] != (cfg.d_inner, cfg.d_state) \
                or conv.shape[1:] != (cfg.conv_dim, cfg.d_conv):
            return None
        dev = x.device.type
        return (id(self), kern, x.dtype, ssm.dtype, conv.dtype, ssm.device,
                torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev))

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, cache: MambaCache | None = None,
                output_hidden_states: bool = False, num_last_tokens: int = 0,
                labels: torch.Tensor | None = None, logits_mask: torch.Tensor | None = None) -> MambaLMOutput:
        """input_ids (b, l) or inputs_embeds (b, l, d_model) -> :class:`MambaLMOutput`.

        seq_idx: int (b, l), nondecreasing per row: packed sequences that must not see each other.
        cache: a :class:`MambaCache` to prefill (l > 1) or advance by one token (l == 1); it is updated in place.
        num_last_tokens: if > 0, logits only for the last that many positions (saves the (l, vocab) matmul).
        logits_mask: a (b, l) bool tensor: logits only at its True positions, as ``(n_true, vocab)`` in row-major
        order (``logits[mask]`` of the full logits; training takes the labelled positions only: the head's matmul,
        its backward and the (b, l, vocab) gradient of the others are not computed).
        labels: (b, l) token ids, -100 where no loss is wanted (typically ``input_ids``): ``output.loss`` is the
        next-token cross-entropy, shifted inside as transformers does. There is no ``attention_mask``: right
        padding needs labels of -100 there, packing needs ``seq_idx``.
        """
        seq_idx = self._check_inputs(input_ids, inputs_embeds, seq_idx, cache)
        if labels is not None:
            want = tuple((input_ids if inputs_embeds is None else inputs_embeds).shape[:2])
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != want or labels.is_floating_point():
                raise ValueError(f"MambaLM.forward: labels must be integer token ids of the inputs' shape {want}, "
                                 f"got {getattr(labels, 'dtype', type(labels).__name__)} "
                                 f"{tuple(getattr(labels, 'shape', ()))}")
            if num_last_tokens or logits_mask is not None:
                raise ValueError("MambaLM.forward: labels need the logits of every position; num_last_tokens "
                                 "must be 0 and logits_mask None")
        if logits_mask is not None:
            want = tuple((input_ids if inputs_embeds is None else inputs_embeds).shape[:2])
            if not isinstance(logits_mask, torch.Tensor) or logits_mask.dtype != torch.bool \
                    or tuple(logits_mask.shape) != want:
                raise ValueError(f"MambaLM.forward: logits_mask must be a bool tensor of the inputs' shape {want}, "
                                 f"got {getattr(logits_mask, 'dtype', type(logits_mask).__name__)} "
                                 f"{tuple(getattr(logits_mask, 'shape', ()))}")
            if num_last_tokens:
                raise ValueError("MambaLM.forward: give num_last_tokens or logits_mask, not both")
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if x.shape[1] == 1:
            seq_idx = None  # one token cannot cross a boundary
        step_key = self._decode_step_key(cache, x) if cache is not None and x.shape[1] == 1 else None
        if cache is not None:
            cache.step_kernels = step_key[1] if step_key is not None and cache._checked_step == step_key else None
        hidden = [x] if output_hidden_states else None
        use_ckpt = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.layers:
            if use_ckpt:
                x = checkpoint(block, x, seq_idx, None, use_reentrant=False)
            else:
                x = block(x, seq_idx=seq_idx, cache=cache)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.seqlen_offset += x.shape[1]
            cache._checked_step, cache.step_kernels = step_key, None
        h = self.norm_f(x)
        hl = h[logits_mask] if logits_mask is not None else h[:, -num_last_tokens:] if num_last_tokens > 0 else h
        weight = self.embeddings.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hl, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return MambaLMOutput(logits=logits, last_hidden_state=h,
                             hidden_states=tuple(hidden) if hidden is not None else None, loss=loss)

    def generate(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, tokenizer=None, streamer=None,
                 cache=None, config=None, **options) -> GenerationResult:
        """:func:`emma_mamba.inference.generate.generate` on this model: ``options`` are
        :class:`~emma_mamba.inference.generate.GenerationConfig` fields (``max_new_tokens``, ``temperature``,
        ``top_p``, ``eos_token_id``, ...), over ``config`` if one is given. Returns its ``GenerationResult``: the new
        tokens of each prompt (``.sequences``, lists, without the prompt, unlike transformers' tensor), ``.texts``
        with a tokenizer, the stop reasons."""
        from emma_mamba.inference.generate import generate

        return generate(self, input_ids, inputs_embeds, attention_mask, config, tokenizer, streamer, cache,
                        **options)

    # -- checkpoints -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "MambaLM":
        """Load a checkpoint directory in either public layout (state-spaces original, or transformers *-hf).

        dtype: None loads float32 (whatever the checkpoint stores, as mamba-ssm; transformers v5 keeps the
        checkpoint's), ``"auto"`` the checkpoint's own dtype, else a torch dtype or its name (``"bf16"``); A_log
        and D stay fp32 in any case.
        """
        config, state_dict, layout, renamed_from = _load_dir(path)
        floats = [v for v in state_dict.values() if v.is_floating_point()]
        if not floats:  # nothing to load: named by the tensors the config needs (an empty or int-only file)
            _check_state_dict(state_dict, cls(config, device="meta").state_dict(), Path(path), layout, renamed_from)
        stored = max(floats, key=torch.Tensor.numel).dtype
        dtype = resolve_dtype(dtype, "MambaLM.from_pretrained", auto=stored) or torch.float32
        model = cls(config, device="meta", dtype=dtype)
        expected = model.state_dict()
        _check_state_dict(state_dict, expected, Path(path), layout, renamed_from)
        device = torch.device("cpu") if device is None else torch.device(device)
        sd = {k: v.to(device=device, dtype=expected[k].dtype) for k, v in state_dict.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.checkpoint_layout = layout
        log.info("loaded %s-layout Mamba checkpoint %s (%d layers, d_model %d)", layout, path,
                 config.n_layer, config.d_model)
        return model

    def save_pretrained(self, path: str | os.PathLike, layout: str = "hf",
                        max_shard_size: int | None = None) -> Path:
        """Write config.json and the weights in ``layout`` "hf" (transformers MambaForCausalLM, or
        Mamba2ForCausalLM for a Mamba-2 LM: safetensors, sharded with an index when ``max_shard_size`` bytes is
        exceeded) or "original" (state-spaces: pytorch_model.bin). Returns the directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        own = {k: v.detach() for k, v in self.state_dict().items()}
        if has_lora(self):  # a plain model holding W + s B A (as a training run writes it), never bare adapters
            own, _ = export_state(self, own)
        if layout == "hf":
            _save_hf(self.config, own, out, max_shard_size)
        elif layout == "original":
            if max_shard_size is not None:
                raise ValueError("save_pretrained: max_shard_size applies to layout='hf' only")
            _save_original(self.config, own, out)
        else:
            raise ValueError(f"save_pretrained: layout must be 'hf' or 'original', got {layout!r}")
        return out


# ---------------------------------------------------------------------------------------------------------
# checkpoint layouts


def _bool(v, where):
    if not isinstance(v, bool):
        raise CheckpointError(f"{where} must be true or false, got {v!r}")
    return v


def _config_from_original(d: dict, where: str) -> MambaConfig:
    """state-spaces/mamba config.json (mamba_ssm.models.config_mamba.MambaConfig) -> MambaConfig."""
    for key in ("d_model", "n_layer", "vocab_size"):
        if key not in d:
            raise CheckpointError(f"{where}: missing field {key!r} of the state-spaces layout")
    ssm = dict(d.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"{where}: ssm_cfg.layer={layer!r}; Mamba1 and Mamba2 checkpoints are supported")
    if d.get("d_intermediate", 0):
        raise CheckpointError(f"{where}: d_intermediate={d['d_intermediate']} (MLP blocks) is not supported")
    if d.get("attn_layer_idx"):
        raise CheckpointError(f"{where}: attn_layer_idx={d['attn_layer_idx']} (hybrid attention) is not supported")
    if not d.get("rms_norm", True):
        raise CheckpointError(f"{where}: rms_norm=false (LayerNorm blocks) is not supported")
    ssm.pop("use_fast_path", None)
    ssm_map = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "dt_rank": "dt_rank",
               "dt_min": "dt_min", "dt_max": "dt_max", "dt_init": "dt_init", "dt_scale": "dt_scale",
               "dt_init_floor": "dt_init_floor", "conv_bias": "conv_bias", "bias": "bias"}
    if layer == "Mamba2":
        _check_mamba2_options(ssm, where, d_inner=d.get("d_model", 0) * ssm.get("expand", 2))
        ssm_map = {k: k for k in ("d_state", "d_conv", "expand", "headdim", "ngroups", "dt_min", "dt_max",
                                  "dt_init_floor", "conv_bias", "bias")}
        ssm = {"d_state": 128, **ssm}  # mamba-ssm's Mamba2 default (Mamba-1's is 16)
    unknown = sorted(set(ssm) - set(ssm_map))
    if unknown:
        raise CheckpointError(f"{where}: unsupported ssm_cfg field(s) {', '.join(unknown)} for {layer}")
    kw = {ssm_map[k]: v for k, v in ssm.items()}
    if layer == "Mamba2":
        kw["ssm_layer"] = "mamba2"
    known_top = {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                 "pad_vocab_size_multiple", "tie_embeddings", "d_intermediate", "attn_layer_idx", "attn_cfg",
                 "norm_epsilon"}
    ignored = sorted(set(d) - known_top)
    if ignored:
        log.warning("%s: ignoring unknown config field(s) %s", where, ", ".join(ignored))
    try:
        return MambaConfig(
            d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"],
            residual_in_fp32=_bool(d.get("residual_in_fp32", True), f"{where}: residual_in_fp32"),
            pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
            tie_embeddings=_bool(d.get("tie_embeddings", True), f"{where}: tie_embeddings"),
            rms_norm_eps=d.get("norm_epsilon", 1e-5), **kw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _check_mamba2_options(ssm: dict, where: str, d_inner: int) -> None:
    """Pops the Mamba2 ssm_cfg options that only steer mamba-ssm's init or kernels, and refuses those that change
    the model into one :class:`Mamba2Mixer` does not compute (naming the field). ``d_inner``: expand * d_model."""
    for k in ("A_init_range", "conv_init", "chunk_size", "use_mem_eff_path"):  # init / kernel tiling only
        ssm.pop(k, None)
    need = {"rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False}
    for k, want in need.items():
        if k in ssm and ssm.pop(k) != want:
            raise CheckpointError(f"{where}: ssm_cfg.{k} must be {str(want).lower()} (the public Mamba-2 models' "
                                  f"setting; the other is not supported)")
    d_ssm = ssm.pop("d_ssm", None)
    if d_ssm is not None and d_ssm != d_inner:  # (d_ssm = d_inner is mamba-ssm's default, the same model)
        raise CheckpointError(f"{where}: ssm_cfg.d_ssm={d_ssm} (an SSM narrower than d_inner={d_inner}, with a gated "
                              f"MLP beside it) is not supported")
    limit = ssm.pop("dt_limit", None)
    if limit is not None and _float_pair(limit, f"{where}: ssm_cfg.dt_limit") != (0.0, math.inf):
        raise CheckpointError(f"{where}: ssm_cfg.dt_limit={limit} clamps delta; only the default (0, inf) is "
                              f"supported")


def _float_pair(v, where: str) -> tuple[float, float]:
    """A JSON pair of numbers, infinity written as a number, a string, or transformers' {"__float__": "Infinity"}."""
    def num(x):
        if isinstance(x, dict) and set(x) == {"__float__"}:
            x = x["__float__"]
        try:
            return float(x)
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: expected two numbers, got {v!r}") from None
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise CheckpointError(f"{where}: expected two numbers, got {v!r}")
    return num(v[0]), num(v[1])


def _config_from_hf(d: dict, where: str) -> MambaConfig:
    """transformers MambaConfig config.json -> MambaConfig (vocabulary not padded further: the *-hf
    checkpoints store the already padded embedding and call its size vocab_size)."""
    mt = d.get("model_type", "mamba")
    if mt == "mamba2":
        return _config_from_hf2(d, where)
    if mt != "mamba":
        raise CheckpointError(f"{where}: model_type={mt!r}; transformers' 'mamba' and 'mamba2' are supported")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key not in d:
            raise CheckpointError(f"{where}: missing field {key!r} of the transformers MambaConfig")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={d['hidden_act']!r}; the mixer supports 'silu' only")
    expand = d.get("expand", 2)
    if "intermediate_size" in d and d["intermediate_size"] != expand * d["hidden_size"]:
        raise CheckpointError(f"{where}: intermediate_size={d['intermediate_size']} but expand * hidden_size = "
                              f"{expand * d['hidden_size']}")
    try:
        return MambaConfig(
            **_hf_common(d, where), d_state=d.get("state_size", 16), expand=expand,
            dt_rank=d.get("time_step_rank", "auto"), dt_scale=d.get("time_step_scale", 1.0),
            dt_init=d.get("time_step_init_scheme", "random"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _hf_common(d: dict, where: str, tie_default: bool = True) -> dict:
    """The MambaConfig fields that transformers' MambaConfig and Mamba2Config spell alike (the vocabulary not
    padded further: the transformers layouts store the padded embedding and call its size vocab_size).
    ``tie_default``: the class's default of tie_word_embeddings (MambaConfig true, Mamba2Config false)."""
    return dict(
        d_model=d["hidden_size"], n_layer=d["num_hidden_layers"], vocab_size=d["vocab_size"],
        d_conv=d.get("conv_kernel", 4), dt_min=d.get("time_step_min", 0.001), dt_max=d.get("time_step_max", 0.1),
        dt_init_floor=d.get("time_step_floor", 1e-4),
        conv_bias=_bool(d.get("use_conv_bias", True), f"{where}: use_conv_bias"),
        bias=_bool(d.get("use_bias", False), f"{where}: use_bias"), rms_norm_eps=d.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=_bool(d.get("residual_in_fp32", True), f"{where}: residual_in_fp32"),
        tie_embeddings=_bool(d.get("tie_word_embeddings", tie_default), f"{where}: tie_word_embeddings"),
        pad_vocab_size_multiple=1)


def _config_from_hf2(d: dict, where: str) -> MambaConfig:
    """transformers Mamba2Config config.json -> MambaConfig (vocab_size is the stored embedding's rows)."""
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "head_dim"):
        if key not in d:
            raise CheckpointError(f"{where}: missing field {key!r} of the transformers Mamba2Config")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={d['hidden_act']!r}; the mixer supports 'silu' only")
    if not _bool(d.get("rms_norm", True), f"{where}: rms_norm"):
        raise CheckpointError(f"{where}: rms_norm=false (no gated norm) is not supported")
    if "time_step_limit" in d and _float_pair(d["time_step_limit"], f"{where}: time_step_limit") != (0.0, math.inf):
        raise CheckpointError(f"{where}: time_step_limit={d['time_step_limit']} clamps delta; only the default "
                              f"(0, inf) is supported")
    expand = d.get("expand", 2)
    if d["num_heads"] * d["head_dim"] != expand * d["hidden_size"]:
        raise CheckpointError(f"{where}: num_heads * head_dim = {d['num_heads'] * d['head_dim']} but expand * "
                              f"hidden_size = {expand * d['hidden_size']} (the SSM's width must be d_inner)")
    try:
        return MambaConfig(
            # a missing field means transformers' Mamba2Config default (n_groups 8, an untied head), as there
            **_hf_common(d, where, tie_default=False), ssm_layer="mamba2", d_state=d.get("state_size", 128),
            expand=expand, headdim=d["head_dim"], ngroups=d.get("n_groups", 8))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


# transformers' order of preference (modeling_utils: model.safetensors, its index, pytorch_model.bin, its index)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable weights-only torch file ({_torch_load_reason(path, e)})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return sd


def _torch_load_reason(path: Path, e: Exception) -> str:
    """Why torch.load(weights_only=True) failed, in words (torch's own text for a refused object advises turning
    weights_only off, and a corrupt or truncated file reads as "[Errno 22] Invalid argument" or "Unsupported
    operand")."""
    import pickle
    import zipfile

    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:  # torch's reason, not its advice
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        detail = [f"WeightsUnpickler error: {rest[0]}" if rest else type(e).__name__]
    else:
        detail = text.splitlines()[:1] or [type(e).__name__]
    if zipfile.is_zipfile(path):
        if isinstance(e, pickle.UnpicklingError):
            return ("it holds objects other than tensors, which weights-only loading refuses: nothing in a "
                    f"checkpoint is executed; {detail[0]}")
        return detail[0]
    return ("not a complete torch.save archive: the file is truncated or corrupt (compare its size with the "
            f"original's), or not a torch file at all; {detail[0]}")


def _read_weights(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint directory and, per key, the file it came from: the first of
    ``_WEIGHT_FILES`` present, as transformers picks (a folder with both formats reads the safetensors; another
    weight file beside the one read is named in a log line)."""
    present = [name for name in _WEIGHT_FILES if (d / name).is_file()]
    if not present:
        for name in _WEIGHT_FILES:  # a weight name that is there, but not as a file
            if (d / name).exists():
                kind = "a directory" if (d / name).is_dir() else "not a regular file"
                raise CheckpointError(f"{d / name} is {kind}; the weights must be a file of that name")
        found = sorted(x.name for x in d.iterdir())[:12]
        raise CheckpointError(f"{d}: no weights found (looked for {', '.join(_WEIGHT_FILES)}; the directory "
                              f"holds: {', '.join(found) or 'nothing'})")
    name = present[0]
    f = d / name
    if present[1:]:
        log.info("%s: reading %s; not reading %s (transformers' order of preference)", d, name,
                 ", ".join(present[1:]))
    if name.endswith(".index.json"):
        try:
            index = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: not a valid shard index (not JSON: {e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise CheckpointError(f"{f}: not a valid shard index (needs a non-empty 'weight_map' object mapping "
                                  f"each tensor name to its shard's file name)")
        sd, src = {}, {}
        for shard in sorted(set(weight_map.values())):
            sf = d / shard
            if Path(shard).name != shard or not sf.is_file():
                raise CheckpointError(f"{f} names shard {shard!r}, which is not a file in {d}")
            part = _read_tensors(sf)
            for k, v in part.items():
                sd[k] = v
                src[k] = str(sf)
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise CheckpointError(f"{f} lists {missing[0]!r} in {weight_map[missing[0]]} but that shard does "
                                  f"not contain it")
        return sd, src
    sd = _read_tensors(f)
    return sd, {k: str(f) for k in sd}


def load_state_dict_from_dir(path: str | os.PathLike) -> tuple[MambaConfig, dict[str, torch.Tensor], str]:
    """Read a checkpoint directory: (config, state dict renamed to MambaLM's keys, layout "original"|"hf").

    The layout is recognised from config.json (``hidden_size`` or ``model_type`` = transformers, else ``d_model`` =
    state-spaces: the state-spaces ``*-hf`` configs hold both, and transformers reads their own fields);
    the tensor names of either layout are accepted with either config.
    """
    config, sd, layout, _ = _load_dir(path)
    return config, sd, layout


def hub_id_hint(path) -> str:
    """For a missing path that reads like a Hugging Face Hub id ("state-spaces/mamba-130m"): a sentence saying that
    nothing is downloaded and how to get the folder; else ""."""
    import re

    text = os.fspath(path)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) or text.endswith((".json", ".bin", ".safetensors")):
        return ""
    if os.path.isdir(text.split("/")[0]):  # a local folder holds the first part: a local path mistyped, not an id
        return ""
    return (f" (it reads like a Hugging Face Hub id: checkpoints are read from a local folder only, nothing is "
            f"downloaded; fetch it first, e.g. `huggingface-cli download {text} --local-dir {text.split('/')[1]}`, "
            f"and pass that folder)")


def config_from_dir(path: str | os.PathLike) -> tuple[MambaConfig, str]:
    """(config, layout "original"|"hf") of a checkpoint directory, read from its config.json alone (no weights
    are read), as :meth:`MambaLM.from_pretrained` reads it."""
    config, layout, _ = _read_config(path)
    return config, layout


def _read_config(path):
    """-> (config, layout, directory) of a checkpoint directory's config.json; CheckpointError naming the problem."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"checkpoint directory {d} does not exist{hub_id_hint(path)}")
    if not d.is_dir():
        hint = f" (here perhaps {d.parent})" if (d.parent / "config.json").is_file() else ""
        raise CheckpointError(f"{d} is not a directory; pass the checkpoint folder holding config.json{hint}")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        found = sorted(x.name for x in d.iterdir())[:12]
        raise CheckpointError(f"{d}: no config.json, so not a recognisable Mamba checkpoint (the directory "
                              f"holds: {', '.join(found) or 'nothing'})")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    # transformers' files first: the state-spaces *-hf configs (and every model saved from one) also carry
    # mamba-ssm's d_model / n_layer / ssm_cfg / pad_vocab_size_multiple, which transformers ignores
    if "hidden_size" in raw or "model_type" in raw:
        layout, config = "hf", _config_from_hf(raw, str(cfg_file))
    elif "d_model" in raw:
        layout, config = "original", _config_from_original(raw, str(cfg_file))
    else:
        raise CheckpointError(f"{cfg_file}: neither a state-spaces Mamba config (d_model, n_layer, ssm_cfg) nor "
                              f"a transformers MambaConfig (hidden_size, num_hidden_layers, state_size)")
    return config, layout, d


def _load_dir(path):
    """load_state_dict_from_dir, plus each renamed key's original name and file (for error messages)."""
    config, layout, d = _read_config(path)
    raw_sd, src = _read_weights(d)
    sd = {}
    renamed_from = {}
    for k, v in raw_sd.items():
        ours = _rename_key(k)
        if ours is None:
            continue
        if ours in sd:
            raise CheckpointError(f"{d}: tensors {renamed_from[ours]!r} and {k!r} both map to {ours!r}")
        sd[ours] = v
        renamed_from[ours] = f"{k}' in '{src[k]}"
    if config.tie_embeddings and "lm_head.weight" in sd:
        # the original layout stores the tied head as a second copy; it must equal the embedding
        head = sd.pop("lm_head.weight")
        emb = sd.get("embeddings.weight")
        if emb is not None and head.shape != emb.shape:  # (transformers refuses such a file: a size mismatch)
            raise CheckpointError(f"{d}: the config ties the LM head to the embedding but tensor "
                                  f"'{renamed_from['lm_head.weight']}' has shape {tuple(head.shape)} and tensor "
                                  f"'{renamed_from['embeddings.weight']}' {tuple(emb.shape)}: a head of its own "
                                  f"needs an untied config (tie_word_embeddings / tie_embeddings false)")
        if emb is not None and not torch.equal(head, emb):
            raise CheckpointError(f"{d}: the config ties the LM head to the embedding but tensor "
                                  f"'{renamed_from['lm_head.weight']}' differs from tensor "
                                  f"'{renamed_from['embeddings.weight']}'")
    return config, sd, layout, renamed_from


def _rename_key(k: str) -> str | None:
    """A checkpoint tensor name (either layout) -> MambaLM's name."""
    if k.startswith("backbone."):
        k = k[len("backbone."):]
    if k == "embedding.weight":  # state-spaces name
        return "embeddings.weight"
    return k


def _check_state_dict(sd: dict, expected: dict, d: Path, layout: str, renamed_from: dict) -> None:
    """Name missing and unexpected tensors and the first shape mismatch, with both shapes."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    cfg_name = "config.json"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append("unexpected tensor(s) " + ", ".join(f"'{renamed_from.get(k, k)}'" for k in unexpected[:8])
                         + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(f"{d} ({layout} layout): the weights do not match {cfg_name}: " + "; ".join(parts))
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{d} ({layout} layout): tensor '{renamed_from.get(k, k)}' has shape {tuple(sd[k].shape)} but "
                f"{cfg_name} implies {tuple(t.shape)} for {k}")
        if not sd[k].is_floating_point():
            raise CheckpointError(f"{d}: tensor '{renamed_from.get(k, k)}' has dtype {sd[k].dtype}, expected floating point")


def _dtype_name(sd: dict) -> str:
    return str(next(iter(sd.values())).dtype).replace("torch.", "")


def _save_hf(cfg: MambaConfig, own: dict, out: Path, max_shard_size: int | None) -> None:
    if cfg.ssm_layer == "mamba2":
        conf = {
            "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "vocab_size": cfg.padded_vocab_size,
            "state_size": cfg.d_state, "conv_kernel": cfg.d_conv, "expand": cfg.expand, "num_heads": cfg.nheads,
            "head_dim": cfg.headdim, "n_groups": cfg.ngroups, "chunk_size": 256, "rms_norm": True,
            "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor,
            "use_bias": cfg.bias, "use_conv_bias": cfg.conv_bias, "hidden_act": "silu",
            "layer_norm_epsilon": cfg.rms_norm_eps, "residual_in_fp32": cfg.residual_in_fp32,
            "rescale_prenorm_residual": False,  # init-only, but applied to loaded weights (_hf_mamba1_config)
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.initializer_range,
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": True,
            "dtype": _dtype_name(own),
        }
    else:
        conf = _hf_mamba1_config(cfg, own)
    _write_safetensors(conf, own, out, max_shard_size)


def _hf_mamba1_config(cfg: MambaConfig, own: dict) -> dict:
    return {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        # the *-hf layout has no padding field: its vocab_size is the embedding's row count
        "vocab_size": cfg.padded_vocab_size,
        "state_size": cfg.d_state, "conv_kernel": cfg.d_conv, "expand": cfg.expand,
        "intermediate_size": cfg.d_inner, "time_step_rank": cfg.resolved_dt_rank,
        "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_scale": cfg.dt_scale,
        "time_step_init_scheme": cfg.dt_init, "time_step_floor": cfg.dt_init_floor,
        "use_bias": cfg.bias, "use_conv_bias": cfg.conv_bias, "hidden_act": "silu",
        "layer_norm_epsilon": cfg.rms_norm_eps, "residual_in_fp32": cfg.residual_in_fp32,
        # an init-only flag, but transformers 5 applies it to *loaded* out_proj weights too (dividing them by
        # sqrt(n_layer) again), so a saved checkpoint always says false, as the public *-hf ones do
        "rescale_prenorm_residual": False,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.initializer_range,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "use_cache": True,
        "dtype": _dtype_name(own),
    }


def _remove_weight_files(out: Path) -> None:
    """Remove the weight files of either layout a folder holds (a model saved there before): what save_pretrained
    writes next must be what loads, and the loader prefers model.safetensors (or its index) to pytorch_model.bin,
    as transformers does, so a stale one would be read instead of the weights just written."""
    for pattern in ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                    "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"):
        for f in out.glob(pattern):
            if f.is_file():
                f.unlink()


def _write_safetensors(conf: dict, own: dict, out: Path, max_shard_size: int | None) -> None:
    from emma_mamba.fileio import save_safetensors

    tensors = {}
    for k, v in own.items():
        name = k if k.startswith("lm_head.") else "backbone." + k
        tensors[name] = v.contiguous().cpu()
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    _remove_weight_files(out)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        save_safetensors(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _save_original(cfg: MambaConfig, own: dict, out: Path) -> None:
    ssm_cfg = {"d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand, "dt_rank": cfg.dt_rank,
               "dt_min": cfg.dt_min, "dt_max": cfg.dt_max, "dt_init": cfg.dt_init, "dt_scale": cfg.dt_scale,
               "dt_init_floor": cfg.dt_init_floor, "conv_bias": cfg.conv_bias, "bias": cfg.bias}
    if cfg.ssm_layer == "mamba2":
        ssm_cfg = {"layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand,
                   "headdim": cfg.headdim, "ngroups": cfg.ngroups, "dt_min": cfg.dt_min, "dt_max": cfg.dt_max,
                   "dt_init_floor": cfg.dt_init_floor, "conv_bias": cfg.conv_bias, "bias": cfg.bias}
    conf = {
        "d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
        "ssm_cfg": ssm_cfg,
        "rms_norm": True, "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple, "tie_embeddings": cfg.tie_embeddings,
    }
    if cfg.rms_norm_eps != 1e-5:
        # mamba-ssm's MambaConfig has no such field (its norms use 1e-5) and refuses a config.json holding one:
        # written only for an epsilon that layout cannot express, for our own loader
        log.warning("save_pretrained(layout='original'): rms_norm_eps %g is not mamba-ssm's fixed 1e-5; writing "
                    "norm_epsilon, which mamba-ssm's MambaConfig does not accept", cfg.rms_norm_eps)
        conf["norm_epsilon"] = cfg.rms_norm_eps
    sd = {}
    for k, v in own.items():
        if k == "embeddings.weight":
            sd["backbone.embedding.weight"] = v.cpu()
        elif k.startswith("lm_head."):
            sd[k] = v.cpu()
        else:
            sd["backbone." + k] = v.cpu()
    if cfg.tie_embeddings:  # mamba-ssm's state_dict carries the tied head too
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    _remove_weight_files(out)
    torch.save(sd, str(out / "pytorch_model.bin"))
