"""LoRA adapters on the Mamba mixers' projections, merged on save.

``train.lora`` (r > 0) wraps the chosen projections of every mixer (``in_proj``, ``x_proj``, ``dt_proj``,
``out_proj``; a Mamba-2 mixer has only ``in_proj`` and ``out_proj``, and by default those two are wrapped, a
Mamba-1 mixer's ``in_proj``, ``x_proj`` and ``out_proj``) in :class:`LoRALinear`: the pretrained weight ``W`` is
frozen and the layer computes with

    W' = W + (alpha / r) * B @ A        A: (r, in_features), B: (out_features, r); B starts at zero

so the adapted model starts exactly at the pretrained one. In a training forward ``in_proj`` and ``out_proj``,
the two large projections on either side of the fused ``ops.mamba_inner``, take their adapters in *activation
space*: ``W @ h + s * B @ (A @ dropout(h))`` (out_proj's input is the scan output, which the fused op then
returns instead of projecting it), so their frozen ``W`` takes part in no weight-gradient GEMM, and LoRA
dropout (``dropout``, peft's ``lora_dropout``) acts on the adapter's input as in peft. ``x_proj`` and
``dt_proj`` live inside the fused op (and every projection in the decode step, CUDA graphs, a prefill into a
cache): there the adapter lives in *weight space*, the mixer asks the projection for :func:`weight_of` and hands
the merged ``W'`` to the same kernels a plain model uses, which know nothing of LoRA; the gradients of A and B
are then ``s * B^T dW'`` and ``s * dW' A^T`` from the kernel's weight gradient (that projection's
weight-gradient GEMM still runs), and no dropout can act (x_proj / dt_proj adapters with dropout are refused).
Either way no gradient or AdamW state is kept for ``W``: at 2.8B that is 33 GB less (fp32 gradient + two
moments). ``base_dtype`` bf16 also holds the frozen ``W`` in bf16 (a merge is still computed in fp32).

The parameter names keep the plain layout (``...mixer.in_proj.weight`` is the frozen ``W``) and add
``...in_proj.lora_A`` / ``lora_B``. What a run writes is always a plain model: :func:`export_state` merges every
adapter into its weight, so ``emma_mamba.load``, ``chat``, ``eval`` and ``serve`` read a LoRA run's checkpoints
and final model like any other; the adapters are written beside it (``lora.safetensors``) so that a resume
continues from the unmerged ``W`` (rebuilt from ``init_from`` / the pretrained files, and checked against the
merged file) and A, B bit for bit.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LoRALinear", "LORA_TARGETS", "MIXER_PROJECTIONS", "DEFAULT_TARGETS", "missing_targets", "weight_of",
           "apply_lora", "lora_modules", "has_lora", "export_state", "resume_state", "LORA_FILE"]

LORA_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")
"""The mixer projections an adapter may wrap."""
MIXER_PROJECTIONS = {"mamba1": LORA_TARGETS, "mamba2": ("in_proj", "out_proj")}
"""The projections each mixer (``lm.ssm_layer``) has: Mamba-2 computes dt, B and C in its in_proj."""
DEFAULT_TARGETS = {"mamba1": ("in_proj", "x_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}
"""The targets when none are given (``train.lora.targets: null``), per mixer: Mamba-1's in_proj, x_proj and
out_proj (not its small dt_proj, (d_inner, dt_rank)), Mamba-2's in_proj and out_proj (all it has)."""
ACTIVATION_SPACE = ("in_proj", "out_proj")
"""The projections whose adapters act on activations in a training forward (the only ones LoRA dropout reaches)."""
LORA_FILE = "lora.safetensors"


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` whose frozen ``weight`` is used as ``weight + scaling * lora_B @ lora_A``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        _check_settings(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        w = base.weight
        # fp32 adapters whatever the base's dtype (a bf16 base keeps fp32 A, B: their updates are small)
        kw = {"device": w.device, "dtype": torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft and the LoRA paper's code: B = 0, A random
        self.r, self.alpha = int(r), float(alpha)
        self.scaling = self.alpha / self.r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the adapter's input only

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A in the adapters' dtype (fp32 over a bf16 base: rounding the sum to bf16 would
        round a small adapter away); the kernels cast it to the activations' dtype as they cast any weight."""
        return self.weight.to(self.lora_A.dtype) + self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out). Training with autograd: in activation space, ``W x + bias + s * B A
        dropout(x)`` (the frozen W in no weight-gradient GEMM, dropout on the adapter's input; the Mamba-2 mixer's
        path); otherwise with the merged weight, one GEMM."""
        if self.training and torch.is_grad_enabled():
            lora = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
            # a base_dtype (bf16) W under fp32 activations without autocast: W cast as the merged path casts it
            w = self.weight if torch.is_autocast_enabled(x.device.type) else self.weight.to(x.dtype)
            return F.linear(x, w, self.bias) + (self.scaling * lora).to(x.dtype)
        return F.linear(x, self.merged_weight().to(x.dtype), self.bias)

    def gemm_cf_halves(self, h_cf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixer's in_proj in activation space: ``(W @ h + s * B @ (A @ h))`` for channels-first ``h`` (b, k,
        l), as its two contiguous halves (b, out/2, l) (x and z; no bias). The frozen ``W`` takes part in no
        gradient GEMM (only in the one for ``h``), which a merged weight would (its weight gradient)."""
        from emma_mamba.ops._inner import gemm_cf

        half = self.out_features // 2
        w, b = self.weight, self.lora_B
        ah = gemm_cf(self.lora_A, self.dropout(h_cf))  # (b, r, l)
        return tuple(gemm_cf(w[sl], h_cf) + self.scaling * gemm_cf(b[sl], ah)
                     for sl in (slice(None, half), slice(half, None)))

    def project_out_cf(self, y_cf: torch.Tensor) -> torch.Tensor:
        """The mixer's out_proj in activation space: ``W @ y + bias + s * B @ (A @ dropout(y))`` for the scan output
        ``y`` (b, in, l) channels-first -> (b, l, out). The frozen ``W`` takes part in no weight-gradient GEMM."""
        from emma_mamba.ops._inner import gemm_cf, project_out

        ay = gemm_cf(self.lora_A, self.dropout(y_cf))  # (b, r, l)
        return project_out(y_cf, self.weight, self.bias) + self.scaling * project_out(ay, self.lora_B, None)

    def extra_repr(self) -> str:
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, dropout={p:g}"


def _check_settings(r, alpha, dropout) -> None:
    """A ValueError unless r is a whole number >= 1, alpha a finite number > 0 (a NaN or zero alpha would give NaN
    or no adapter at all) and dropout in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"LoRA rank must be >= 1 (a whole number), got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def weight_of(linear: nn.Linear) -> torch.Tensor:
    """The weight a projection computes with: merged for a :class:`LoRALinear`, else its own."""
    return linear.merged_weight() if isinstance(linear, LoRALinear) else linear.weight


def check_targets(targets, ssm_layer: str, key: str = "train.lora.targets") -> list[str]:
    """``targets`` (None: the LM's :data:`DEFAULT_TARGETS`) as a list, checked against a ``ssm_layer`` mixer's
    projections; a ValueError names ``key`` (where the user gave them) otherwise."""
    if targets is None:
        return list(DEFAULT_TARGETS[ssm_layer])
    targets = list(targets)
    if not targets or len(set(targets)) != len(targets) or any(x not in LORA_TARGETS for x in targets):
        raise ValueError(f"{key} must be a non-empty list of distinct projections from {', '.join(LORA_TARGETS)}, "
                         f"got {targets}")
    lacking = missing_targets(targets, ssm_layer)
    if lacking:
        raise ValueError(f"{key} {targets} names {', '.join(lacking)}, which the LM's {ssm_layer} mixer "
                         f"(model.lm.ssm_layer) lacks; its projections are {', '.join(MIXER_PROJECTIONS[ssm_layer])} "
                         f"(null: the default, {', '.join(DEFAULT_TARGETS[ssm_layer])})")
    return targets


def missing_targets(targets, ssm_layer: str) -> list[str]:
    """The projections of ``targets`` that a ``ssm_layer`` mixer lacks (Mamba-2: x_proj, dt_proj)."""
    return [t for t in targets if t in LORA_TARGETS and t not in MIXER_PROJECTIONS[ssm_layer]]


def apply_lora(lm: nn.Module, r: int, alpha: float, targets=None, base_dtype: torch.dtype | None = None,
               dropout: float = 0.0) -> list[str]:
    """Wrap ``targets`` (None: the LM's :data:`DEFAULT_TARGETS`) of every mixer of ``lm`` (a MambaLM) in
    LoRALinear and freeze the rest of the LM; only the adapters of ``lm`` train. ``base_dtype`` (e.g. bf16): hold
    the wrapped frozen weights in that dtype (half the memory of the fp32 LM for bf16; the adapters stay fp32).
    ``dropout``: LoRA dropout on the adapters' inputs in training (in_proj and out_proj only: see the module
    doc). Returns the wrapped module names (relative to ``lm``)."""
    _check_settings(r, alpha, dropout)  # before anything of the LM changes (a refused call leaves it as it was)
    if targets is None:
        targets = DEFAULT_TARGETS[lm.config.ssm_layer]
    if isinstance(targets, str):  # one name, not its letters
        raise ValueError(f"LoRA targets must be a list of projections from {', '.join(LORA_TARGETS)}, got the "
                         f"string {targets!r} (write [{targets!r}])")
    targets = list(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be a non-empty list from {', '.join(LORA_TARGETS)}, each named once, "
                         f"got {targets}")
    merged_only = [t for t in targets if t not in ACTIVATION_SPACE]
    if dropout > 0 and merged_only:
        raise ValueError(f"LoRA dropout acts on the adapters of {' and '.join(ACTIVATION_SPACE)} only: "
                         f"{', '.join(merged_only)} adapters are merged into the weights of the fused mixer op, where "
                         f"no dropout can act; leave them out of the targets or set dropout 0")
    if has_lora(lm):
        raise ValueError("this LM already has LoRA adapters")
    for layer in lm.layers:  # every target checked before anything of the LM changes
        mixer = layer.mixer
        for t in targets:
            if getattr(mixer, t, None) is None:  # Mamba-2 computes dt, B and C in in_proj: no x_proj / dt_proj
                raise ValueError(f"LoRA target {t}: the {type(mixer).__name__} of this LM has no {t}; its projections "
                                 f"are {', '.join(n for n in LORA_TARGETS if hasattr(mixer, n))} (train.lora.targets)")
    lm.requires_grad_(False)
    names = []
    for i, layer in enumerate(lm.layers):
        mixer = layer.mixer
        for t in targets:
            base = getattr(mixer, t)
            if base_dtype is not None and base.weight.dtype != base_dtype:
                base.weight = nn.Parameter(base.weight.detach().to(base_dtype), requires_grad=False)
            setattr(mixer, t, LoRALinear(base, r, alpha, dropout))
            names.append(f"layers.{i}.mixer.{t}")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{qualified name: module} of every adapter in ``model`` (names as in its state dict)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A computed on the CPU in fp32 (the same bits however the state was gathered), in the
    wider of W's and the adapters' dtypes (a bf16 base is merged into fp32, as the layer computes it)."""
    merged = w.detach().float().cpu() + scaling * (b.detach().float().cpu() @ a.detach().float().cpu())
    return merged.to(torch.promote_types(w.dtype, a.dtype))


def export_state(model: nn.Module, sd: dict) -> tuple[dict, dict]:
    """Split a full state dict of ``model`` into (plain state dict with every adapter merged into its weight,
    {name.lora_A / name.lora_B: adapter}). Tensors shared by several names (the tied LM head) keep one name."""
    return merge_adapters(sd, {name: m.scaling for name, m in lora_modules(model).items()})


def merge_adapters(sd: dict, scaling: dict[str, float]) -> tuple[dict, dict]:
    """:func:`export_state` from the state dict alone: ``scaling`` maps each adapted module's name to its
    alpha / r (a sharded checkpoint, read without building the model)."""
    out, adapters = {}, {}
    for k, v in sd.items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in scaling and leaf in ("lora_A", "lora_B"):
            adapters[k] = v.detach().contiguous()
        else:
            out[k] = v
    for name, s in scaling.items():
        out[f"{name}.weight"] = _merge(sd[f"{name}.weight"], sd[f"{name}.lora_A"], sd[f"{name}.lora_B"], s)
    seen, plain = {}, {}
    for k, v in out.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else k
        if key in seen:
            continue
        seen[key] = k
        plain[k] = v.detach().contiguous()
    return plain, adapters


def lora_metadata(model: nn.Module) -> dict[str, str]:
    mods = lora_modules(model)
    first = next(iter(mods.values()))
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    # alpha to its last bit (a sharded checkpoint's merge reads it back: "%g" alone keeps 6 digits, another scaling)
    alpha = f"{first.alpha:g}" if float(f"{first.alpha:g}") == first.alpha else repr(first.alpha)
    return {"r": str(first.r), "alpha": alpha, "targets": ",".join(targets)}


def resume_state(model: nn.Module, current: dict, saved: dict, adapters: dict, where: str,
                 atol: float = 1e-6) -> dict:
    """The state dict to resume ``model`` from: the checkpoint's plain (merged) ``saved`` state, its
    ``adapters``, and for every adapted weight the frozen ``W`` this run was built with (``current``: its full
    state dict), after checking that ``W + scaling * B @ A`` reproduces the checkpoint's merged weight: a run
    whose base weights changed (another init_from) would otherwise train on silently."""
    mods = lora_modules(model)
    missing = [f"{n}.{leaf}" for n in mods for leaf in ("lora_A", "lora_B") if f"{n}.{leaf}" not in adapters]
    extra = sorted(set(adapters) - {f"{n}.{leaf}" for n in mods for leaf in ("lora_A", "lora_B")})
    if missing or extra:
        raise RuntimeError(f"{where}: its LoRA adapters do not match this run's train.lora: missing {missing[:4]}, "
                           f"unexpected {extra[:4]}")
    sd = dict(saved)
    for name, m in mods.items():
        wkey = f"{name}.weight"
        a, b = adapters[f"{name}.lora_A"], adapters[f"{name}.lora_B"]
        for key, t, own in ((f"{name}.lora_A", a, m.lora_A), (f"{name}.lora_B", b, m.lora_B)):
            if tuple(t.shape) != tuple(own.shape):
                raise RuntimeError(f"{where}: {key} has shape {tuple(t.shape)}, this run's adapter "
                                   f"{tuple(own.shape)} (another train.lora.r?)")
        base = current[wkey]
        if wkey not in saved:
            raise RuntimeError(f"{where}: model.safetensors has no {wkey}")
        merged = _merge(base, a, b, m.scaling)
        diff = (merged.float() - saved[wkey].detach().float().cpu()).abs().max().item()
        if not diff <= atol:
            raise RuntimeError(f"{where}: {wkey} of the checkpoint is not this run's frozen weight plus its adapter "
                               f"(max difference {diff:.3g}): the run was built from other base weights than the "
                               f"ones the checkpoint was trained from (init_from or the pretrained files changed?)")
        sd[wkey] = base.detach().to(device=saved[wkey].device)  # in its own dtype (a bf16 base stays bf16)
        sd[f"{name}.lora_A"] = a.to(saved[wkey].device)
        sd[f"{name}.lora_B"] = b.to(saved[wkey].device)
    return sd
