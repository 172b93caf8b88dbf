"""`emma-mamba info`: parameter report of a model config, per module and per training stage.

The model is built on the meta device (shapes only: no memory, no init, no weight files read), so even the
2.8B preset reports instantly. Columns: total parameters, and those trainable in stage 1 (``pretrain``:
MFF, instruction fusion, projector) and stage 2 (``finetune``: also the LM and the alignment head). Tied
weights count once. The summary states what MFF and instruction fusion add, as a share of the whole model.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help="named preset (tiny, emma-mamba-2.8b, emma-mamba-2.8b-dinosiglip, cobra-like); default tiny")
    src.add_argument("--config", default=None,
                     help="model config YAML (strict overrides of a preset), or a checkpoint directory (its config.yaml)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def report(cfg) -> dict:
    """Counts of a config's model (built on the meta device): {'modules': {...}, 'total': {...}, ...}."""
    import torch

    from emma_mamba.models.vlm import EmmaMamba

    model = EmmaMamba(cfg, for_training=True, device=torch.device("meta"))
    rows = model.parameter_counts()
    total = {k: sum(r[k] for r in rows.values()) for k in ("total", "pretrain", "finetune")}
    fusion = rows.get("instruction.fusion", {}).get("total", 0)
    tower = rows.get("instruction.text_tower", {}).get("total", 0)
    mff = rows["mff"]["total"]
    return {
        "config": cfg.name,
        "vision": cfg.vision.model_name,
        "visual_tokens": model.vision.num_tokens,
        "taps": model.vision.taps,
        "second_encoder": cfg.vision.second_encoder.timm_model,
        "second_encoder_taps": model.vision.second_taps,
        "vision_width": model.vision.width,
        "modules": rows,
        "total": total,
        "mff_share": mff / total["total"],
        "instruction_fusion_share": fusion / total["total"],
        "instruction_text_tower_share": tower / total["total"],
    }


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}" if unit == "B" else f"{n / div:.2f}{unit}"
    return str(n)


def run(args) -> int:
    from pathlib import Path

    from emma_mamba.config import get_preset, load_config

    path = Path(args.config) if args.config else None
    if path is not None and path.is_dir():  # a checkpoint or run directory: its resolved config
        path = path / "config.yaml"
    cfg = load_config(path) if path is not None else get_preset(args.preset or "tiny")
    rep = report(cfg)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    tot = rep["total"]["total"]
    second = (f" + {rep['second_encoder']} taps {rep['second_encoder_taps']} (concatenated, width "
              f"{rep['vision_width']})" if rep["second_encoder"] else "")
    print(f"{rep['config']}: {rep['vision']} taps {rep['taps']}{second} -> {rep['visual_tokens']} visual tokens, "
          f"Mamba LM d_model {cfg.lm.d_model} x {cfg.lm.n_layer} layers")
    print(f"{'module':<26}{'params':>12}{'% of total':>12}{'stage1 train':>14}{'stage2 train':>14}")
    for name, r in rep["modules"].items():
        print(f"{name:<26}{_fmt(r['total']):>12}{100 * r['total'] / tot:>11.3f}%"
              f"{_fmt(r['pretrain']):>14}{_fmt(r['finetune']):>14}")
    t = rep["total"]
    print(f"{'total':<26}{_fmt(t['total']):>12}{100.0:>11.3f}%{_fmt(t['pretrain']):>14}{_fmt(t['finetune']):>14}")
    print(f"MFF adds {100 * rep['mff_share']:.4f}% of the parameters; instruction fusion adds "
          f"{100 * rep['instruction_fusion_share']:.4f}% trainable (+ {100 * rep['instruction_text_tower_share']:.3f}% "
          f"frozen text tower)")
    return 0
