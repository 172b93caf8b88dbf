"""`emma-mamba visualize`: how strongly each image patch is carried through the LM's layers (the EMMA-Mamba
paper's Figure 1), as heat maps beside the image.

    emma-mamba visualize --checkpoint runs/finetune --image cat.jpg [--prompt "..."] [--layers 0 16 32 48 64] \\
        --out maps.png

Writes the PNG and, beside it, the values as JSON (``maps.json``): per layer the L2 norm of the residual stream
at each visual token on the encoder's patch grid (:func:`emma_mamba.inference.visualize.activation_maps`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emma_mamba.fileio import output_problem


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="EMMA-Mamba checkpoint directory")
    p.add_argument("--image", required=True, metavar="FILE", help="the image (any format PIL reads)")
    p.add_argument("--prompt", default="Describe the image in detail.",
                   help="the instruction after the image (default %(default)r)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="LM depths to show: 0 = the LM input, i = after block i, negative from the last (default: "
                        "0, L/4, L/2, 3L/4, L)")
    p.add_argument("--out", default="activation_maps.png", help="PNG to write (default %(default)s); the JSON "
                                                                 "goes beside it")
    p.add_argument("--reconstruction", action="store_true",
                   help="also show what the pixel-wise alignment head reads back from the visual tokens (a "
                        "checkpoint trained with align.enabled)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")


def run(args: argparse.Namespace) -> int:
    from emma_mamba.inference.visualize import (activation_maps, encoder_input, plot_maps, reconstruction,
                                                write_maps)
    from emma_mamba.models.vision import load_image
    from emma_mamba.models.vlm import has_align_head_weights, load

    out = Path(args.out)
    if not out.suffix:  # what matplotlib writes then (and the JSON goes beside it)
        out = out.with_suffix(".png")
    fmt = out.suffix[1:].lower()
    try:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
    except ImportError:  # plot_maps says what to install
        formats = None
    if fmt == "json" or (formats is not None and fmt not in formats):
        why = ("the values are written as JSON beside the figure: name the figure's file" if fmt == "json" else
               f"matplotlib cannot write .{fmt}")
        print(f"emma-mamba visualize: --out {args.out}: {why} (e.g. maps.png; formats: "
              f"{', '.join(sorted(formats or ['png']))})", file=sys.stderr)
        return 2
    js = out.with_suffix(".json")
    # checked before the model runs: a traceback after it, or a figure without its values
    problem = output_problem(out, what=f"name the figure's file, e.g. {out / 'maps.png'}")
    if problem is None and (problem := output_problem(js, what="the values are written there")):
        problem = f"the values' file {problem}"
    if problem:
        print(f"emma-mamba visualize: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:  # decoded as training and generate decode it (EXIF rotation, transparency on white, 16-bit rescaled)
        image = load_image(args.image)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"emma-mamba visualize: --image {args.image}: cannot read the image ({e})", file=sys.stderr)
        return 2
    try:
        if args.reconstruction and not has_align_head_weights(args.checkpoint):
            raise ValueError(f"--reconstruction: {args.checkpoint} holds no alignment-head weights (trained "
                             f"without align.enabled, or saved for inference)")
        model = load(args.checkpoint, device=args.device, for_training=args.reconstruction).eval()
        maps = activation_maps(model, image, args.prompt, args.layers)
        extra = {}
        if args.reconstruction:
            rec, _ = reconstruction(model, image, args.prompt)
            extra = {"alignment head": rec}
        # the first panel is what the maps' patch grid covers: the image resized and cropped as the encoder takes it
        # (the whole file beside them put a map cell over another part of a non-square photo)
        seen = encoder_input(model, image)
    except (FileNotFoundError, ValueError) as e:
        print(f"emma-mamba visualize: {e}", file=sys.stderr)
        return 2
    try:
        png = plot_maps(seen, maps, out, title=args.prompt, extra=extra)
        js = write_maps(maps, png.with_suffix(".json"), checkpoint=str(args.checkpoint),
                        image=str(args.image), prompt=args.prompt, grid=list(model.vision.grid))
    except ImportError as e:
        print(f"emma-mamba visualize: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # not writable, disk full: named in one line
        print(f"emma-mamba visualize: --out {args.out}: cannot write {e.filename or out} ({e.strerror or e})",
              file=sys.stderr)
        return 2
    for layer, m in maps.items():
        print(f"layer {layer:3d}: visual-token norm min {float(m.min()):.3g}  mean {float(m.mean()):.3g}  "
              f"max {float(m.max()):.3g}")
    print(f"wrote {png} and {js}")
    return 0
