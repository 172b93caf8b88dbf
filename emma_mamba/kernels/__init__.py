"""Triton kernels of emma_mamba, installed as ``emma_mamba.kernels``: the ``triton`` backend of emma_mamba.ops.

This module is a *kernel module* (the protocol is in the docstring of emma_mamba/ops/_autograd.py): the
op layer validates inputs (shapes, dtypes; contiguous, or unit-strided in the last dimension where a kernel
reads a view in place: see emma_mamba/ops/_checks.py) and wraps the forward/backward pairs in its
autograd Functions, so the functions here take checked tensors and do no validation of their own.

* :mod:`.selective_scan` - chunked selective scan forward and backward (``tl.associative_scan``);
* :mod:`.state_update` - one decode step of the scan, in place;
* :mod:`.causal_conv1d` - depthwise causal conv forward, backward and decode step.

The kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package
was imported (Triton decides at ``@triton.jit`` time whether a kernel is compiled or interpreted).
"""

from .causal_conv1d import causal_conv1d_bwd, causal_conv1d_fwd, causal_conv1d_update
from .selective_scan import selective_scan_bwd, selective_scan_fwd
from .state_update import selective_state_update

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "causal_conv1d_fwd", "causal_conv1d_bwd",
           "selective_state_update", "causal_conv1d_update"]
