"""A digest of the C++ / CUDA sources that go into ``emma_mamba._C``, recorded in the extension when it is built
(setup.py loads this file on its own, before the package is importable) and compared with the sources beside
the package at run time: a source checkout whose ``csrc/`` changed since its last build (a ``git pull`` or a
kernel edit without ``pip install --no-build-isolation -e .`` again) runs kernels that are not its sources', which
:mod:`emma_mamba.ops` says once (and ``emma-mamba env`` reports). No imports beyond the standard library."""

from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = (".cpp", ".cc", ".cu", ".cuh", ".h", ".hpp", ".inc")
EXCLUDED = ("emu",)
"""Folders of csrc/ that are not compiled into _C (the CPU emulator of the CUDA kernels, built at run time)."""


def csrc_files(csrc: str | Path) -> list[Path]:
    """The source files of ``csrc`` compiled into _C, sorted by their path relative to it."""
    root = Path(csrc)
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                   and p.relative_to(root).parts[0] not in EXCLUDED), key=lambda p: p.relative_to(root).as_posix())


def csrc_digest(csrc: str | Path) -> str:
    """16 hex digits of SHA-256 over each source file's path (relative to ``csrc``) and bytes."""
    root, h = Path(csrc), hashlib.sha256()
    for p in csrc_files(root):
        rel = p.relative_to(root).as_posix().encode()
        data = p.read_bytes()
        h.update(len(rel).to_bytes(4, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]
