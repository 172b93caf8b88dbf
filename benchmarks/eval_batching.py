"""`emma-mamba eval` answering time with continuous batching (the default) against fixed batches.

    python benchmarks/eval_batching.py --checkpoint RUN/stage2 --data DATA [--batch-size 8] [--repeats 3]
        [--threads 2] [--max-new-tokens 96] [--out benchmarks/results/eval_batching_quickstart.json]

``DATA`` is a ShapesWorld folder (``emma-mamba data shapes``, or the quickstart's ``data/``) and ``RUN/stage2`` a
checkpoint trained on it (the quickstart's). Two workloads over the held-out images, each answered by
:func:`emma_mamba.eval.runner.evaluate` with ``batching="static"`` (fixed batches of ``--batch-size`` questions,
each decoded until its longest reply ends) and ``"continuous"`` (a finished reply's row goes to the next
question at the next step), alternating, in one process after a warm-up:

* ``mixed`` (task ``prompts``): per image "Describe the image in detail." (a caption naming every shape: replies
  of very different lengths) and its VQAv2 questions with the short-answer instruction, in a fixed shuffled
  order (an instruction-following benchmark, or a batch of captions and questions);
* ``vqav2``: the held-out VQAv2 questions alone (one-word replies: little for continuous batching to gain).

Recorded: answering seconds per run, the decode steps of each run (the batched recurrent steps after the
prefills; the continuous decoder's admissions depend on timing, so its count varies a little), the replies' lengths in tokens,
and whether both batchings gave the same replies (greedy: they must, up to a batched GEMM's rounding).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402

DESCRIBE = "Describe the image in detail."


def mixed_prompts(data: Path, out: Path, seed: int = 0) -> Path:
    """The ``mixed`` workload as a ``prompts`` file (LLaVA question JSONL)."""
    from emma_mamba.eval.runner import SHORT_ANSWER_PROMPT

    qs = json.loads((data / "heldout" / "vqav2_questions.json").read_text())["questions"]
    rows, seen = [], set()
    for q in qs:
        if q["image"] not in seen:
            seen.add(q["image"])
            rows.append({"question_id": f"describe/{q['image']}", "image": q["image"], "text": DESCRIBE})
        rows.append({"question_id": f"q/{q['question_id']}", "image": q["image"],
                     "text": f"{q['question']}\n{SHORT_ANSWER_PROMPT}"})
    random.Random(seed).shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def main(argv=None) -> int:
    from emma_mamba.eval.runner import evaluate
    from emma_mamba.inference import generate as gen
    from emma_mamba.models.vlm import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the ShapesWorld folder the checkpoint was trained on")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96, help="long enough for a caption (default %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=2)
    add_out(p, 'eval_batching_quickstart.json')
    args = parse_args(p, argv)

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    model = load(args.checkpoint).eval()
    tok = model.tokenizer
    with tempfile.TemporaryDirectory(prefix="eval_batching_") as tmp_name:  # the answers of every run, then gone
        tmp = Path(tmp_name)
        workloads = {"mixed": ("prompts", mixed_prompts(data, tmp / "mixed.jsonl")),
                     "vqav2": ("vqav2", data / "heldout" / "vqav2_questions.json")}
        images = data / "images"
        doc = {"benchmark": "eval answering time: continuous batching vs fixed batches",
               "command": "python benchmarks/eval_batching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "checkpoint": str(args.checkpoint), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "machine": machine(torch.device("cpu"), args.threads), "workloads": {}}
        step_fn = gen.decode_step
        for name, (task, qfile) in workloads.items():
            evaluate(model, task, qfile, images, tmp / f"warm_{name}", batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, limit=2 * args.batch_size, progress=False)
            runs, answers = [], {}
            for r in range(args.repeats):
                for how in (("static", "continuous") if r % 2 == 0 else ("continuous", "static")):
                    out = tmp / f"{name}_{how}_{r}"
                    steps = [0]
                    if how == "static":  # count generate()'s decode steps (the continuous report has its own)
                        def counted(*a, _step=gen.decode_step, **k):
                            steps[0] += 1
                            return _step(*a, **k)

                        gen.decode_step = counted
                    try:
                        t0 = time.perf_counter()
                        rep = evaluate(model, task, qfile, images, out, batch_size=args.batch_size,
                                       max_new_tokens=args.max_new_tokens, progress=False, batching=how)
                        wall = time.perf_counter() - t0
                    finally:
                        gen.decode_step = step_fn
                    if how == "static":
                        rep["decode_steps"] = steps[0]
                    got = {json.loads(x)["question_id"]: json.loads(x)["text"]
                           for x in (out / "answers.jsonl").read_text().splitlines()}
                    answers.setdefault(how, got)
                    runs.append({"batching": how, "repeat": r, "seconds_answering": rep["seconds_this_run"],
                                 "seconds_call": wall, "decode_steps": rep["decode_steps"]})
                    print(f"{name:6s} {how:10s} repeat {r}: {rep['seconds_this_run']:.2f} s, {rep['decode_steps']} decode "
                          "steps")
            lengths = [len(tok.encode(t)) for t in answers["continuous"].values()]
            same = answers["static"] == answers["continuous"]
            med = {h: statistics.median(x["seconds_answering"] for x in runs if x["batching"] == h)
                   for h in ("static", "continuous")}
            doc["workloads"][name] = {
                "task": task, "n_questions": len(lengths), "replies_identical": same,
                "n_replies_different": sum(answers["static"][k] != v for k, v in answers["continuous"].items()),
                "reply_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                                 "mean": statistics.fmean(lengths)},
                "decode_steps": {h: statistics.median(x["decode_steps"] for x in runs if x["batching"] == h)
                                 for h in ("static", "continuous")},
                "median_seconds": med, "ratio_static_over_continuous": med["static"] / med["continuous"], "runs": runs}
            print(f"{name}: {len(lengths)} questions, reply tokens {min(lengths)}-{max(lengths)} (median "
                  f"{statistics.median(lengths)}); static {med['static']:.2f} s, continuous {med['continuous']:.2f} s: "
                  f"{med['static'] / med['continuous']:.2f}x; replies identical: {same}")
        write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
