"""Do the LM's visual tokens keep the picture's structure? Activation maps scored against ShapesWorld's shapes.

    python benchmarks/activation_probe.py --data DATA_DIR --checkpoint "cobra-like=RUN/stage2" \\
        --checkpoint "all (EMMA)=RUN2/stage2" [--images 100] [--out benchmarks/results/activation_probe.json]

The EMMA-Mamba paper's Figure 1 shows visual features fading into blur in a Mamba MLLM's deeper layers without
its alignment. Here, for held-out ShapesWorld images (whose shapes' boxes are known), each checkpoint's
activation maps (:func:`emma_mamba.inference.visualize.activation_maps`: per LM depth, the norm of every visual
token's residual stream on the patch grid) are scored by how well they separate the patches covered by a shape
(more than half the patch inside a shape's box) from the background patches (none of it inside): ROC AUC of the
norm, per image, averaged. 0.5: no spatial structure; 1: every shape patch above every background patch (0: the
reverse, also structure). The images' preprocessing must be a plain resize of the square image (ShapesWorld's
images are square; the quickstart encoders resize them). Also writes one image's maps per checkpoint as PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402


def patch_labels(shapes: list[dict], image_size: int, grid: tuple[int, int]) -> list[int | None]:
    """Per patch (raster order): 1 when more than half of it lies inside a shape's box, 0 when none of it does,
    None otherwise. ``shapes``: the scene's shapes with inclusive pixel ``box`` [x0, y0, x1, y1]."""
    gh, gw = grid
    ph, pw = image_size / gh, image_size / gw
    out = []
    for r in range(gh):
        for c in range(gw):
            y0, y1, x0, x1 = r * ph, (r + 1) * ph, c * pw, (c + 1) * pw
            covered = torch.zeros(64, 64, dtype=torch.bool)  # the patch sampled on a 64 x 64 lattice
            ys = y0 + (torch.arange(64) + 0.5) * (y1 - y0) / 64
            xs = x0 + (torch.arange(64) + 0.5) * (x1 - x0) / 64
            for s in shapes:
                bx0, by0, bx1, by1 = s["box"]
                covered |= ((ys >= by0) & (ys < by1 + 1))[:, None] & ((xs >= bx0) & (xs < bx1 + 1))[None, :]
            frac = float(covered.float().mean())
            out.append(1 if frac > 0.5 else 0 if frac == 0 else None)
    return out


def probe(model, data: Path, n_images: int, layers=None) -> dict:
    from emma_mamba.data.shapes import Shape
    from emma_mamba.eval.closed import auc_roc
    from emma_mamba.inference.visualize import activation_maps

    scenes = json.loads((data / "heldout" / "scenes.json").read_text())[:n_images]
    size = json.loads((data / "meta.json").read_text())["config"]["image_size"]
    per_layer: dict[int, list[float]] = {}
    for sc in scenes:
        shapes = [{"box": Shape(**s).box} for s in sc["shapes"]]
        labels = patch_labels(shapes, size, model.vision.grid)
        maps = activation_maps(model, data / "images" / sc["image"], layers=layers)
        for layer, m in maps.items():
            keep = [(y, float(v)) for y, v in zip(labels, m.flatten().tolist()) if y is not None]
            auc = auc_roc([y for y, _ in keep], [v for _, v in keep])
            if auc is not None:
                per_layer.setdefault(layer, []).append(auc)
    return {str(k): {"mean_auc": statistics.mean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
                     "images": len(v)} for k, v in sorted(per_layer.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a ShapesWorld folder (emma-mamba data shapes)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR",
                   help="a checkpoint to probe, named (repeatable)")
    p.add_argument("--images", type=positive_int, default=100, help="held-out images to score (default %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="LM depths (default: 0, L/4, ..., L)")
    p.add_argument("--threads", type=positive_int, default=2)
    add_out(p, 'activation_probe.json')
    args = parse_args(p, argv)
    from emma_mamba.inference.visualize import activation_maps, plot_maps
    from emma_mamba.models.vlm import load

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    results = {}
    first = json.loads((data / "heldout" / "scenes.json").read_text())[0]["image"]
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--checkpoint {spec!r}: expected NAME=DIR")
        model = load(path).eval()
        results[name] = {"checkpoint": path, "layers": probe(model, data, args.images, args.layers)}
        row = "  ".join(f"layer {k}: {v['mean_auc']:.3f} ± {v['stdev']:.3f}" for k, v in results[name]["layers"].items())
        print(f"{name}: {row}", flush=True)
        if args.out:
            slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
            plot_maps(data / "images" / first, activation_maps(model, data / "images" / first, layers=args.layers),
                      Path(args.out).with_name(f"activation_maps_{slug}.png"), title=name)
    write_result({"benchmark": "activation_probe", "data": str(data), "images": args.images,
                  "metric": "ROC AUC of the visual-token norm for shape patches vs background patches, per image",
                  **machine(torch.device("cpu"), args.threads), "results": results}, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
