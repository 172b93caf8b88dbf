"""`emma-mamba info`: parameter report of a model config, per module and per training stage.

The model is built on the meta device (shapes only: no memory, no init, no weight files read), so even the
2.8B preset reports instantly. A training recipe (stage, data, train, ... at the top: ``stage`` may be left out)
reports the model it trains and what that run trains (its train.trainable, and its train.lora adapters in place
of the LM unless --lora is given). Columns: total parameters, and those trainable in stage 1 (``pretrain``:
MFF, instruction fusion, projector) and stage 2 (``finetune``: also the LM and the alignment head). Tied
weights count once. The summary states what MFF and instruction fusion add, as a share of the whole model.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help=f"named preset ({', '.join(PRESETS)}); default tiny")
    src.add_argument("--config", default=None,
                     help="model config YAML (strict overrides of a preset), a training recipe (the model it trains; "
                          "a shipped recipe by name too), or a checkpoint directory (its config.yaml)")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="also count stage 2 with LoRA adapters of rank R on the LM (train.lora.r)")
    parser.add_argument("--lora-targets", nargs="+", default=None, metavar="PROJ",
                        help="mixer projections with an adapter (train.lora.targets; default the LM's: in_proj x_proj "
                             "out_proj for Mamba-1, in_proj out_proj for Mamba-2)")
    parser.add_argument("--lora-embeddings", action="store_true",
                        help="with --lora: the token embedding (and head) trained too (train.lora.train_embeddings)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


ROW_MODULE = {"vision": "vision", "vision.second_encoder": "vision", "mff": "mff", "instruction.fusion": "instruction",
              "projector": "projector", "lm": "lm", "align_head": "align_head"}
"""parameter_counts' rows -> the train.trainable name that trains them (the text tower: never)."""


def report(cfg, lora_r: int = 0, lora_targets=None, lora_embeddings: bool = False,
           recipe: dict | None = None) -> dict:
    """Counts of a config's model (built on the meta device): {'modules': {...}, 'total': {...}, ...}; with
    ``lora_r`` also 'lora': the adapters' count and stage 2's trainable count with them (LM frozen; with
    ``lora_embeddings`` but its token embedding and head; ``lora_targets`` None: the LM's default targets).
    ``recipe``: {'stage', 'trainable'} of a training recipe: 'recipe' in the report adds what that run trains
    (its train.trainable, or its stage's default; with LoRA, the LM's adapters instead of the LM)."""
    import torch

    from emma_mamba.models.vlm import EmmaMamba

    model = EmmaMamba(cfg, for_training=True, device=torch.device("meta"))
    rows = model.parameter_counts()
    total = {k: sum(r[k] for r in rows.values()) for k in ("total", "pretrain", "finetune")}
    fusion = rows.get("instruction.fusion", {}).get("total", 0)
    tower = rows.get("instruction.text_tower", {}).get("total", 0)
    mff = rows["mff"]["total"]
    from emma_mamba.training.flops import image_flops, lm_flops_per_position

    flops = {}
    for stage in ("pretrain", "finetune"):  # a training step's model FLOPs (emma_mamba.training.flops)
        model.set_stage(stage)
        flops[stage] = {"per_lm_position": lm_flops_per_position(model.lm), "per_image": image_flops(model)}
    lora = None
    if lora_r:
        from emma_mamba.models.lora import DEFAULT_TARGETS, apply_lora

        lora_targets = tuple(lora_targets or DEFAULT_TARGETS[cfg.lm.ssm_layer])
        apply_lora(model.lm, lora_r, 2.0 * lora_r, lora_targets)
        adapters = sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" in n)
        emb = 0
        if lora_embeddings:
            heads = [model.lm.embeddings] + ([model.lm.lm_head] if model.lm.lm_head is not None else [])
            emb = sum(m.weight.numel() for m in heads)
        lora = {"r": lora_r, "targets": list(lora_targets), "adapter_params": adapters, "embedding_params": emb,
                "finetune": total["finetune"] - rows["lm"]["finetune"] + adapters + emb,
                "flops_per_lm_position": lm_flops_per_position(model.lm)}
    if recipe is not None:  # what this run trains: its train.trainable, or the stage's default (parameter_counts)
        stage, trainable = recipe["stage"], recipe.get("trainable")
        if trainable is None:
            trained = {name: r[stage] for name, r in rows.items()}
        else:
            trained = {name: (r["finetune"] if ROW_MODULE.get(name) == "vision" else r["total"])
                       if ROW_MODULE.get(name) in trainable else 0 for name, r in rows.items()}
        n = sum(trained.values())
        if lora is not None and trained.get("lm"):  # the LM frozen under its adapters
            n += lora["adapter_params"] + lora["embedding_params"] - trained["lm"]
        recipe = {"stage": stage, "trainable": None if trainable is None else list(trainable),
                  "lora": bool(lora is not None and trained.get("lm")), "trained": n}
    return {
        "config": cfg.name,
        "vision": cfg.vision.model_name,
        "vision_blocks": model.vision.n_blocks,
        "vision_overridden": bool(cfg.vision.open_clip_overrides),  # the named architecture, resized
        "visual_tokens": model.vision.num_tokens,
        "taps": model.vision.taps,
        "second_encoder": cfg.vision.second_encoder.timm_model,
        "second_encoder_taps": model.vision.second_taps,
        "vision_width": model.vision.width,  # the fused features' (both towers' with a second encoder)
        "open_clip_width": model.vision.open_clip_width,
        "modules": rows,
        "total": total,
        "mff_share": mff / total["total"],
        "instruction_fusion_share": fusion / total["total"],
        "instruction_text_tower_share": tower / total["total"],
        "lora": lora,
        # storage: the weights at each width (export's inference model leaves the alignment head out) and what
        # AdamW keeps per trained parameter (an fp32 weight, its gradient and two moments: 16 bytes)
        "bytes": {"weights_fp32": 4 * total["total"], "weights_bf16": 2 * total["total"],
                  "inference_bf16": 2 * (total["total"] - rows.get("align_head", {}).get("total", 0)),
                  "adamw_pretrain": 16 * total["pretrain"], "adamw_finetune": 16 * total["finetune"]},
        "flops": flops,
        "recipe": recipe,
    }


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}" if unit == "B" else f"{n / div:.2f}{unit}"
    return str(n)


def _flops(x: float) -> str:
    for unit, div in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g} FLOP"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _is_recipe(doc: dict) -> bool:
    """Whether a YAML mapping is a training recipe (a run config: stage, data, train, ... at the top; ``stage``
    may be left out, pretrain's default) rather than a model config."""
    import dataclasses

    from emma_mamba.training.config import RunConfig

    return bool(set(doc) & {f.name for f in dataclasses.fields(RunConfig)})


def lm_folder_message(path) -> str:
    """What a language-model folder (config.json: a Mamba LM in mamba-ssm's or transformers' layout) passed as
    ``--config`` is, and the ``model.lm`` settings an EMMA-Mamba model needs to take it as ``lm.pretrained``
    (every shape field must match the checkpoint's)."""
    import torch

    from emma_mamba.models.mamba import CheckpointError, MambaLM, config_from_dir
    from emma_mamba.models.vlm import lm_match_fields

    head = (f"--config {path} is a language-model folder (config.json), not an EMMA-Mamba model config, "
            f"training recipe or checkpoint")
    try:
        lm, layout = config_from_dir(path)
    except CheckpointError as e:
        return f"{head}, and it does not read as a Mamba LM: {e}"
    model = MambaLM(lm, device=torch.device("meta"))
    n = sum(p.numel() for p in model.parameters())  # (a tied head counted once, as parameters() yields it)
    values = {k: getattr(lm, k) for k in lm_match_fields(lm)}
    if lm.ssm_layer != "mamba2":
        values["dt_rank"] = lm.resolved_dt_rank
    def word(v):  # as YAML reads it back: true / false, and a float with a point ("1.0e-05", not "1e-05": a string)
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            mant, _, exp = repr(v).partition("e")
            return f"{mant if '.' in mant else mant + '.0'}{'e' + exp if exp else ''}"
        return v

    opts = " ".join(f"--model.lm.{k} {word(v)}" for k, v in values.items())
    kind = "Mamba-2" if lm.ssm_layer == "mamba2" else "Mamba"
    return (f"{head}: a {kind} LM ({layout} layout), d_model {lm.d_model} x {lm.n_layer} layers, {_fmt(n)} "
            f"parameters. An EMMA-Mamba model takes it as --model.lm.pretrained {path} with its shape: {opts}")


def run(args) -> int:
    from pathlib import Path

    from emma_mamba.config import get_preset, load_config, read_yaml_mapping, resolve_config_path

    path = Path(args.config) if args.config else None
    if path is not None and path.is_dir() and (path / "config.json").is_file() \
            and not (path / "config.yaml").is_file():
        print(f"emma-mamba info: {lm_folder_message(path)}", file=sys.stderr)
        return 2
    if path is not None and path.is_dir():  # a checkpoint or run directory: its resolved config
        path = path / "config.yaml"
    elif path is not None:
        path = resolve_config_path(path)  # a shipped recipe by name, as the training commands take it
    recipe = None
    doc = read_yaml_mapping(path) if path is not None else {}
    if {"stage1", "stage2", "clip"} & set(doc):
        print(f"emma-mamba info: --config {path}: a quickstart config (emma-mamba quickstart --config), not a model "
              f"config, training recipe or checkpoint directory", file=sys.stderr)
        return 2
    if path is None:
        cfg = get_preset(args.preset or "tiny")
    elif _is_recipe(doc):  # a training recipe: the model it trains (its model or init_from)
        from emma_mamba.training.config import load_run_config

        run_cfg = load_run_config(path)
        cfg = run_cfg.model
        recipe = {"stage": run_cfg.stage, "trainable": run_cfg.train.trainable}
        lo = run_cfg.train.lora
        if lo.r and not (args.lora or args.lora_targets or args.lora_embeddings):  # the recipe's, unless asked
            args.lora, args.lora_targets, args.lora_embeddings = lo.r, lo.targets, lo.train_embeddings
    else:
        cfg = load_config(path)
    if args.lora < 0:
        raise SystemExit("emma-mamba info: --lora must be >= 0")
    try:
        for flag, given in (("--lora-embeddings", args.lora_embeddings), ("--lora-targets", args.lora_targets)):
            if given and not args.lora:
                raise ValueError(f"{flag} goes with --lora R")
        if args.lora:  # the training config's rules (distinct, the LM's own projections), named as given here
            from emma_mamba.models.lora import check_targets

            check_targets(args.lora_targets, cfg.lm.ssm_layer, key="--lora-targets")
        rep = report(cfg, args.lora, args.lora_targets, args.lora_embeddings, recipe)
    except ValueError as e:  # bad --lora options: a usage error, exit 2 as the training commands' config errors
        print(f"emma-mamba info: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    tot = rep["total"]["total"]
    second = (f" + {rep['second_encoder']} taps {rep['second_encoder_taps']} (concatenated, width "
              f"{rep['vision_width']})" if rep["second_encoder"] else "")
    vit = rep["vision"]
    if rep["vision_overridden"]:  # say what was built (the tiny preset's 3 blocks), not only the name it started from
        vit += f" (resized by open_clip_overrides: {rep['vision_blocks']} blocks of width {rep['open_clip_width']})"
    print(f"{rep['config']}: {vit} taps {rep['taps']}{second} -> {rep['visual_tokens']} visual tokens, "
          f"{'Mamba-2' if cfg.lm.ssm_layer == 'mamba2' else 'Mamba'} LM d_model {cfg.lm.d_model} x {cfg.lm.n_layer} "
          f"layers")
    print(f"{'module':<26}{'params':>12}{'% of total':>12}{'stage1 train':>14}{'stage2 train':>14}")
    for name, r in rep["modules"].items():
        print(f"{name:<26}{_fmt(r['total']):>12}{100 * r['total'] / tot:>11.3f}%"
              f"{_fmt(r['pretrain']):>14}{_fmt(r['finetune']):>14}")
    t = rep["total"]
    print(f"{'total':<26}{_fmt(t['total']):>12}{100.0:>11.3f}%{_fmt(t['pretrain']):>14}{_fmt(t['finetune']):>14}")
    print(f"MFF adds {100 * rep['mff_share']:.4f}% of the parameters; instruction fusion adds "
          f"{100 * rep['instruction_fusion_share']:.4f}% trainable (+ {100 * rep['instruction_text_tower_share']:.3f}% "
          f"frozen text tower)")
    by = rep["bytes"]
    print(f"weights: {_bytes(by['weights_fp32'])} in fp32, {_bytes(by['weights_bf16'])} in bf16 / fp16 "
          f"({_bytes(by['inference_bf16'])} exported for inference, without the alignment head); AdamW's fp32 "
          f"weight, gradient and two moments of the trained parameters: stage 1 {_bytes(by['adamw_pretrain'])}, "
          f"stage 2 {_bytes(by['adamw_finetune'])} (activations not counted)")
    fl = rep["flops"]
    print("training-step model FLOPs (matmuls, forward + backward): stage 1 "
          f"{_flops(fl['pretrain']['per_lm_position'])} per LM position + {_flops(fl['pretrain']['per_image'])} "
          f"per image; stage 2 "
          f"{_flops(fl['finetune']['per_lm_position'])} + {_flops(fl['finetune']['per_image'])}")
    rc = rep["recipe"]
    if rc:
        which = (f"train.trainable {', '.join(rc['trainable'])}" if rc["trainable"] is not None else
                 "the stage's default modules")
        print(f"this recipe trains (stage {rc['stage']}, {which}{', LoRA on the LM' if rc['lora'] else ''}): "
              f"{_fmt(rc['trained'])} parameters")
    lo = rep["lora"]
    if lo:
        full = t["finetune"]
        emb = f" + {_fmt(lo['embedding_params'])} embedding" if lo["embedding_params"] else ""
        print(f"stage 2 with LoRA r={lo['r']} on {', '.join(lo['targets'])}: {_fmt(lo['adapter_params'])} adapter "
              f"parameters{emb}, {_fmt(lo['finetune'])} trained ({100 * lo['finetune'] / full:.1f}% of full stage 2); "
              f"AdamW's fp32 weight, gradient and two moments: {_bytes(16 * lo['finetune'])} vs "
              f"{_bytes(16 * full)}; {_flops(lo['flops_per_lm_position'])} per LM position")
    return 0
