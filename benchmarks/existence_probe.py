"""Does a ShapesWorld model see *which* objects are in an image? Existence questions scored threshold-free.

    python benchmarks/existence_probe.py lm --checkpoint runs/quickstart/stage2 --data runs/quickstart/data
    python benchmarks/existence_probe.py features --clip runs/quickstart/clip/open_clip.pt \
        --data runs/quickstart/data [--config configs/quickstart.yaml]

Greedy POPE accuracy mixes two things: whether the answer depends on the image at all, and where the yes/no
threshold sits (a model that leans "yes" loses POPE popular whatever it sees). This script separates them.
For each image it asks "Is there a <colour> <kind> in the image?" about one present object and three absent
ones: a uniformly random absent object, one with the *same colour* and another kind (only the kind tells it
apart), and one with the *same kind* and another colour (only the colour tells it apart). The score is the
AUC (probability that a present object outranks an absent one: 0.5 = blind, 1 = perfect) of

- ``lm``: the margin logit("yes") - logit("no") of a checkpoint's first answer token, with the exact prompt
  of ``emma-mamba eval --task pope``, on training and held-out images (the gap says how much is memorised);
- ``features``: a small probe (LayerNorm, MLP per patch, max over patches, 40 sigmoid outputs) trained on
  frozen patch features of a stage-0 CLIP's ViT blocks, which bounds what the features make accessible.

One torch thread; seeds fixed. Results are printed and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402

NEGATIVES = ("random", "same_colour", "same_kind")


def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a present object > score of an absent one), ties counted half (Mann-Whitney U / n_pos n_neg)."""
    p, n = torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    gt = (p[:, None] > n[None]).double().mean()
    eq = (p[:, None] == n[None]).double().mean()
    return float(gt + 0.5 * eq)


def world(data: Path) -> tuple[list[str], list[str]]:
    cfg = json.loads((data / "meta.json").read_text())["config"]
    return list(cfg["colours"]), list(cfg["kinds"])


def questions(scene: dict, colours: list[str], kinds: list[str], rng: random.Random) -> dict[str, str]:
    """One present object and one absent object of each negative type (a type is skipped when none exists)."""
    present = {f"{s['colour']} {s['kind']}" for s in scene["shapes"]}
    absent = [f"{c} {k}" for c in colours for k in kinds if f"{c} {k}" not in present]
    s = rng.choice(scene["shapes"])
    out = {"present": f"{s['colour']} {s['kind']}", "random": rng.choice(absent)}
    same_colour = [o for o in absent if o.split()[0] == s["colour"]]
    same_kind = [o for o in absent if o.split()[1] == s["kind"]]
    if same_colour:
        out["same_colour"] = rng.choice(same_colour)
    if same_kind:
        out["same_kind"] = rng.choice(same_kind)
    return out


def summarise(scores: dict[str, list[float]]) -> dict:
    return {"auc": {k: round(auc(scores["present"], scores[k]), 4) for k in NEGATIVES if scores[k]},
            "n": {k: len(v) for k, v in scores.items()}}


# ----------------------------------------------------------------------------------------------- lm

@torch.no_grad()
def run_lm(args) -> dict:
    from PIL import Image

    from emma_mamba.data.shapes import _article
    from emma_mamba.eval.runner import prompt_for
    from emma_mamba.models.vlm import build_chat_prompt, load

    data = Path(args.data)
    colours, kinds = world(data)
    model = load(args.checkpoint).eval()
    tok = model.tokenizer
    yes, no = tok.encode("yes"), tok.encode("no")
    if len(yes) != 1 or len(no) != 1:
        raise SystemExit(f"'yes' / 'no' must be one token each for this probe, got {yes} / {no}")
    res = {}
    for split in ("train", "heldout"):
        scenes = json.loads((data / split / "scenes.json").read_text())[: args.images]
        rng = random.Random(f"existence-probe/{split}")
        scores = {k: [] for k in ("present", *NEGATIVES)}
        for sc in scenes:
            with Image.open(data / "images" / sc["image"]) as im:
                image = im.convert("RGB")
            for kind, obj in questions(sc, colours, kinds, rng).items():
                prompt = prompt_for("pope", f"Is there {_article(obj)} in the image?")
                text = build_chat_prompt(prompt, 1, model.config.image_token)
                embeds = model.prompt_embeds(text, [image], [prompt] if model.instruction is not None else None)
                logits = model.lm(inputs_embeds=embeds).logits[0, -1].float()
                scores[kind].append(float(logits[yes[0]] - logits[no[0]]))
        res[split] = summarise(scores)
        res[split]["mean_margin"] = {k: round(sum(v) / len(v), 3) for k, v in scores.items() if v}
        print(f"{split:8s} AUC " + "  ".join(f"{k} {v:.3f}" for k, v in res[split]["auc"].items()), flush=True)
    return {"mode": "lm", "checkpoint": str(args.checkpoint), **res}


# ----------------------------------------------------------------------------------------- features

def run_features(args) -> dict:
    import torch.nn as nn
    import torch.nn.functional as F

    from emma_mamba.models.vision import ImageProcessor, build_open_clip
    from emma_mamba.quickstart import clip_vision_config, load_quickstart_config

    data = Path(args.data)
    colours, kinds = world(data)
    vocab = [f"{c} {k}" for c in colours for k in kinds]
    vcfg = clip_vision_config(load_quickstart_config(args.config))
    vcfg.pretrained = str(args.clip)
    clip, pcfg = build_open_clip(vcfg)
    clip.eval()
    processor = ImageProcessor(pcfg)
    n_blocks = len(clip.visual.transformer.resblocks)

    @torch.no_grad()
    def load(split, n):
        scenes = json.loads((data / split / "scenes.json").read_text())[:n]
        feats = [[] for _ in range(n_blocks)]
        for i in range(0, len(scenes), 256):
            px = processor([data / "images" / s["image"] for s in scenes[i:i + 256]])
            out = clip.visual.forward_intermediates(px, indices=list(range(n_blocks)), intermediates_only=True,
                                                    output_fmt="NLC")["image_intermediates"]
            for b in range(n_blocks):
                feats[b].append(out[b])
        y = torch.zeros(len(scenes), len(vocab))
        for i, s in enumerate(scenes):
            for sh in s["shapes"]:
                y[i, vocab.index(f"{sh['colour']} {sh['kind']}")] = 1
        return [torch.cat(f) for f in feats], y, scenes

    ftr, ytr, _ = load("train", args.train_images)
    fte, _, scenes_te = load("heldout", args.images)
    res = {}
    for taps in [[b] for b in range(n_blocks)] + [list(range(n_blocks))]:
        xtr = torch.cat([ftr[t] for t in taps], -1)
        xte = torch.cat([fte[t] for t in taps], -1)
        torch.manual_seed(0)
        head = nn.Sequential(nn.LayerNorm(xtr.shape[-1]), nn.Linear(xtr.shape[-1], 128), nn.GELU(),
                             nn.Linear(128, len(vocab)))
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
        for _ in range(args.steps):
            i = torch.randint(0, len(xtr), (64,))
            loss = F.binary_cross_entropy_with_logits(head(xtr[i]).amax(1), ytr[i])  # max over patches
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            s = head(xte).amax(1)
        rng = random.Random("existence-probe/heldout")
        scores = {k: [] for k in ("present", *NEGATIVES)}
        for i, sc in enumerate(scenes_te):
            for kind, obj in questions(sc, colours, kinds, rng).items():
                scores[kind].append(float(s[i, vocab.index(obj)]))
        name = "blocks " + ",".join(map(str, taps))
        res[name] = summarise(scores)
        print(f"{name:14s} AUC " + "  ".join(f"{k} {v:.3f}" for k, v in res[name]["auc"].items()), flush=True)
    return {"mode": "features", "clip": str(args.clip), "config": str(args.config), "steps": args.steps,
            "train_images": args.train_images, "heldout": res}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    lm = sub.add_parser("lm", help="yes/no logit margin of a checkpoint")
    lm.add_argument("--checkpoint", required=True)
    fe = sub.add_parser("features", help="probe on frozen stage-0 CLIP patch features")
    fe.add_argument("--clip", required=True, help="open_clip state dict written by stage 0")
    fe.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"),
                    help="quickstart recipe whose model section built that CLIP")
    fe.add_argument("--steps", type=int, default=1500)
    fe.add_argument("--train-images", type=int, default=3000)
    for s in (lm, fe):
        s.add_argument("--data", required=True, help="a ShapesWorld folder (emma-mamba data shapes / quickstart)")
        s.add_argument("--images", type=positive_int, default=100, help="images per split scored")
        add_out(s, None, "JSON file for the results")
    args = parse_args(p, argv)
    torch.set_num_threads(1)
    res = run_lm(args) if args.mode == "lm" else run_features(args)
    res.update(**machine(torch.device("cpu"), 1), images=args.images, data=str(args.data))
    write_result(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
