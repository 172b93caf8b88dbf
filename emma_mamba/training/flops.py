"""Model FLOPs of a training step, for the ``tflops`` and ``mfu`` metrics (torchtitan's convention: the matrix
multiplications the model needs, forward and backward, without recomputation; what gradient checkpointing or the
mixer's recompute add is not counted, nor is padding).

* The language model: every 2-D weight used as a GEMM (in_proj, x_proj, dt_proj, out_proj, the LM head = the tied
  embedding; LoRA adapters with their own shapes) costs ``2 x weight`` FLOPs per LM position forward, as much again
  for the gradient of its input (the projector is always trained, so gradients flow through the whole LM) and
  as much again for its own gradient when it is trained. The LM head runs at the labelled positions only in
  training (``EmmaMamba.forward(labelled_logits_only=True)``): its share is counted per predicted token. The
  selective scan and the causal conv (about 1 % of a 2.8B LM's FLOPs) are not matrix multiplications and not
  counted; A_log is not a GEMM weight.
* The image path (vision towers, MFF, instruction fusion with its text tower, projector; the alignment head): one
  image's forward and backward on the meta device under ``torch.utils.flop_counter.FlopCounterMode``, with this
  run's trainable parameters (the frozen towers cost a forward only).

``tflops`` is the step's FLOPs / step time / processes; ``mfu`` divides it by one device's peak: ``log.peak_tflops``
or, for a known GPU, its dense bf16/fp16 tensor-core peak (the TF32 half of it for an fp32 run).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: Dense bf16 / fp16 tensor-core peak TFLOPS of one GPU (vendor datasheets, without sparsity), by a substring of
#: torch.cuda.get_device_name(); the first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def device_peak_tflops(device: torch.device, bf16: bool, override: float | None = None) -> float | None:
    """One device's peak for the mfu metric: ``override`` (log.peak_tflops), else a known GPU's dense bf16 peak
    (half of it for an fp32 run: TF32), else None (a CPU, an unknown GPU)."""
    if override is not None:
        return float(override)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak if bf16 else peak / 2
    return None


def lm_flops_per_position(lm: torch.nn.Module, head: bool = True) -> float:
    """Forward + backward GEMM FLOPs of one LM position (see the module docstring); ``head`` False: without the
    LM head's (:func:`lm_head_flops_per_position`)."""
    tied = getattr(lm, "lm_head", None) is None
    head_name = "embeddings.weight" if tied else "lm_head.weight"
    total = 0
    for name, p in lm.named_parameters():
        if p.dim() != 2 or name.endswith("A_log") or (name == "embeddings.weight" and not tied):
            continue
        if name == head_name and not head:
            continue
        total += 2 * p.numel() * (2 + int(p.requires_grad))
    return float(total)


def lm_head_flops_per_position(lm: torch.nn.Module) -> float:
    """The LM head's forward + backward GEMM FLOPs at one position it runs at."""
    return lm_flops_per_position(lm) - lm_flops_per_position(lm, head=False)


def image_flops(model) -> float:
    """Forward + backward FLOPs of one image through the image path and the alignment head (where its loss is on:
    not in stage 1, which never runs it), counted on a meta copy of ``model`` (no memory, no compute) with
    ``model``'s trainable parameters; a model already on the meta device (``emma-mamba info``'s) is counted as
    it is."""
    from torch.utils.flop_counter import FlopCounterMode

    from emma_mamba.models.vlm import EmmaMamba

    if next(model.parameters()).is_meta:
        meta = model
    else:
        meta = EmmaMamba(model.config, for_training=model.align_head is not None, device="meta")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for n, p in meta.named_parameters():
            p.requires_grad_(n in trainable)
        meta.align_loss_on = model.align_loss_on
    meta.train()
    H, W = meta.vision.image_size
    x = torch.empty(1, 3, H, W, device="meta")
    inst = None
    if meta.instruction is not None:  # the text tower reads its whole (padded) context
        inst = torch.zeros(1, meta.instruction.context_length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fc:
        visual = meta.encode_images(x, inst)
        if visual.requires_grad:
            visual.float().sum().backward()
        if meta.align_head is not None and meta.align_loss_on:  # the head runs where its loss trains only
            n, d = meta.vision.num_tokens, model.lm.config.d_model
            hidden = [torch.empty(1, n, d, device="meta", requires_grad=True) for _ in meta.config.align.lm_layers]
            meta.align_head(hidden, x).backward()
    return float(fc.get_total_flops())


class StepFlops:
    """FLOPs of a training step from its LM positions, images and predicted (labelled) tokens: ``flops(tokens,
    images, predicted)`` (``predicted`` None: the head at every position)."""

    def __init__(self, model):
        self.per_position = lm_flops_per_position(model.lm)
        self.per_head = lm_head_flops_per_position(model.lm)
        try:
            self.per_image = image_flops(model)
        except Exception as e:  # noqa: BLE001 - a metric: never the reason a run does not start
            log.warning("tflops / mfu: could not count the image path's FLOPs on the meta device (%s: %s); the "
                        "LM's alone are counted", type(e).__name__, e)
            self.per_image = 0.0

    def __call__(self, tokens: int, images: int, predicted: int | None = None) -> float:
        head = self.per_head * (tokens if predicted is None else predicted)
        return (self.per_position - self.per_head) * tokens + head + self.per_image * images
