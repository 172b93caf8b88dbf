"""LRV-Instruct as LLaVA-format training data: the third part of the EMMA-Mamba paper's (and Cobra's) mixture.

The paper trains on LLaVA-v1.5's 665K mixture, LVIS-Instruct4V (220K, already in LLaVA's format) and LRV-Instruct
(Liu et al. 2023, "Mitigating Hallucination in Large Multi-Modal Models via Robust Instruction Tuning": positive
and *negative* instructions, questions about things that are not in the image, against hallucination; 1.23M
records together, the authors' ``llava-lvis4v-lrv`` data set). LRV's release is not in LLaVA's format: its
coordinate-free files are lists of ``{"image_id", "question", "answer"}``:

* ``filter_cap1.json`` and ``filter_cap_more1.json``: Visual Genome images, ``<image_id>.jpg`` in the release's
  image folder (``lrv-vg``);
* ``chart_release_update.json``: chart images, ``image_id`` a file name in ``lrv-chart``.

``emma-mamba data lrv --lrv-dir DIR --out lrv_instruct.json`` converts them into one-turn LLaVA conversations
(``<image>\\n{question}`` -> ``{answer}``, id ``vg/<image_id>_q<k>`` or ``chart/<name>_q<k>``: the k-th question
about that image) whose image paths are relative to the folder that holds ``DIR`` (by
default ``lrv/lrv-vg/<id>.jpg`` and ``lrv/lrv-chart/<name>``): put ``DIR`` under LLaVA's image folder and one
``image_folder`` serves all three files of ``data.sources`` (configs/train_emma-mamba-2.8b-dinosiglip_single.yaml).
A file may also hold that list as ``{"annotations": [...]}`` (the layout of MiniGPT-4's ``filter_cap.json``, whose
names LRV's follow). Every record is checked (fields, text, its image file): a malformed record (not an object,
a field missing or empty, a question or answer holding ``<image>``) is an error naming the file and the record, or with
``--skip-bad`` is left out and counted per reason; a missing image likewise with ``--skip-missing``. An answer that
is a JSON number (a chart's value) is written as its text. The output keeps the input order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

VG_FILES = ("filter_cap1.json", "filter_cap_more1.json")
CHART_FILE = "chart_release_update.json"
VG_IMAGES, CHART_IMAGES = "lrv-vg", "lrv-chart"


class LrvError(ValueError):
    pass


def _records(path: Path) -> list:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LrvError(f"{path} not found (LRV-Instruct's release names it so)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LrvError(f"{path}: not a JSON file ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):  # MiniGPT-4's layout
        return doc["annotations"]
    if not isinstance(doc, list):
        raise LrvError(f"{path}: expected a list of {{image_id, question, answer}} (or {{\"annotations\": "
                       f"[...]}}), got {type(doc).__name__}"
                       + (f" with keys {', '.join(map(repr, list(doc)[:5]))}" if isinstance(doc, dict) else ""))
    return doc


_FIELD_TYPES = {"image_id": (str, int), "question": (str,), "answer": (str, int, float)}  # (an answer: a chart's value)


def _bad_field(rec: dict) -> str | None:
    """Why record ``rec`` cannot be converted (None: it can): a field missing, empty or of another type, or a
    question or answer holding the image placeholder (LLaVA's loader would refuse the record)."""
    for key, types in _FIELD_TYPES.items():
        v = rec.get(key)
        if isinstance(v, bool) or not isinstance(v, types) or not str(v).strip():
            return f"'{key}' must be a non-empty string{' or a number' if key == 'answer' else ''}, got {v!r}"
    if "<image>" in rec["question"]:
        return (f"'question' holds the image placeholder <image> (the conversion writes it before the question): "
                f"{rec['question'][:80]!r}")
    if "<image>" in str(rec["answer"]):  # training refuses a placeholder in an assistant turn
        return f"'answer' holds the image placeholder <image>: {str(rec['answer'])[:80]!r}"
    return None


def convert(lrv_dir: str | Path, vg_files=VG_FILES, chart_file: str | None = CHART_FILE, skip_missing: bool = False,
            prefix: str | None = None, skip_bad: bool = False) -> tuple[list[dict], dict]:
    """(LLaVA records, counts) from the LRV release in ``lrv_dir`` (see the module docstring). ``prefix``: what
    image paths start with (default ``lrv_dir``'s own name, so paths are relative to its parent folder).
    ``skip_bad``: leave malformed records out (counted as ``malformed_records_skipped``) instead of stopping."""
    root = Path(lrv_dir)
    if not root.is_dir():
        raise LrvError(f"--lrv-dir {root} is not a directory")
    # the folder's own name, also for `.` or `x/..` (whose Path.name is '' or '..'); abspath, not resolve(): a
    # symlinked DIR keeps the name it has under the image folder
    prefix = Path(os.path.abspath(root)).name if prefix is None else prefix.rstrip("/")
    parts = [(root / f, VG_IMAGES, True) for f in vg_files]
    if chart_file:
        parts.append((root / chart_file, CHART_IMAGES, False))
    out, counts, missing, per_image = [], {}, [], {}
    for path, folder, vg in parts:
        kept = 0
        for i, rec in enumerate(_records(path)):
            where = f"{path}: record {i}"
            bad = f"expected an object, got {type(rec).__name__}" if not isinstance(rec, dict) else _bad_field(rec)
            if bad is not None:
                if not skip_bad:
                    raise LrvError(f"{where}: {bad} (--skip-bad leaves such records out and counts them)")
                counts["malformed_records_skipped"] = counts.get("malformed_records_skipped", 0) + 1
                continue
            image_id = str(rec["image_id"]).strip()
            name = f"{image_id}.jpg" if vg else image_id
            if not (root / folder / name).is_file():
                if not skip_missing:
                    missing.append(f"{where}: image {root / folder / name}")
                    continue
                counts["missing_images_skipped"] = counts.get("missing_images_skipped", 0) + 1
                continue
            rel = f"{prefix}/{folder}/{name}" if prefix else f"{folder}/{name}"
            # one record per question, several per image: the id names the image and the question's number among
            # that image's (unique, so `data check --strict` passes: the image's own id repeated was a duplicate)
            base = f"{'vg' if vg else 'chart'}/{image_id if vg else Path(image_id).stem}"
            per_image[base] = per_image.get(base, -1) + 1
            out.append({"id": f"{base}_q{per_image[base]}", "image": rel,
                        "conversations": [{"from": "human", "value": f"<image>\n{str(rec['question']).strip()}"},
                                          {"from": "gpt", "value": str(rec["answer"]).strip()}]})
            kept += 1
        counts[path.name] = kept
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise LrvError(f"{len(missing)} records name images that are not there: " + "; ".join(missing[:5]) + more
                       + f". Extract LRV's image archives to {root / VG_IMAGES} and {root / CHART_IMAGES}, or pass "
                         f"--skip-missing to leave those records out")
    return out, counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lrv-dir", required=True, metavar="DIR",
                   help=f"the LRV-Instruct release: {', '.join(VG_FILES)}, {CHART_FILE}, and the image folders "
                        f"{VG_IMAGES}/ and {CHART_IMAGES}/")
    p.add_argument("--out", required=True, metavar="FILE", help="LLaVA-format JSON to write")
    p.add_argument("--no-chart", action="store_true", help=f"leave out the chart split ({CHART_FILE})")
    p.add_argument("--prefix", default=None,
                   help="what the written image paths start with (default: --lrv-dir's name, i.e. paths relative to "
                        "its parent folder)")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out (and count) the records whose image file is missing instead of stopping")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out (and count) malformed records (a field missing or empty, <image> in a question or "
                        "answer) instead of stopping")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        print(f"emma-mamba data lrv: --out {out} exists; give a new file", file=sys.stderr)
        return 2
    try:
        records, counts = convert(args.lrv_dir, chart_file=None if args.no_chart else CHART_FILE,
                                  skip_missing=args.skip_missing, prefix=args.prefix, skip_bad=args.skip_bad)
    except LrvError as e:
        print(f"emma-mamba data lrv: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out}: {len(records)} records ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0
