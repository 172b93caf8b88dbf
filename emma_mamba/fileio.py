"""Files as users expect to read and find them: text lines, JSON Lines names, output paths checked before a
run, weight files' modes.

safetensors (0.8) and ``tempfile.mkstemp`` create files readable by their owner only (mode 0600), whatever the
umask; a checkpoint or an exported model is meant to be shared (read by a serving user, copied by a colleague),
so the files written here get the mode any new file gets under the process's umask (0644 under the usual 022).
"""

from __future__ import annotations

import os
from pathlib import Path


def text_lines(text: str) -> list[str]:
    """The lines of a text file (JSON Lines, a tab-separated answers file): split at ``\n`` only, a ``\r`` before
    it dropped. Not ``str.splitlines``, which also splits at U+2028, U+2029, U+0085, form feeds and other
    characters that JSON strings and model answers hold as they are (``json.dumps(..., ensure_ascii=False)`` writes
    them unescaped): it broke such a record into malformed pieces and shifted every later line number."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def is_jsonl(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a JSON Lines file (``.jsonl`` in any case: ``train.JSONL`` too)."""
    return Path(path).suffix.lower() == ".jsonl"


def output_problem(path: str | os.PathLike, what: str = "name a file") -> str | None:
    """Why ``path`` cannot be written as an output file (None: it can), checked before a long run so that it fails
    at once rather than after it: it is a directory (``what`` says what to give instead), it exists unwritable, a
    parent is a file, or the nearest existing parent is not writable. Checks only, creates nothing."""
    path = os.fspath(path)
    if not path:
        return "empty path"
    if path.endswith(os.sep) or os.path.isdir(path):
        return f"{path} is a directory ({what})"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        kind = "a file" if os.path.isfile(parent) else "not a directory"
        return f"cannot create the folder of {path}: {parent} is {kind}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write under {parent}"
    return None


def default_file_mode() -> int:
    """0o666 less the process's umask (read without changing it where /proc says it; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def make_shareable(path: str | os.PathLike) -> None:
    """Give ``path`` the default mode of a new file (see the module doc)."""
    os.chmod(path, default_file_mode())


def write_whole(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then renamed over it: ``path`` is either the old file
    or the complete new one, never a part (an interrupted or failed write leaves no half file behind, and removes
    its temporary one). The file gets the default mode (:func:`make_shareable`). The temporary file is made by
    ``tempfile.mkstemp`` (a new file of a name no one can guess, never a link someone else put there, and one per
    call: two writers of one path, threads of one process included, never share it)."""
    import tempfile

    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        make_shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` written whole or not at all (:func:`write_whole`), with the default file
    mode instead of 0600."""
    from safetensors.torch import save_file

    write_whole(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
