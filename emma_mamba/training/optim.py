"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Weight decay (decoupled, AdamW) applies to weight matrices only. Never decayed:

* ``A_log`` and ``D`` of every Mamba mixer (mamba-ssm marks them ``_no_weight_decay``: decaying A_log pulls
  every state towards the same decay rate, decaying D removes the skip connection);
* every parameter with fewer than 2 dimensions: biases, RMSNorm/LayerNorm weights, ``dt_proj.bias``, the MFF
  and alignment-head layer-mixing logits;
* what a module declares itself, by the two conventions in use: a parameter with ``_no_weight_decay = True``
  (mamba-ssm's), and the names a submodule's ``no_weight_decay()`` returns, relative to it (timm's and
  open_clip's: a ViT's position embedding and class token, which the vision tower holds when it trains);
* the token embedding when ``train.decay_embeddings`` is false. It is decayed by default, as nanoGPT and the
  HF Trainer (LLaVA, Cobra) do: in Mamba it is also the tied LM head, a weight matrix like any other.

Frozen parameters (``requires_grad=False``) are left out of the optimizer entirely.

``train.lr_multipliers`` ({module: m}, modules named as in ``train.trainable``) gives a module's parameters
their own two groups (decayed, not) with peak lr ``lr * m``; the schedule multiplies every group's peak alike.
Without multipliers there are exactly two groups.

Schedule: linear warmup from 0 to ``lr`` over ``warmup`` steps (the first update at ``lr / warmup``, the
warmup's last at ``lr``), then cosine towards ``min_lr_ratio * lr`` (or constant), which it reaches one step
after the last (the last update is a little above it, as in the HF Trainer's schedule), as a ``LambdaLR`` so its
state is just the step counter.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["param_groups", "declared_no_decay", "build_optimizer", "lr_lambda", "build_scheduler", "warmup_steps"]

_NO_DECAY_NAMES = ("A_log", "D")


def declared_no_decay(model: nn.Module) -> set[str]:
    """Full names of the parameters ``model``'s modules exempt from weight decay: ``_no_weight_decay`` set on
    a parameter, and the names a submodule's ``no_weight_decay()`` returns (relative to that submodule; a name
    may also be a submodule's, exempting its parameters)."""
    names = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if not callable(hook):
            continue
        base = f"{prefix}." if prefix else ""
        for rel in hook():
            full = base + rel
            names.update(n for n, _ in model.named_parameters() if n == full or n.startswith(full + "."))
    return names


def _no_decay(name: str, p: torch.Tensor, decay_embeddings: bool, declared: frozenset | set = frozenset()) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _NO_DECAY_NAMES or p.ndim < 2 or name in declared:
        return True
    if not decay_embeddings and name.endswith("embeddings.weight"):
        return True
    return False


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True,
                 lr: float | None = None, lr_multipliers: dict | None = None) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: not decayed, weight_decay: 0}] with a ``names`` list each, then
    the same pair for every module of ``lr_multipliers`` (top-level submodule name -> factor != 1) with its own
    ``lr`` (``lr`` times the factor)."""
    mult = {k: float(v) for k, v in (lr_multipliers or {}).items() if float(v) != 1.0}
    if mult and lr is None:
        raise ValueError("param_groups: lr_multipliers need the base lr")
    buckets: dict[tuple[str | None, bool], list] = {}
    declared = declared_no_decay(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.split(".", 1)[0]
        key = (module if module in mult else None, _no_decay(name, p, decay_embeddings, declared))
        buckets.setdefault(key, []).append((name, p))
    groups = []
    for module in [None, *mult]:
        for no_decay in (False, True):
            items = buckets.get((module, no_decay), [])
            g = {"params": [p for _, p in items], "names": [n for n, _ in items],
                 "weight_decay": 0.0 if no_decay else weight_decay}
            if module is not None:
                g["lr"] = lr * mult[module]
            groups.append(g)
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with ``cfg`` a TrainConfig."""
    all_groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings, cfg.lr, cfg.lr_multipliers)
    groups = [g for g in all_groups if g["params"]]
    for module in cfg.lr_multipliers:
        if not any(n.split(".", 1)[0] == module for g in groups for n in g["names"]):
            log.warning("train.lr_multipliers.%s: no parameter of %r is trained in this run; the multiplier has no "
                        "effect", module, module)
    if not groups:
        raise ValueError("no trainable parameters: check the stage (set_stage) and the frozen modules")
    kw = {}
    if all(p.device.type == "cuda" for g in groups for p in g["params"]):
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kw)


def warmup_steps(cfg, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_lambda(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update made at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    w = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, w, cfg.schedule, cfg.min_lr_ratio))
