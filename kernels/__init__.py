"""Triton kernels of emma_mamba, installed as ``emma_mamba.kernels`` (see emma_mamba/ops/_autograd.py for
the kernel-module protocol they implement)."""
