"""`emma-mamba data shapes`: write a ShapesWorld data set (images, LLaVA JSON, held-out benchmark files)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from emma_mamba.data.shapes import KINDS, PALETTE, ShapesConfig, generate


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ShapesConfig()
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--seed", type=int, default=d.seed, help="master seed: the output is a pure function of the options")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training images (default %(default)s)")
    p.add_argument("--n-heldout", type=int, default=d.n_heldout, help="held-out images (default %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (default %(default)s)")
    p.add_argument("--min-shapes", type=int, default=d.min_shapes)
    p.add_argument("--max-shapes", type=int, default=d.max_shapes)
    p.add_argument("--layout", choices=("free", "grid"), default=d.layout)
    p.add_argument("--grid", type=int, default=d.grid, help="cells per side for --layout grid")
    p.add_argument("--detail-prob", type=float, default=d.detail_prob, help="chance of a dot/stripe in a shape")
    p.add_argument("--colours", default=",".join(d.colours), help=f"comma-separated subset of {list(PALETTE)}")
    p.add_argument("--kinds", default=",".join(d.kinds), help=f"comma-separated subset of {list(KINDS)}")
    p.add_argument("--max-turns", type=int, default=d.max_turns, help="most turns per stage-2 conversation")
    p.add_argument("--question-mix", default="", metavar="GEN=W,...",
                   help="relative weights of the stage-2 question generators, e.g. existence=4,compare=0 "
                        "(unnamed ones weigh 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ShapesWorld folder")


def _parse_mix(text: str) -> dict:
    mix = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, w = item.partition("=")  # no "=" leaves w empty, which float() rejects below
        try:
            mix[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"--question-mix: expected GENERATOR=WEIGHT, got {item!r}") from None
    return mix


def run(args: argparse.Namespace) -> int:
    try:
        mix = _parse_mix(args.question_mix)
    except ValueError as e:
        print(f"emma-mamba data shapes: {e}", file=sys.stderr)
        return 2
    cfg = ShapesConfig(seed=args.seed, n_train=args.n_train, n_heldout=args.n_heldout, image_size=args.image_size,
                       min_shapes=args.min_shapes, max_shapes=args.max_shapes, layout=args.layout, grid=args.grid,
                       detail_prob=args.detail_prob, colours=tuple(c.strip() for c in args.colours.split(",")),
                       kinds=tuple(k.strip() for k in args.kinds.split(",")), max_turns=args.max_turns,
                       question_mix=mix)
    try:
        cfg.validate()
    except ValueError as e:  # named by the option typed: ShapesConfig.n_train -> --n-train
        from emma_mamba.cli import as_options

        print(f"emma-mamba data shapes: {as_options(str(e), 'ShapesConfig')}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"emma-mamba data shapes: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"emma-mamba data shapes: {out} exists and is not empty; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
        bar = tqdm(total=cfg.n_train + cfg.n_heldout, unit="img", desc="rendering")
        progress = bar.update
    except ImportError:  # tqdm is optional here
        bar, progress = None, None
    t0 = time.perf_counter()
    try:
        meta = generate(cfg, args.out, overwrite=args.overwrite, progress=progress)
    except FileExistsError as e:
        print(f"emma-mamba data shapes: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path under a file, no permission, a full disk: one line naming the path
        print(f"emma-mamba data shapes: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    c = meta["counts"]
    print(f"ShapesWorld seed {cfg.seed} -> {args.out} in {time.perf_counter() - t0:.1f}s")
    print(f"  train: {c['train_images']} images, {c['stage1']} captions, {c['stage2']} conversations "
          f"({c['stage2_turns']} turns)")
    print(f"  held-out: {c['heldout_images']} images; POPE {c['pope']['random']} questions per variant, "
          f"VQAv2 {c['vqav2']}, GQA {c['gqa']}, MME {sum(c['mme'].values())}, VSR {c['vsr']}, "
          f"TallyQA {c['tallyqa']}, RefCOCO-style {c['refcoco']}")
    print(f"  images in {args.out}/images; files listed in {args.out}/meta.json")
    return 0
