"""`emma-mamba score`: score an answers file against a benchmark's standard annotation file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emma_mamba.eval.scorers import TASKS, ScoreInputError, score, summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=TASKS, help="benchmark whose files and metric to use")
    p.add_argument("--answers", required=True,
                   help="model answers: POPE/LLaVA JSONL, VQAv2/GQA/TextVQA/VizWiz results JSON, MMBench answers "
                        "JSONL (question_id '<index>/<round>'), SEED-Bench / ScienceQA / VSR / TallyQA / AI2D "
                        "answers JSONL, or MME results folder")
    p.add_argument("--annotations", default=None,
                   help="POPE question file, VQAv2 annotations JSON, GQA questions JSON, TextVQA_0.5.1_val.json, "
                        "VizWiz val.json, MMBench dev TSV, SEED-Bench.json, ScienceQA problems.json, VSR test.jsonl, "
                        "TallyQA test.json, AI2D questions/ folder; "
                        "for mme optional: the folder of 3-column templates to check the answers against")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the answered questions instead of failing when some have no answer")
    p.add_argument("--out", default=None, help="also write the metrics as JSON to this file")


def run(args: argparse.Namespace) -> int:
    try:
        metrics = score(args.task, args.answers, args.annotations, allow_missing=args.allow_missing)
    except ScoreInputError as e:
        print(f"emma-mamba score: {e}", file=sys.stderr)
        return 2
    print(summary(args.task, metrics))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"task": args.task, "answers": str(args.answers),
                                              "annotations": args.annotations, "metrics": metrics}, indent=1) + "\n")
        print(f"metrics written to {args.out}")
    return 0
