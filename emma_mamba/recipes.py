"""`emma-mamba configs`: the recipes that ship with the package (configs/ of the source tree, installed as
``emma_mamba/configs``), listed with their first comment line, or copied into a folder for editing.

    emma-mamba configs                          # name and summary of each shipped recipe
    emma-mamba configs --copy my_configs        # copy them all (never overwriting an existing file)
    emma-mamba configs --copy my_configs train_tiny_stage1 model_tiny

Commands that take a recipe (`pretrain`/`finetune --config`, `quickstart --config`, `ablate --config`, a run
config's `model:`) accept a shipped recipe by name when no such file exists where they run
(:func:`emma_mamba.config.resolve_config_path`), so the README's `--config configs/....yaml` works from any
directory with a non-editable install too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def summary(path: Path) -> str:
    """The recipe's first comment line, without the leading '#'."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--copy", metavar="DIR", default=None, help="copy recipes into DIR (created if needed)")
    p.add_argument("names", nargs="*", help="recipes to copy (default: all)")
    p.add_argument("--overwrite", action="store_true", help="with --copy: replace files that already exist")


def run(args: argparse.Namespace) -> int:
    from emma_mamba.config import shipped_config_dir, shipped_configs

    shipped = shipped_configs()
    if not shipped:
        print("emma-mamba configs: no shipped recipes found next to the package (a broken install?)", file=sys.stderr)
        return 2
    names = [n[:-5] if n.endswith(".yaml") else n for n in args.names]
    unknown = [n for n in names if n not in shipped]
    if unknown:
        print(f"emma-mamba configs: no shipped recipe named {', '.join(unknown)}; shipped: {', '.join(shipped)}",
              file=sys.stderr)
        return 2
    if args.copy is None:
        if names:
            print("emma-mamba configs: recipe names go with --copy DIR", file=sys.stderr)
            return 2
        print(f"shipped recipes ({shipped_config_dir()}):")
        width = max(len(n) for n in shipped)
        room = max(40, shutil.get_terminal_size((120, 24)).columns - width - 4)
        for name, path in shipped.items():
            text = summary(path)
            print(f"  {name:<{width}}  {text if len(text) <= room else text[:room - 3] + '...'}")
        return 0
    out = Path(args.copy)
    picked = {n: shipped[n] for n in (names or shipped)}
    clashes = [str(out / p.name) for p in picked.values() if (out / p.name).exists()]
    if clashes and not args.overwrite:
        print(f"emma-mamba configs: {', '.join(clashes)} already exist(s); nothing copied (--overwrite replaces)",
              file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path in picked.values():
            shutil.copyfile(path, out / path.name)
    except OSError as e:  # DIR is a file, or not writable: one line, not a traceback
        print(f"emma-mamba configs: cannot copy into {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"copied {len(picked)} recipe(s) to {out}: {', '.join(p.name for p in picked.values())}")
    return 0
