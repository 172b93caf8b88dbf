"""`emma-mamba eval`: answer a benchmark's question file with a checkpoint, write answers and metrics.

    emma-mamba eval --task pope --questions heldout/pope_random.jsonl --images data/images --checkpoint runs/x
    emma-mamba eval --task vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json --images val2014 \
        --annotations v2_mscoco_val2014_annotations.json --checkpoint runs/x --out eval/vqav2
    emma-mamba eval --suite configs/eval_suite_example.yaml --checkpoint runs/x    # several, one table
    emma-mamba eval --suite ... --api http://localhost:8000/v1 --out eval/other   # a model behind an API
    torchrun --nproc_per_node=8 -m emma_mamba.cli eval --suite ... --checkpoint runs/x   # 8 GPUs share the questions

The work is done by :func:`emma_mamba.eval.runner.evaluate` (formats, prompts and resumption are described
there) and, for a suite, :func:`emma_mamba.eval.suite.run_suite`. Rerunning with the same ``--out`` continues
an interrupted run, with the same checkpoint (or endpoint) and settings only: another one is refused, since its
answers would be mixed with (or reported as) the first one's (``eval_run.json``). Every image to be answered
about is opened and checked before the first answer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from emma_mamba.eval.mmbench import LANGS
from emma_mamba.eval.runner import DEFAULT_IMAGE_TEMPLATE, TASK_SETTINGS, TASKS

TASK_FLAGS = {"split": "--split", "image_template": "--image-template", "box_frame": "--box-frame",
              "lang": "--lang", "ocr": "--ocr"}
"""The option of each setting of :data:`~emma_mamba.eval.runner.TASK_SETTINGS` (a suite file's key)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=TASKS, help="benchmark: file formats, prompt and metric")
    what.add_argument("--suite", metavar="YAML",
                      help="several benchmarks from one file (format: emma_mamba/eval/suite.py; example: "
                           "configs/eval_suite_example.yaml, the shipped copy where no such file exists here, its "
                           "root: then relative to ./configs)")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None, help="with --suite: run these benchmarks only")
    p.add_argument("--questions", default=None,
                   help="POPE question JSONL, VQAv2 questions JSON, GQA questions JSON, TextVQA_0.5.1_val.json "
                        "(or LLaVA's TextVQA JSONL), VizWiz val.json, MMBench TSV, SEED-Bench.json, ScienceQA "
                        "problems.json, VSR test.jsonl, TallyQA test.json, AI2D questions/ folder, RefCOCO / "
                        "RefCOCO+ / RefCOCOg refs(*).p (instances.json beside it), OCID-Ref {split}_expressions.json, "
                        "or MME folder/file of <category>.txt templates")
    p.add_argument("--images", default=None,
                   help="folder the questions' image names are relative to (every task but mmbench, whose TSV "
                        "holds its images)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model directory written by EmmaMamba.save or a training run")
    src.add_argument("--api", metavar="URL",
                     help="instead of a checkpoint: an OpenAI-compatible chat-completions endpoint (base URL, e.g. "
                          "http://localhost:8000/v1 of `emma-mamba serve`, or a transformer MLLM served by vLLM); "
                          "same prompts, scorers and files (needs --out)")
    p.add_argument("--api-model", default=None, help="with --api: the model name to send")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="with --api: environment variable holding the bearer token, if set (default %(default)s)")
    p.add_argument("--api-concurrency", type=int, default=4, help="with --api: requests at once (default %(default)s)")
    p.add_argument("--out", default=None,
                   help="output folder (default: eval_<task>, or eval_<suite name> for a suite, inside --checkpoint)")
    p.add_argument("--annotations", default=None,
                   help="ground truth when not in the questions file (VQAv2 annotations JSON, TextVQA JSON for "
                        "LLaVA-JSONL questions; default: the questions file where it holds answers, for VQAv2 the "
                        "sibling *annotations*.json if present)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="replies decoded together at most (default 8). With --suite, --batch-size, --max-new-tokens "
                        "and --limit, where given, win over the suite file's values (top-level and per benchmark)")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous (default): finished replies' rows go to the next questions (once half the rows "
                        "are free, their images and prompts encoded together); static: fixed batches of --batch-size "
                        "questions, each decoded until its longest reply ends (the runner before continuous batching)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply in tokens (default 16; refcoco and ocidref 32, a box needs about 20)")
    p.add_argument("--limit", type=int, default=None,
                   help="answer only the first N questions (a quick check; scored as a subset, the summary says "
                        "\"N of <all>\")")
    p.add_argument("--allow-missing", action="store_true",
                   help="score the answered questions even where --annotations hold more (a --questions file that is "
                        "a subset of the official annotations' questions); not mme. A rerun with the same --out adds "
                        "it to a finished run without answering again; with --suite: every benchmark")
    # the settings of some tasks only: refused on another task, and with --suite (each entry gives its own)
    p.add_argument("--image-template", default=None,
                   help="vqav2: image file name from image_id when questions have no 'image' (default "
                        f"{DEFAULT_IMAGE_TEMPLATE.replace('%', '%%')}); a suite: image_template: per benchmark")
    p.add_argument("--split", default=None,
                   help="the split to answer: ScienceQA (default test), AI2D test (ai2d_test_ids.csv; default), train or "
                        "all, RefCOCO val (default), testA, testB or test; a suite: split: per benchmark")
    p.add_argument("--box-frame", choices=("auto", "image", "square"), default=None,
                   help="refcoco, ocidref: what the model's box coordinates are normalised by: the image's width and height, "
                        "or the square it is padded to (LLaVA-1.5); auto (default): square for a checkpoint trained on "
                        "letterboxed images, else image (with --api: image); a suite: box_frame: per benchmark")
    p.add_argument("--lang", choices=LANGS, default=None,
                   help="mmbench: the language its questions are asked in; cn: with LLaVA-1.5's MMBench-CN instruction "
                        "\"请直接回答选项字母。\" instead of \"Answer with the option's letter from the given choices "
                        "directly.\"; auto (default): cn when most of the file's questions (question, hint or "
                        "options) hold Chinese characters (MMBench-CN), else en; a suite: lang: per benchmark")
    p.add_argument("--ocr", metavar="FILE", default=None,
                   help="textvqa, with the official TextVQA_0.5.1_val.json: the OCR file (TextVQA_Rosetta_OCR_v0.2_val"
                        ".json) whose tokens of each question's image are added to the question as LLaVA-1.5's "
                        "llava_textvqa_val_v051_ocr.jsonl has them (\"<question>\\nReference OCR token: tok1, tok2, "
                        "...\"); a suite: ocr: per benchmark")
    p.add_argument("--likelihood", action="store_true",
                   help="answer a closed-set benchmark (pope, mme, mmbench, seed, scienceqa) by its options' "
                        "likelihood as the reply (Yes/No, the option letters) instead of generating and parsing a "
                        "reply, as vsr, tallyqa and ai2d always are; with --suite: every closed-set benchmark of it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each decode step from a CUDA graph captured once per batch size (CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step through torch.compile (Inductor; with --cuda-graphs, captured)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from emma_mamba.eval._io import ScoreInputError
    from emma_mamba.eval.api import ApiError
    from emma_mamba.eval.runner import evaluate
    from emma_mamba.eval.scorers import summary
    from emma_mamba.models.vlm import load

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("emma_mamba").setLevel(logging.INFO)
    for name, v in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if v is not None and v < 1:
            print(f"emma-mamba eval: {name} must be >= 1, got {v}", file=sys.stderr)
            return 2
    if args.limit is not None and args.limit < 1:
        print(f"emma-mamba eval: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        print(f"emma-mamba eval: --cuda-graphs needs a CUDA device (--device {args.device})", file=sys.stderr)
        return 2
    if args.api is not None:
        if args.out is None:
            print("emma-mamba eval: --api needs --out (there is no checkpoint folder to write into)", file=sys.stderr)
            return 2
        if args.cuda_graphs or args.compile:
            print("emma-mamba eval: --cuda-graphs / --compile apply to a local --checkpoint, not --api",
                  file=sys.stderr)
            return 2
        if args.api_concurrency < 1:
            print(f"emma-mamba eval: --api-concurrency must be >= 1, got {args.api_concurrency}", file=sys.stderr)
            return 2
    if args.suite is not None:
        return _run_suite(args)
    if args.only is not None:
        print("emma-mamba eval: --only goes with --suite", file=sys.stderr)
        return 2
    if args.questions is None:
        print(f"emma-mamba eval: --task {args.task} needs --questions FILE", file=sys.stderr)
        return 2
    for key, flag in TASK_FLAGS.items():  # a setting the task would ignore: a mistake, named
        if vars(args)[key] is not None and args.task not in TASK_SETTINGS[key]:
            print(f"emma-mamba eval: {flag} applies to {', '.join(TASK_SETTINGS[key])} only, not --task {args.task}",
                  file=sys.stderr)
            return 2
    if args.images is None and args.task != "mmbench":
        print(f"emma-mamba eval: --task {args.task} needs --images DIR", file=sys.stderr)
        return 2
    if args.allow_missing and args.task == "mme":
        print("emma-mamba eval: --allow-missing does not apply to --task mme (every image needs both answers)",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{args.task}"
    shard = _distributed(args)
    try:
        model, answer_fn = _model_or_api(args, load)

        def run(**kw):
            return evaluate(model, args.task, args.questions, args.images, out, annotations=args.annotations,
                            batch_size=args.batch_size or 8, max_new_tokens=args.max_new_tokens, limit=args.limit,
                            image_template=args.image_template or DEFAULT_IMAGE_TEMPLATE,
                            checkpoint=str(args.checkpoint or args.api), progress=not args.no_progress,
                            split=args.split, cuda_graphs=args.cuda_graphs, compile=args.compile,
                            likelihood=args.likelihood, box_frame=args.box_frame or "auto", lang=args.lang or "auto",
                            ocr=args.ocr, answer_fn=answer_fn, batching=args.batching,
                            allow_missing=args.allow_missing, **kw)

        report = run() if shard is None else _sharded(shard, out, run)
    except (ScoreInputError, FileNotFoundError, ValueError, ApiError) as e:
        print(f"{_prog(shard)}: {e}", file=sys.stderr)
        _end(shard, finished=False)
        return 2
    except Exception as e:  # noqa: BLE001 - under torchrun: a collective that lost the process that failed
        if _peer_gone(shard, e):
            return 2
        raise
    _end(shard)
    if report is None:  # another rank than 0 under torchrun: rank 0 reports
        return 0
    if report["metrics"] is not None:
        print(summary(args.task, report["metrics"]))
    if report.get("limited"):
        print(f"limited run (--limit {args.limit}): {report['limited']['n']} of {report['limited']['of']} "
              f"questions answered{' and scored' if report['metrics'] is not None else ''}")
    fallback = report["scored_from_replies"]
    if fallback is not None and (fallback["n"] or fallback["errors"]):
        n = fallback["n"] if fallback["n"] is not None else "some"
        print(f"not all by likelihood: {n} of {fallback['of']} questions scored from parsed replies "
              f"({'; '.join(e['error'] for e in fallback['errors']) or 'the endpoint gave no usable log-probabilities'}"
              f"; metrics.json: scored_from_replies)")
    print(f"answers in {out}; metrics in {out / 'metrics.json'}")
    if args.task == "mme":  # what `emma-mamba score --task mme --answers` (and MME's own eval tool) reads
        print(f"MME results folder (<category>.txt): {out / 'mme'}")
    return 0


def _distributed(args) -> tuple[int, int] | None:
    """Under torchrun (WORLD_SIZE > 1): start the process group (NCCL with a GPU per local rank, gloo on CPUs),
    point ``args.device`` at this rank's device and return (rank, world); else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from emma_mamba.training.parallel import init_distributed

    info = init_distributed(args.device if args.api is None else "cpu")
    if args.api is None:
        args.device = str(info.device)
    return info.rank, info.world_size


def _prog(shard) -> str:
    """How an error line starts: the command, and under torchrun the rank that says it (as training's lines)."""
    return "emma-mamba eval" if shard is None else f"[rank {shard[0]}] emma-mamba eval"


def _peer_gone(shard, e: BaseException) -> bool:
    """Under torchrun, when ``e`` is a collective's failure because another process is gone (its own error line
    is above): say so in one line, as training does, end the process group, and return True; else False."""
    from emma_mamba.training.parallel import lost_peer

    gone = lost_peer(e) if shard is not None else None
    if gone is None:
        return False
    print(f"{_prog(shard)}: another process stopped first (its error is above; here: {gone})", file=sys.stderr)
    _end(shard, finished=False)
    return True


def _sharded(shard: tuple[int, int], out: Path, run):
    """Each rank answers its share (once rank 0 has checked and written the folder's ``eval_run.json``: the
    barrier ``sync``); then rank 0 merges the shards and scores (returns the report; the others None)."""
    from emma_mamba.eval.runner import merge_shards, with_shard_counts
    from emma_mamba.training.parallel import all_gather_object, barrier

    shards = all_gather_object(run(shard=shard, sync=barrier))  # (a barrier too)
    report = None
    if shard[0] == 0:
        merge_shards(out, shard[1])
        # everything is answered: the results files and the metrics, with what each process answered
        report = with_shard_counts(run(merged=True), shards, out)
    barrier()
    return report


def _end(shard, finished: bool = True) -> None:
    if shard is not None:
        from emma_mamba.training.parallel import destroy_distributed

        destroy_distributed(finished)


def _model_or_api(args, load):
    """(the loaded checkpoint, None) or, with --api, (None, an answer function asking the endpoint)."""
    import os

    if args.api is None:
        return load(args.checkpoint, device=args.device), None
    from emma_mamba.eval.api import api_answer_fn

    return None, api_answer_fn(args.api, model=args.api_model, api_key=os.environ.get(args.api_key_env),
                               max_new_tokens=args.max_new_tokens or 16, concurrency=args.api_concurrency)


def _run_suite(args) -> int:
    from emma_mamba.eval._io import ScoreInputError
    from emma_mamba.eval.api import ApiError
    from emma_mamba.eval.suite import SHIPPED_BASE, format_summary, read_suite, run_suite, shipped_suite
    from emma_mamba.models.vlm import load

    for flag in ("questions", "images", "annotations"):
        if getattr(args, flag) is not None:
            print(f"emma-mamba eval: --{flag} goes with --task; a suite names each benchmark's files", file=sys.stderr)
            return 2
    for key, flag in TASK_FLAGS.items():  # the suite's benchmarks differ in layout: each entry gives its own
        if vars(args)[key] is not None:
            print(f"emma-mamba eval: {flag} goes with --task, not --suite (it applies to "
                  f"{', '.join(TASK_SETTINGS[key])}, whose layouts differ): give `{key}: ...` in the entry of each "
                  f"benchmark of {args.suite} that needs it (format: emma_mamba/eval/suite.py)", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{Path(args.suite).stem}"
    shard = _distributed(args)
    try:
        from emma_mamba.training.parallel import barrier

        entries = read_suite(args.suite)
        model, answer_fn = _model_or_api(args, load)
        summary = run_suite(model, entries, out, checkpoint=str(args.checkpoint or args.api),
                            progress=not args.no_progress, only=args.only, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, limit=args.limit, cuda_graphs=args.cuda_graphs,
                            compile=args.compile, likelihood=args.likelihood, answer_fn=answer_fn,
                            shard=shard, sync=barrier, batching=args.batching, allow_missing=args.allow_missing)
    except (ScoreInputError, FileNotFoundError, ValueError, ApiError) as e:
        shipped = shipped_suite(args.suite)
        hint = "" if shipped is None else (
            f"\n(--suite {args.suite} is not a file here: the shipped suite {shipped.stem} was read, its root: taken "
            f"relative to ./{SHIPPED_BASE}; `emma-mamba configs --copy {SHIPPED_BASE} {shipped.stem}` copies it here "
            f"to set root: to where your benchmark files are)")
        print(f"{_prog(shard)}: {e}{hint}", file=sys.stderr)
        _end(shard, finished=False)
        return 2
    except Exception as e:  # noqa: BLE001 - under torchrun: a collective that lost the process that failed
        if _peer_gone(shard, e):
            return 2
        raise
    _end(shard)
    if summary is None:  # another rank than 0 under torchrun
        return 0
    print(format_summary(summary["benchmarks"]))
    print(f"per-benchmark answers and metrics in {out}/<name>/; summary in {out / 'summary.json'}")
    return 0
