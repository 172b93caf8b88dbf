"""`emma-mamba score`: score an answers file against a benchmark's standard annotation file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emma_mamba.eval.scorers import TASKS, ScoreInputError, score, summary
from emma_mamba.eval.xlsx import XlsxError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=TASKS, help="benchmark whose files and metric to use")
    p.add_argument("--answers", required=True,
                   help="model answers: POPE/LLaVA JSONL, VQAv2/GQA/TextVQA/VizWiz results JSON, MMBench answers "
                        "JSONL (question_id '<index>/<round>'), SEED-Bench / ScienceQA / VSR / TallyQA / AI2D "
                        "answers JSONL, or MME results folder")
    p.add_argument("--annotations", default=None,
                   help="POPE question file, VQAv2 annotations JSON, GQA questions JSON, TextVQA_0.5.1_val.json, "
                        "VizWiz val.json, MMBench dev TSV (a test TSV with --submission), SEED-Bench.json, ScienceQA "
                        "problems.json, VSR test.jsonl, "
                        "TallyQA test.json, AI2D questions/ folder; "
                        "for mme optional: the folder of 3-column templates to check the answers against")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the answered questions instead of failing when some have no answer")
    p.add_argument("--out", default=None, help="also write the metrics as JSON to this file")
    p.add_argument("--submission", metavar="XLSX", default=None,
                   help="mmbench: also write the file MMBench's evaluation server takes (every row of the "
                        "--annotations TSV, the questions answered, with the option letter picked as 'prediction'; "
                        "its .tsv twin beside it), as `emma-mamba eval` writes mmbench_submission.xlsx; with a test "
                        "TSV (no answers) only the file is written. Every question must be answered")


def run(args: argparse.Namespace) -> int:
    scored = True
    try:
        if args.submission is not None:
            scored = _write_submission(args)
        metrics = score(args.task, args.answers, args.annotations, allow_missing=args.allow_missing) \
            if scored else None
    except (ScoreInputError, XlsxError) as e:
        print(f"emma-mamba score: {e}", file=sys.stderr)
        return 2
    if not scored:
        return 0
    print(summary(args.task, metrics))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"task": args.task, "answers": str(args.answers),
                                              "annotations": args.annotations, "metrics": metrics}, indent=1) + "\n")
        print(f"metrics written to {args.out}")
    return 0


def _write_submission(args: argparse.Namespace) -> bool:
    """``--submission``: write MMBench's submission file (and its .tsv twin); whether the TSV has answers to score
    (a dev split) too."""
    from emma_mamba.eval.mmbench import mmbench_submission, write_mmbench_submission

    if args.task != "mmbench":
        raise ScoreInputError(f"--submission writes MMBench's submission file: it goes with --task mmbench, not "
                              f"--task {args.task}")
    xlsx = Path(args.submission)
    if xlsx.suffix.lower() != ".xlsx":
        raise ScoreInputError(f"--submission {xlsx}: the file name must end in .xlsx (a .tsv twin is written beside "
                              f"it)")
    if args.annotations is None:
        raise ScoreInputError("--submission needs --annotations, the MMBench TSV the answers answer")
    sub = mmbench_submission(args.answers, args.annotations)
    write_mmbench_submission(sub, xlsx, xlsx.with_suffix(".tsv"), inputs=(args.answers, args.annotations))
    print(f"MMBench submission written to {xlsx} and {xlsx.with_suffix('.tsv')} ({len(sub.rows)} rows, "
          f"{sub.n_questions} questions" + (f"; {sub.n_unparsed} replies pick no option letter: the reply is their "
                                             f"prediction" if sub.n_unparsed else "") + ")")
    if not sub.has_answers:
        print(f"{args.annotations} holds no answers (a test split): not scored here; MMBench's server scores the "
              f"submission")
    return sub.has_answers
