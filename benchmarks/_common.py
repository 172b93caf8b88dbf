"""What the benchmark scripts of this folder share: the machine record of a result and writing it."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine(device: torch.device, threads: int) -> dict:
    """Platform, torch, threads, device, the kernel backend that ran, and the GPU's name on one."""
    from emma_mamba import ops

    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": threads, "device": str(device), "backend": ops.get_backend(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def write_result(doc: dict, out: str | None, indent: int = 2) -> None:
    """Write ``doc`` as JSON to ``out`` (its folder created; nothing when ``out`` is empty) and say so."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=indent) + "\n")
        print(f"wrote {out}")
