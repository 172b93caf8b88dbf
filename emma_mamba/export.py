"""`emma-mamba export`: a checkpoint as a model to share or to serve elsewhere.

    emma-mamba export --checkpoint runs/finetune/checkpoints/step_00001000 --out release/ --dtype bf16
    emma-mamba export --checkpoint runs/finetune --out release-lm/ --lm-only

Reads any checkpoint ``emma_mamba.load`` reads (a run's final directory, a full or sharded step checkpoint, a
LoRA run's, whose adapters are merged) and writes:

* by default the EmmaMamba layout (config.yaml, model.safetensors, tokenizer.json) for inference: the alignment
  head, a training-time loss only, is left out unless ``--keep-align-head`` (to train on from it);
* with ``--lm-only`` the language model alone in transformers' layout (config.json, model.safetensors,
  tokenizer.json): ``MambaForCausalLM.from_pretrained(OUT)`` (a Mamba-2 LM: ``Mamba2ForCausalLM``) loads it,
  so text-only tools that take a transformers model (lm-evaluation-harness's ``hf`` model, vLLM) run the
  fine-tuned LM directly. Its vocabulary keeps the ``<image>`` token the model added; image prompts still need
  ``emma-mamba`` (the vision side).

Both write a model card, ``README.md`` (the Hugging Face Hub's front matter, then what the model is: its
parts and their parameter counts, the storage dtype, the training run it came from as its run directory records
it (``train_config.yaml``, ``metrics.jsonl``: stage, data, steps, final losses) and how to run it), to be edited
before sharing: it says nothing the files do not.

``--dtype bf16`` / ``fp16`` stores the weights in half precision (half the size; ``emma_mamba.load`` casts them
back to the model's dtype) except the SSM parameters ``A_log``, ``D`` and the dt bias (``dt_proj.bias``; Mamba-2:
``dt_bias``), kept in fp32 as
mamba-ssm keeps them under mixed precision (their rounding moves the recurrence's decay). An existing non-empty
``--out`` is refused (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from emma_mamba.fileio import text_lines

KEEP_FP32 = ("A_log", "D", "dt_proj.bias", "dt_bias")
"""Parameter names ending so stay fp32 in a half-precision export."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory (final, step, sharded or LoRA run)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not hold files)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights' storage dtype (default %(default)s; the SSM's A_log, D, dt bias stay fp32)")
    p.add_argument("--keep-align-head", action="store_true",
                   help="keep the pixel-wise alignment head's weights (to train on; inference never reads them)")
    p.add_argument("--lm-only", action="store_true",
                   help="write only the language model, in transformers' MambaForCausalLM layout "
                        "(Mamba2ForCausalLM for a Mamba-2 LM)")


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    return {k: (v if k.endswith(KEEP_FP32) or not v.is_floating_point() else v.to(dtype)).contiguous()
            for k, v in sd.items()}


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", keep_align_head: bool = False,
           lm_only: bool = False) -> Path:
    """Write ``checkpoint`` to ``out`` (see the module docstring); returns ``out``."""
    from emma_mamba.models.vlm import has_align_head_weights, load

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory; give a new one")
    if keep_align_head and lm_only:
        raise ValueError("--keep-align-head and --lm-only exclude each other (the LM alone has no alignment head)")
    ck = Path(checkpoint)
    if (ck / "config.json").is_file() and not (ck / "config.yaml").is_file():
        # a Mamba LM folder (state-spaces or transformers layout): not what `load` reads; say what converts it
        raise ValueError(f"--checkpoint {checkpoint} is a language-model folder (config.json), not an EMMA-Mamba "
                         f"checkpoint (config.yaml); export reads EMMA-Mamba checkpoints. To write a Mamba LM in "
                         f"transformers' layout: MambaLM.from_pretrained(DIR).save_pretrained(OUT, layout=\"hf\") "
                         f"(emma_mamba.models.mamba; layout=\"original\" for mamba-ssm's)")
    if keep_align_head and not has_align_head_weights(checkpoint):
        raise ValueError(f"--keep-align-head: {checkpoint} holds no alignment-head weights")
    model = load(checkpoint, for_training=keep_align_head)
    out.mkdir(parents=True, exist_ok=True)
    if lm_only:
        _export_lm(model, out, dtype)
        (out / "README.md").write_text(model_card(model, checkpoint, out, dtype, lm_only=True), encoding="utf-8")
        return out
    sd = {k: v for k, v in model.state_dict().items() if keep_align_head or not k.startswith("align_head.")}
    write_model_dir(model, out, sd, dtype, {"exported_from": str(checkpoint)})
    (out / "README.md").write_text(model_card(model, checkpoint, out, dtype, lm_only=False), encoding="utf-8")
    return out


def _run_record(checkpoint: Path) -> tuple[dict | None, list[dict]]:
    """The training run a checkpoint came from: its ``train_config.yaml`` (in the checkpoint directory, or the run
    directory above a step checkpoint) and the records of its ``metrics.jsonl`` up to the checkpoint's step."""
    import yaml

    for d in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        cfg_file = d / "train_config.yaml"
        if not cfg_file.is_file():
            continue
        try:
            cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            return None, []
        if not isinstance(cfg, dict):
            return None, []
        rows = []
        metrics = d / "metrics.jsonl"
        if not metrics.is_file() and d == checkpoint and checkpoint.parent.name == "checkpoints":
            # a step checkpoint holds its own train_config.yaml (save_checkpoint); the metrics are the run's
            metrics = checkpoint.parent.parent / "metrics.jsonl"
        if metrics.is_file():
            for line in text_lines(metrics.read_text(encoding="utf-8", errors="replace")):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: the rest still counts
                    continue
                if isinstance(rec, dict):
                    rows.append(rec)
        step = checkpoint.name.rsplit("_", 1)[-1]
        if metrics.parent != checkpoint and step.isdigit():  # a step checkpoint: the records up to its step
            rows = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= int(step)]
        return cfg, rows
    return None, []


def model_card(model, checkpoint: str | Path, out: Path, dtype: str, lm_only: bool) -> str:
    """The README.md of an exported model (see the module docstring): facts read from the model and from the
    training run's own records only."""
    import datetime

    from emma_mamba import __version__
    from emma_mamba.info import _fmt  # the parameter counts as `emma-mamba info` prints them

    cfg, checkpoint = model.config, Path(checkpoint).resolve()
    lm = cfg.lm
    mamba2 = getattr(lm, "ssm_layer", "mamba1") == "mamba2"
    kind, arch = ("Mamba-2", "Mamba2ForCausalLM") if mamba2 else ("Mamba", "MambaForCausalLM")
    heads = (f", {lm.d_model * lm.expand // lm.headdim} heads of {lm.headdim} channels, {lm.ngroups} B/C "
             f"group{'s' if lm.ngroups != 1 else ''}" if mamba2 else "")
    lm_line = (f"{kind}, d_model {lm.d_model}, {lm.n_layer} layers, d_state {lm.d_state}{heads}, vocabulary "
               f"{lm.vocab_size}")
    front = ["---", "library_name: " + ("transformers" if lm_only else "emma-mamba"),
             "pipeline_tag: " + ("text-generation" if lm_only else "image-text-to-text"),
             "tags:", "- mamba", "- emma-mamba"] + ([] if lm_only else ["- multimodal"]) + ["---", ""]
    what = (f"The language model of an EMMA-Mamba checkpoint, in transformers' `{arch}` layout (its "
            "vocabulary keeps the `<image>` token; image prompts need the whole model)." if lm_only else
            "An EMMA-Mamba model: a Mamba language model fed by a vision encoder's intermediate layers, fused "
            "(multi-scale feature fusion) and conditioned on the instruction, through a projector.")
    lines = front + [f"# {out.name}", "", what, "",
                     f"Exported by emma-mamba {__version__} on {datetime.date.today().isoformat()} from "
                     f"`{checkpoint}`; weights stored as {dtype}" + ("" if dtype == "fp32" else
                                                                  " (the SSM's A_log, D and dt bias in fp32)") + ".",
                     "", "## Architecture", ""]
    if lm_only:
        n = sum(p.numel() for p in model.lm.parameters())
        lines += [f"- {lm_line}: {_fmt(n)} parameters (tied embedding and head counted once)."]
    else:
        rows = model.parameter_counts()
        v = cfg.vision
        what_part = {
            "vision": f"open_clip `{v.model_name}`, taps {list(model.vision.taps)}"
                      + (" (frozen in training)" if v.freeze else " (trained in stage 2)"),
            "vision.second_encoder": f"timm `{v.second_encoder.timm_model}`, taps {list(model.vision.second_taps)}",
            "mff": f"multi-scale feature fusion, mode `{cfg.mff.mode}`",
            "instruction.text_tower": "the CLIP text tower encoding the instruction (frozen)",
            "instruction.fusion": "instruction-aware fusion",
            "projector": f"{cfg.projector.kind}, depth {cfg.projector.depth}",
            "lm": lm_line,
            "align_head": "pixel-wise alignment head (a training-time loss; kept to train on)",
        }
        lines += ["| part | what | parameters |", "| --- | --- | --- |"]
        for name, counts in rows.items():
            lines.append(f"| {name} | {what_part.get(name, '')} | {_fmt(counts['total'])} |")
        total = sum(r["total"] for r in rows.values())
        lines += [f"| total | | {_fmt(total)} |", "",
                  f"{model.vision.num_tokens} visual tokens per image; images preprocessed with resize mode "
                  f"`{v.image_resize}`, their tokens placed `{v.image_position}`."
                  + ("" if "align_head" in rows else " The alignment head, a training-time loss, is not included.")]
    run, metrics = _run_record(checkpoint)
    lines += ["", "## Training", ""]
    if run is None:
        lines.append("No training record (`train_config.yaml`) was found beside the checkpoint.")
    else:
        data, train = run.get("data") or {}, run.get("train") or {}
        sources = data.get("sources") or ([{"json": data.get("json")}] if data.get("json") else [])
        files = ", ".join(f"`{Path(str(s.get('json'))).name}`" for s in sources if isinstance(s, dict))
        lines.append(f"- stage: `{run.get('stage')}`" + (f", from `{run['init_from']}`" if run.get("init_from")
                                                          else ""))
        if files:
            lines.append(f"- data: {files}; max_length {data.get('max_length')}, packing {data.get('packing')}")
        lines.append(f"- optimisation: lr {train.get('lr')} ({train.get('schedule')}), global batch "
                     f"{train.get('global_batch_size')}, weight decay {train.get('weight_decay')}"
                     + (f", LoRA r {train['lora'].get('r')}" if isinstance(train.get("lora"), dict)
                        and train["lora"].get("r") else ""))
        steps = [r for r in metrics if "loss" in r]
        if steps:
            last = steps[-1]
            lines.append(f"- trained {last.get('step')} steps ({last.get('total_tokens', '?')} tokens); last logged "
                         f"loss {last['loss']:.4g}" + (f" (lm {last['lm_loss']:.4g})" if "lm_loss" in last else ""))
        vals = [r for r in metrics if "val_loss" in r]
        if vals:
            lines.append(f"- validation at step {vals[-1].get('step')}: loss {vals[-1]['val_loss']:.4g}"
                         + (f", token accuracy {vals[-1]['val_token_acc']:.4g}" if "val_token_acc" in vals[-1]
                            else ""))
    lines += ["", "## Use", ""]
    if lm_only:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{out.name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{out.name}")', "```"]
    else:
        lines += ["```bash", "# emma-mamba installed (its README: Set-up), then:",
                  f"emma-mamba chat --checkpoint {out.name} --image photo.jpg",
                  f"emma-mamba serve --checkpoint {out.name}   # an OpenAI-compatible API",
                  "```", "", "```python", "import emma_mamba", f'model = emma_mamba.load("{out.name}")', "```"]
    return "\n".join(lines) + "\n"


def _refuse_overflow(cast: dict[str, torch.Tensor], dtype: str) -> None:
    """ValueError naming the tensors (already cast to ``dtype``) that are not finite: a weight beyond the storage
    dtype's range (fp16's 65504)."""
    bad = [k for k, v in cast.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{len(bad)} tensors overflow {dtype} ({', '.join(bad[:4])}); use --dtype bf16 or fp32")


def write_model_dir(model, out: Path, sd: dict, dtype: str, metadata: dict) -> None:
    """``model``'s EmmaMamba layout in ``out`` (config.yaml, model.safetensors, tokenizer.json) with the weights
    ``sd`` stored in ``dtype`` (KEEP_FP32 stay fp32); a weight the storage dtype cannot hold (fp16 beyond 65504)
    is refused by name, before anything is written."""
    from emma_mamba import __version__
    from emma_mamba.config import save_config
    from emma_mamba.fileio import save_safetensors
    from emma_mamba.models.vlm import CONFIG_NAME, WEIGHTS_NAME, _drop_tied_aliases

    sd = _cast(_drop_tied_aliases(model, sd), DTYPES[dtype])  # safetensors refuses shared storage
    _refuse_overflow(sd, dtype)
    save_config(model.config, out / CONFIG_NAME)
    save_safetensors(sd, str(out / WEIGHTS_NAME),
                     metadata={"format": "pt", "emma_mamba": __version__, "dtype": dtype, **metadata})
    model.tokenizer.save(out)


def _export_lm(model, out: Path, dtype: str) -> None:
    """The LM in transformers' layout, with the model's tokenizer as transformers loads it verbatim
    (``tokenizer_config.json``: PreTrainedTokenizerFast over tokenizer.json) and its special-token ids."""
    if dtype != "fp32":  # cast in place before the one write (the model was loaded for this export)
        lm = model.lm
        tensors = {name: t for name, t in list(lm.named_parameters()) + list(lm.named_buffers())
                   if t.is_floating_point() and not name.endswith(KEEP_FP32)}
        cast = {name: t.detach().to(DTYPES[dtype]) for name, t in tensors.items()}
        # a weight the storage dtype cannot hold (fp16 beyond 65504) is refused by name, as write_model_dir does
        _refuse_overflow({f"lm.{name}": t for name, t in cast.items()}, dtype)
        for name, t in tensors.items():
            t.data = cast[name]
    model.lm.save_pretrained(out, layout="hf")  # config.json's dtype: the embedding's, the export dtype
    conf = json.loads((out / "config.json").read_text())
    tok = model.tokenizer
    conf.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    tok.save(out)
    _drop_tokens_past_the_vocabulary(out / "tokenizer.json", conf["vocab_size"])
    name = tok.backend.id_to_token
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name(tok.eos_token_id),
        "bos_token": name(tok.eos_token_id), "pad_token": name(tok.pad_token_id), "add_bos_token": False,
        "model_max_length": 1 << 30}, indent=2) + "\n")


def _drop_tokens_past_the_vocabulary(path: Path, vocab_size: int) -> None:
    """Leave out of an exported LM's tokenizer.json the added tokens whose ids its embedding has no row for: the
    VLM's input-only ``<image>`` placeholder, beyond an LM of exactly the tokenizer's size (50277 rows, no padding;
    with padding rows it maps onto one, untrained, as documented), which transformers' forward would index out of
    range. Its text then tokenises as the words it spells."""
    data = json.loads(path.read_text(encoding="utf-8"))
    past = [t for t in data.get("added_tokens", []) if t["id"] >= vocab_size]
    if not past:
        return
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    print(f"emma-mamba export: left {', '.join(t['content'] for t in past)} out of the tokenizer: the LM's "
          f"{vocab_size} embedding rows have none for {'it' if len(past) == 1 else 'them'}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        out = export(args.checkpoint, args.out, args.dtype, args.keep_align_head, args.lm_only)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"emma-mamba export: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(f"wrote {out} ({size / 2**20:.1f} MiB of weights, {args.dtype}"
          f"{', the language model in transformers layout' if args.lm_only else ''})")
    return 0
