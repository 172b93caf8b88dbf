"""Process groups and model wrapping for training: the only place that knows about DDP and FSDP2.

The models stay plain ``nn.Module`` s; this module turns one into what the trainer runs (torchtitan's split):

* ``none``: single process (CPU or one GPU), the module itself.
* ``ddp``: ``DistributedDataParallel`` (gloo on the CPU, NCCL on GPUs) as launched by
  ``torchrun --nproc_per_node=K``. ``find_unused_parameters`` defaults to on because a micro-batch of
  text-only records does not touch the vision bridge.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): each Mamba block is its own shard unit, the rest
  (embeddings, final norm, vision tower, MFF, instruction fusion, projector, alignment head) the root's. The
  embedding must stay in the root unit because ``EmmaMamba._splice`` reads it before the LM's forward runs.
  The image branch is in the root unit because it does not run for every micro-batch: a process whose
  micro-batch is text-only would skip a vision or alignment-head unit's gathers and reductions that the others
  run (a collective mismatch: the job fails or hangs). The root gathers once per forward whatever runs; a
  text-only micro-batch also runs the image branch on a blank image x 0 (``EmmaMamba.modality_lockstep``,
  set by the trainer), so every process reduces gradients for the same parameters. On a GPU with bf16 the
  parameters are gathered in bf16 and gradients reduced in fp32 (``MixedPrecisionPolicy``); on the CPU
  everything stays fp32. The SSM's dynamics parameters (each mixer's ``A_log``, ``D`` and dt bias:
  :func:`ssm_parameters`) are left out of the shard units: a bf16 gather would round them (``A = -exp(A_log)``
  by up to 0.35 % at the S4D init, the dt bias of about -6.9 under the softplus by ~1.6 % of the step), which the
  recurrence compounds over the sequence; mamba-ssm keeps them fp32, as autocast does under DDP. They stay whole
  and fp32 on every process (0.2 % of mamba-2.8b's parameters), broadcast from rank 0 once; their gradients are
  averaged over the processes by :func:`sync_replicated_grads`, and :func:`clip_grad_norm` takes the global
  norm over them and the shards together.

``auto`` means DDP when more than one process was launched, otherwise none. Data sharding is done by the
trainer (every rank computes the same global batch plan and takes its own slice), so no sampler is involved.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "wrap_model", "all_reduce_sum", "no_grad_sync", "is_fsdp",
           "destroy_distributed", "barrier", "broadcast_object", "all_gather_object", "lost_peer", "ssm_parameters",
           "sync_replicated_grads", "clip_grad_norm"]

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_minutes: float | None = None) -> DistInfo:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group: NCCL when
    CUDA is available (one GPU per local rank), gloo otherwise. Without torchrun: a single CPU/GPU process.
    ``timeout_minutes``: the group's collective timeout (parallel.timeout_minutes; None: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if local >= torch.cuda.device_count():
            from emma_mamba.config import ConfigError

            n = torch.cuda.device_count()
            if n == 0:
                raise ConfigError(f"--device {device or 'cuda'}: no CUDA GPU is visible to this process "
                                  f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
            raise ConfigError(f"LOCAL_RANK {local} but only {n} GPUs are visible: start at most {n} processes per "
                              f"node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            kw = {"device_id": dev} if use_cuda else {}
            if timeout_minutes is not None:
                import datetime

                kw["timeout"] = datetime.timedelta(minutes=timeout_minutes)
            dist.init_process_group(backend=backend, **kw)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def destroy_distributed(finished: bool = True) -> None:
    """End the process group, leaving its worker threads time to drop their finished work first.

    A gloo worker thread destroys a collective's work object after the waiting thread has moved on; when that
    releases the last reference to a tensor created in Python it needs the GIL. At interpreter exit a thread that
    asks for the GIL is ended by ``pthread_exit``, whose unwinding through that (noexcept) destructor aborts the
    process ("terminate called without an active exception", exit code -6 after a run that finished: seen in
    about one FSDP run in three on 2 CPU processes; core dump: ``~AsyncBarrierWork`` ->
    ``~AsyncAllgatherCoalescedWork`` -> ``decref_pyobject`` -> ``take_gil`` -> ``PyThread_exit_thread``). A
    barrier, then a short sleep with the GIL released, lets the workers finish that while Python is alive.
    ``finished`` False (this rank failed): no barrier, which the other ranks may never reach."""
    if dist.is_available() and dist.is_initialized():
        import time

        if finished:
            dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()
        time.sleep(0.05)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, by rank (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_peer(e: BaseException) -> str | None:
    """How a collective failed when ``e`` says another process of the group is gone (torch's DistBackendError and
    DistNetworkError; gloo's plain RuntimeError for a connection its peer closed): its first sentence, without the
    source location ("Connection closed by peer [127.0.0.1]:63119"); None for any other error (ours included)."""
    import re

    if not (isinstance(e, dist.DistError) or type(e) is RuntimeError and any(s in str(e) for s in _PEER_GONE)):
        return None
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].rstrip(".")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def resolve_strategy(strategy: str, info: DistInfo) -> str:
    if strategy == "auto":
        return "ddp" if info.distributed else "none"
    if strategy in ("ddp", "fsdp") and not info.distributed:
        log.info("parallel.strategy=%s with a single process: running unwrapped", strategy)
        return "none"
    return strategy


def wrap_model(model: nn.Module, strategy: str, info: DistInfo, *, bf16: bool = False,
               find_unused_parameters: bool = True, reshard_after_forward: bool = True) -> nn.Module:
    """The module the trainer calls (DDP wrapper, the fully_shard-ed model itself, or ``model``)."""
    strategy = resolve_strategy(strategy, info)
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        # cast_forward_inputs=False: FSDP's default rounds every float input of a wrapped forward to bf16, which
        # (root) made the alignment head's pixel targets from bf16-rounded images (a flat patch's rounding noise,
        # divided by its tiny standard deviation, became the target: align loss 0.95 where one process and DDP
        # give 0.76) and (blocks) rounded the fp32 residual stream at every block, so residual_in_fp32 did nothing.
        # The modules cast what they compute with themselves (the ViT its input, RMSNorm to its weight's dtype).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
        # Left unsharded (replicated): the frozen CLIP text tower of instruction fusion (read through
        # forward_intermediates, never its own forward, and never trained) and any 0-d parameter (fully_shard
        # cannot shard scalars, e.g. CLIP's unused logit_scale).
        ignored = {p for p in model.parameters() if p.ndim == 0}
        if getattr(model, "instruction", None) is not None:
            ignored |= set(model.instruction.text_model.parameters())
        kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        replicated = ssm_parameters(model)  # whole and fp32 on every process (module docstring)
        with torch.no_grad():
            for p in replicated:
                dist.broadcast(p.data, src=0)
        for block in model.lm.layers:
            fully_shard(block, **kw, ignored_params=set(_mixer_ssm_parameters(block.mixer)) or None)
        # everything else: see the module docstring
        fully_shard(model, **kw, ignored_params=(ignored | set(replicated)) or None)
        model._replicated_params = [p for p in replicated if p.requires_grad]
        return model
    raise ValueError(f"parallel.strategy: unknown strategy {strategy!r}; valid: auto, none, ddp, fsdp")


def ssm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each Mamba mixer's dynamics parameters: ``A_log``, ``D`` and the dt bias (Mamba-1's ``dt_proj.bias``,
    Mamba-2's ``dt_bias``)."""
    return [p for block in model.lm.layers for p in _mixer_ssm_parameters(block.mixer)]


def _mixer_ssm_parameters(mixer: nn.Module) -> list[nn.Parameter]:
    dt_proj = getattr(mixer, "dt_proj", None)
    return [p for p in (getattr(mixer, "A_log", None), getattr(mixer, "D", None), getattr(mixer, "dt_bias", None),
                        getattr(dt_proj, "bias", None)) if isinstance(p, nn.Parameter)]


def sync_replicated_grads(model: nn.Module) -> None:
    """Average over the processes the gradients of the trainable parameters that FSDP left whole
    (:func:`wrap_model`), as FSDP averages its shards'; nothing for another strategy. Call it on every process
    after the step's last backward."""
    params = getattr(model, "_replicated_params", None)
    if not params or not (dist.is_available() and dist.is_initialized()):
        return
    for p in params:  # every process reduces the same tensors (a missing gradient counts as zero)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over ``params``, whose gradients may be FSDP shards (DTensors) and whole
    tensors (the parameters FSDP left replicated) together; returns the global norm as a plain tensor, the same
    on every process."""
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    whole = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    if not sharded or not whole:
        norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    a = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
    b = torch.nn.utils.get_total_norm([p.grad for p in whole])
    total = torch.linalg.vector_norm(torch.stack([a.float(), b.to(a.device).float()]))
    coef = max_norm / (float(total) + 1e-6)  # as torch clips
    if coef < 1.0:
        for p in with_grad:
            p.grad.mul_(coef)
    return total


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(wrapped: nn.Module, sync: bool):
    """Gradient accumulation: skip the gradient all-reduce/reduce-scatter unless ``sync``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP) and not sync:
        with wrapped.no_sync():
            yield
    elif is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield
