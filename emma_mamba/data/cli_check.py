"""`emma-mamba data check`: check a run's data before spending GPU hours on it.

Reads the run config as ``pretrain`` / ``finetune`` do (the recipe, ``--model``, ``--SECTION.KEY`` overrides),
builds the model on the meta device for its tokenizer, image placeholder, visual-token count and image
preprocessing (no weights are read), then checks the training file (and ``val.json`` with ``--val``):

* every record validated and tokenised exactly as training does, with ``on_error`` forced to ``skip`` so that
  every problem is counted, not only the first; per reason, the count and the first records named;
* every distinct image file opened, decoded and preprocessed, in ``--workers`` processes (a missing file or
  one PIL cannot decode is what would stop, or be skipped by, a run hours in);
* lengths in LM positions (visual tokens included): percentiles, what ``data.max_length`` truncates, and the
  instructions (with instruction fusion) longer than the text tower's context, which it truncates;
* the rows an epoch makes (``data.packing``) and the optimizer steps per epoch at ``train.global_batch_size``
  (rows: packed, the samples a step holds on average), the share of computed positions that are real (packed
  rows, or padded micro-batches of ``train.micro_batch_size`` as ``data.group_by_length`` forms them);
  with several files (``data.sources``) each is checked and reported on its own, then the epoch of the mixture
  (each file's samples ``repeat`` times, as training takes them).

Records a run keeps but that are probably not what was meant are listed as notes (duplicate ids, duplicate
records, empty answers, images far smaller than the encoder's input; ``emma_mamba.data.llava.NOTES``).

Prints a summary, writes it as JSON with ``--report FILE``, and exits 1 when a record would be skipped or an
image fails (so it can gate a job script), or with ``--strict`` when anything is noted, else 0. ``--write-clean FILE`` writes the training file's usable
records, unchanged and in order, for a run that should not skip: as JSONL when FILE ends in ``.jsonl``, else as a
JSON list (the format training reads a file's name as); an existing FILE only with ``--overwrite``, written whole or
not at all. ``--report`` and ``--write-clean`` are checked before the work (a folder, a missing parent folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from emma_mamba.cli import positive_int
    from emma_mamba.training.cli_train import add_override_arguments

    p.allow_abbrev = False
    p.usage = (f"{p.prog} --config YAML [--model NAME|YAML] [--val] [--workers N] [--no-images] [--report FILE] "
               f"[--write-clean FILE [--overwrite]] [--strict] [--SECTION.KEY VALUE ...]")
    p.add_argument("--config", required=True, help="run YAML (configs/train_*.yaml, or a shipped recipe's name)")
    p.add_argument("--model", dest="_model", default=None, metavar="NAME|YAML",
                   help="replace the recipe's model, as for pretrain/finetune")
    p.add_argument("--val", action="store_true", help="also check val.json")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes decoding images (default: all CPUs)")
    p.add_argument("--no-images", action="store_true", help="records only: do not open the image files")
    p.add_argument("--report", default=None, help="write the summary as JSON here")
    p.add_argument("--write-clean", default=None, metavar="FILE",
                   help="write the training file's usable records (unchanged; JSONL if FILE ends in .jsonl, else "
                        "a JSON list) here")
    p.add_argument("--overwrite", action="store_true", help="let --write-clean replace an existing file")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 also when records are only noted (duplicates, empty answers, small images)")
    add_override_arguments(p)


_PROCESSORS: dict = {}  # per worker process: preprocess config -> ImageProcessor


SMALL_IMAGE_FACTOR = 8  # a side this many times below the encoder's input side is noted (small_image)


def _check_image(args) -> tuple[str, str | None, str | None, tuple[int, int] | None]:
    """(path, None, None, (width, height)) when the image decodes and preprocesses as training's loader does
    it, else (path, reason, message, None)."""
    path, preprocess_cfg = args
    from PIL import Image

    from emma_mamba.data.llava import DataError, preprocess_image
    from emma_mamba.models.vision import ImageProcessor

    key = json.dumps(preprocess_cfg, sort_keys=True, default=str)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = ImageProcessor(preprocess_cfg)
    try:
        preprocess_image(path, _PROCESSORS[key])
    except DataError as e:
        return path, e.reason, str(e), None
    with Image.open(path) as f:  # decoded above; this reads the header only
        return path, None, None, f.size


def _input_side(preprocess_cfg: dict) -> int:
    size = preprocess_cfg["size"]
    return min(size) if isinstance(size, (list, tuple)) else int(size)


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]  # nearest rank
    return {"min": v[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": v[-1],
            "mean": sum(v) / len(v)}


def check_file(cfg, data_cfg, model, workers: int | None, images: bool, progress: bool = True,
               usable: set | None = None, lengths_out: list | None = None) -> dict:
    """The report of one LLaVA file (see the module docstring); ``usable``, when given, receives the record
    indices a run would train on, ``lengths_out`` the lengths of the samples a run builds from the file."""
    from emma_mamba.data.llava import LlavaDataset

    ds = LlavaDataset.for_model(dataclasses.replace(data_cfg, on_error="skip"), model)
    rep = ds.report
    skipped = dict(rep.skipped)
    examples = {k: list(v) for k, v in rep.examples.items()}
    image_failures, n_failed, bad = {}, 0, {}
    paths = sorted({str(p) for s in ds.samples for p in s.images})
    if images and paths:
        failed_samples = {}
        jobs = [(p, model.image_processor.cfg) for p in paths]
        from tqdm.auto import tqdm

        chunk = max(1, min(256, len(jobs) // (64 * (workers or 8))))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_check_image, jobs, chunksize=chunk), total=len(jobs), unit="image",
                                desc=f"decoding {Path(data_cfg.json).name}'s images", disable=not progress,
                                dynamic_ncols=True))
        bad = {p: (reason, msg) for p, reason, msg, _ in results if reason is not None}
        side = _input_side(model.image_processor.cfg)
        small = {p: size for p, reason, _, size in results if reason is None and
                 min(size) * SMALL_IMAGE_FACTOR < side}
        for s in ds.samples:  # a kept record with an image the encoder sees upscaled more than 8x
            p = next((str(p) for p in s.images if str(p) in small), None)
            if p is not None:
                w, h = small[p]
                where = ds.where(s)
                rep.note("small_image", f"{where}: image {p} is {w}x{h} pixels, the encoder's input {side} "
                                        f"(upscaled more than {SMALL_IMAGE_FACTOR}x)", (s.source, s.index))
        for s in ds.samples:  # the records a run would skip (or stop at) for these images
            hit = next((bad[str(p)] for p in s.images if str(p) in bad), None)
            if hit is not None:
                failed_samples[hit[0]] = failed_samples.get(hit[0], 0) + 1
                shown = examples.setdefault(hit[0], [])
                if len(shown) < 5:
                    shown.append(f"{ds.where(s)}: {hit[1]}")
        for reason, n in failed_samples.items():
            skipped[reason] = skipped.get(reason, 0) + n
        n_failed = sum(failed_samples.values())
        image_failures = {"files": len(bad), "of_files": len(paths)}
    if usable is not None:
        usable.update(s.index for s in ds.samples if not any(str(p) in bad for p in s.images))
    lengths = ds.lengths  # the plan (rows, steps) counts every sample, as training's does until an image fails
    if lengths_out is not None:
        lengths_out.extend(lengths)
    kept = [s for s in ds.samples if not any(str(p) in bad for p in s.images)]  # what the statistics describe
    return {
        "file": str(ds.path), "records": rep.records, "usable": rep.samples - n_failed,
        "skipped": skipped, "examples": examples, "images_checked": len(paths) if images else 0,
        "image_failures": image_failures,
        "notes": dict(rep.notes), "noted_records": len(rep.noted),
        "note_examples": {k: list(v) for k, v in rep.note_examples.items()},
        "truncated": {"samples": rep.truncated, "positions": rep.truncated_tokens,
                      "answer_tokens": rep.truncated_answer_tokens, "images": rep.dropped_images},
        "max_length": data_cfg.max_length, "longest_before_truncation": rep.longest,
        "positions_per_sample": _percentiles([s.length for s in kept]),
        "images_per_sample": _percentiles([len(s.images) for s in kept]),
        "answer_tokens": sum(sum(1 for x in s.labels if x != -100) for s in kept),
        "text_only_samples": sum(1 for s in kept if not s.images),
        "instructions": _instruction_lengths(model, kept),
        **_epoch(cfg, data_cfg, lengths),
    }


def _instruction_lengths(model, samples) -> dict | None:
    """How many of the samples' instructions (one per image: its turn's text) instruction fusion truncates to the
    text tower's context, counted by its tokenizer as training's InstructionFusion.tokenize counts them; None
    without instruction fusion."""
    inst = model.instruction
    if inst is None:
        return None
    from emma_mamba.models.fusion import _token_count
    from emma_mamba.models.vlm import _text_tokenizer

    tok = _text_tokenizer(model.config, inst.context_length)
    counts = [_token_count(tok, t) for s in samples for t in s.instructions]
    return {"count": len(counts), "context_length": inst.context_length,
            "truncated": sum(1 for n in counts if n is not None and n > inst.context_length)}


def _epoch(cfg, data_cfg, lengths: list[int]) -> dict:
    """The rows an epoch of samples of these ``lengths`` makes (training's seeded order and packing), how full
    packed rows are, and the optimizer steps they take at ``train.global_batch_size``."""
    from emma_mamba.data.llava import plan_rows

    t = cfg.train
    rows = plan_rows(lengths, t.seed, 0, data_cfg.packing, data_cfg.max_length) if lengths else []
    G = t.global_batch_size
    return {"rows_per_epoch": len(rows), "packing": data_cfg.packing,
            "fill": (sum(lengths) / (len(rows) * data_cfg.max_length) if data_cfg.packing else
                     _padded_fill(rows, lengths, G, t.micro_batch_size, getattr(data_cfg, "group_by_length", True)))
            if rows else None,
            "global_batch_size": G, "samples_per_step": G * len(lengths) / len(rows) if rows else 0.0,
            "steps_per_epoch": math.ceil(len(rows) / G) if rows else 0}


def _padded_fill(rows: list[list[int]], lengths: list[int], G: int, mb: int, grouped: bool) -> float:
    """Real positions over computed ones when every micro-batch pads to its longest sample, the epoch's steps
    cut into micro-batches as training cuts them (``data.group_by_length``)."""
    from emma_mamba.data.llava import group_by_length

    real = computed = 0
    for k in range(0, len(rows), G):
        step = rows[k:k + G]  # (training fills the last step with the epoch's first rows: left out here)
        mbs = group_by_length(step, lengths, mb, 1)[0] if grouped else [step[j:j + mb] for j in range(0, len(step), mb)]
        for m in mbs:
            n = [sum(lengths[i] for i in r) for r in m]
            real, computed = real + sum(n), computed + len(n) * max(n)
    return real / computed


def _epoch_line(r: dict) -> str:
    fill = f", {100 * r['fill']:.1f} % of {'positions' if r['packing'] else 'padded positions'} filled" \
        if r["fill"] is not None else ""
    per = f" of {r['samples_per_step']:.1f} samples on average" if r["packing"] else ""
    return (f"{r['rows_per_epoch']} rows ({'packed' if r['packing'] else 'one sample each'}{fill}), "
            f"{r['steps_per_epoch']} optimizer step{'' if r['steps_per_epoch'] == 1 else 's'} at global batch "
            f"{r['global_batch_size']} rows{per}")


def _check_output(path: str | None, option: str, overwrite: bool = True) -> None:
    """Refuse, before the work, an output ``path`` that cannot be written: a folder, a missing parent folder, an
    existing file unless ``overwrite``."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise OSError(f"{option} {p}: that is a folder; name a file")
    if not p.parent.is_dir():
        raise OSError(f"{option} {p}: its folder {p.parent} does not exist")
    if p.exists() and not overwrite:
        raise OSError(f"{option} {p}: the file exists; choose another name, or add --overwrite to replace it")


def _write_clean(src: Path, usable: set, dst: Path) -> int:
    """The records of ``src`` whose index is in ``usable``, unchanged and in order, written to ``dst`` as JSONL
    when its name ends in .jsonl, else as a JSON list, through a temporary file renamed over it; returns the
    count."""
    if dst.resolve() == src.resolve():
        raise OSError(f"--write-clean {dst}: that is the data file itself; write the clean copy elsewhere")
    import os

    from emma_mamba.data.llava import is_jsonl, read_text_utf8
    from emma_mamba.fileio import text_lines

    text = read_text_utf8(src)
    if is_jsonl(src):  # the lines as read_records numbers them (not str.splitlines: U+2028 inside a record)
        lines = [line for i, line in enumerate(text_lines(text)) if i in usable]
        out = ("".join(x + "\n" for x in lines) if is_jsonl(dst)
               else json.dumps([json.loads(x) for x in lines], ensure_ascii=False))
        n = len(lines)
    else:
        records = [r for i, r in enumerate(json.loads(text)) if i in usable]
        out = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if is_jsonl(dst)
               else json.dumps(records, ensure_ascii=False))
        n = len(records)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(out, encoding="utf-8")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def mixture_report(cfg, sources, lengths: list[list[int]]) -> dict:
    """An epoch of several files (data.sources): each file's samples taken ``repeat`` times
    (:func:`~emma_mamba.data.llava.repeat_indices`, as training takes them), the rows and steps they make."""
    from emma_mamba.data.llava import repeat_indices

    files, epoch = [], []
    for k, (src, ls) in enumerate(zip(sources, lengths)):
        picked = [ls[i] for i in repeat_indices(len(ls), src.repeat, k)]
        files.append({"file": str(src.json), "samples": len(ls), "repeat": src.repeat, "epoch_samples": len(picked)})
        epoch.extend(picked)
    return {"files": files, "samples_per_epoch": len(epoch), **_epoch(cfg, cfg.data, epoch)}


def _print_mixture(m: dict) -> None:
    print("mixture (data.sources): " + ", ".join(f"{Path(f['file']).name} {f['samples']} x {f['repeat']:g} = "
                                                 f"{f['epoch_samples']}" for f in m["files"]))
    print(f"  one epoch: {m['samples_per_epoch']} samples, {_epoch_line(m)}")


def _print(r: dict) -> None:
    print(f"{r['file']}: {r['usable']} of {r['records']} records usable")
    for reason, n in sorted(r["skipped"].items()):
        print(f"  {reason}: {n}")
        for ex in r["examples"].get(reason, []):
            print(f"      {ex}")
    for kind, n in sorted(r["notes"].items()):
        print(f"  kept but noted, {kind}: {n}")
        for ex in r["note_examples"].get(kind, []):
            print(f"      {ex}")
    if r["images_checked"]:
        f = r["image_failures"]
        print(f"  images: {r['images_checked']} files decoded, {f.get('files', 0)} failed")
    tr = r["truncated"]
    if tr["samples"]:
        print(f"  truncated to max_length {r['max_length']}: {tr['samples']} samples (lost {tr['positions']} "
              f"positions, {tr['answer_tokens']} answer tokens, {tr['images']} images); longest "
              f"{r['longest_before_truncation']}")
    p = r["positions_per_sample"]
    if p:
        print(f"  positions per sample: p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']} "
              f"(max_length {r['max_length']}); {r['text_only_samples']} text-only samples; "
              f"{r['answer_tokens']} answer tokens")
    ins = r.get("instructions")
    if ins and ins["truncated"]:
        print(f"  instructions longer than the text tower's {ins['context_length']} tokens (instruction fusion "
              f"truncates them): {ins['truncated']} of {ins['count']}")
    print(f"  one epoch: {_epoch_line(r)}")


def run(args: argparse.Namespace) -> int:
    import logging

    import torch

    from emma_mamba.config import ConfigError
    from emma_mamba.data.llava import DataError, check_data_paths, data_sources
    from emma_mamba.models.vlm import EmmaMamba
    from emma_mamba.training.cli_train import _overrides
    from emma_mamba.training.config import load_run_config, resolve_chat_format

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(args.config, _overrides(args), model=args._model, override_source="command line")
        resolve_chat_format(cfg)  # the data laid out as training will: in the model's chat format
        _check_output(args.report, "--report")
        if args.write_clean and any(Path(args.write_clean).resolve() == Path(s.json).resolve()
                                    for s in data_sources(cfg.data)):
            raise OSError(f"--write-clean {args.write_clean}: that is the data file itself; write the clean copy "
                          f"elsewhere")
        _check_output(args.write_clean, "--write-clean", args.overwrite)
        if args.val and cfg.val.json is None:
            raise ConfigError(f"{args.config}: --val but the run has no val.json")
        check_data_paths(cfg.data, cfg.val if args.val else None)
        model_cfg = cfg.model
        if cfg.init_from is not None:  # the checkpoint's tokenizer (with its added tokens), as training loads it
            model_cfg = dataclasses.replace(model_cfg, lm=dataclasses.replace(model_cfg.lm, tokenizer=cfg.init_from))
        model = EmmaMamba(model_cfg, for_training=False, device=torch.device("meta"))
        sources = data_sources(cfg.data)
        mixed = len(sources) > 1 or sources[0].repeat != 1.0
        if args.write_clean and len(sources) > 1:
            raise ConfigError(f"--write-clean writes one file; this run reads {len(sources)} (data.sources): check "
                              f"them one at a time with --data.sources null --data.json FILE")
        files = [dataclasses.replace(cfg.data, json=str(s.json), image_folder=str(s.image_folder), sources=None)
                 for s in sources]  # each file checked and reported on its own
        if args.val:
            files.append(dataclasses.replace(cfg.data, json=cfg.val.json, image_folder=cfg.val.image_folder,
                                             sources=None))
        usable: set = set()
        lengths = [[] for _ in sources]
        reports = [check_file(cfg, d, model, args.workers, not args.no_images, sys.stderr.isatty(),
                              usable if i == 0 else None, lengths[i] if i < len(sources) else None)
                   for i, d in enumerate(files)]
        mixture = mixture_report(cfg, sources, lengths) if mixed else None
        if args.write_clean:
            n = _write_clean(Path(files[0].json), usable, Path(args.write_clean))
            print(f"wrote {args.write_clean}: {n} usable records of {reports[0]['records']}")
    except (ConfigError, DataError, OSError) as e:
        print(f"emma-mamba data check: {e}", file=sys.stderr)
        return 2
    for r in reports:
        _print(r)
    if mixture is not None:
        _print_mixture(mixture)
    if args.report:
        if mixture is not None:
            out = {"sources": reports[:len(sources)], "mixture": mixture}
            if args.val:
                out["val"] = reports[-1]
        else:
            out = reports if args.val else reports[0]
        Path(args.report).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.report}")
    empty = [r["file"] for r in reports if not r["usable"]]
    for f in empty:  # training refuses a file with no usable record ("no usable training records")
        print(f"{f}: no usable record: a run with it stops before the first step")
    clean = all(not r["skipped"] for r in reports) and not empty
    noted = sum(r["noted_records"] for r in reports)  # records, not notes: one can have several kinds
    print("no problems found" if clean else "problems found: a run skips these records (data.on_error: skip) or "
                                            "stops at the first (raise)" if not empty else "problems found")
    if noted:
        print(f"{noted} record(s) kept but noted" + (" (--strict: exit 1)" if args.strict else ""))
    return 0 if clean and not (args.strict and noted) else 1
