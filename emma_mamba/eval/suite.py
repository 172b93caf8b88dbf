"""An evaluation suite: several benchmarks from one YAML, answered with one loaded model, one summary table.

    emma-mamba eval --suite configs/eval_suite_example.yaml --checkpoint runs/finetune [--only pope_random gqa]

Suite file (paths relative to ``root``, itself relative to the suite file; strict: unknown keys are errors)::

    root: /data/llava_eval
    batch_size: 8            # optional defaults for every benchmark (the command line's options win)
    max_new_tokens: 16
    benchmarks:
      pope_random: {task: pope, questions: pope/coco_pope_random.jsonl, images: pope/val2014}
      gqa:         {task: gqa, questions: gqa/testdev_balanced_questions.json, images: gqa/images}
      mmbench:     {task: mmbench, questions: mmbench/MMBench_DEV_EN.tsv}
      scienceqa:   {task: scienceqa, questions: scienceqa/problems.json, images: scienceqa/images, split: test}
      mmbench_ll:  {task: mmbench, questions: mmbench/MMBench_DEV_EN.tsv, likelihood: true}  # by likelihood
      mmbench_cn:  {task: mmbench, questions: mmbench/MMBench_DEV_CN.tsv, lang: cn}          # (auto: the same)
      textvqa:     {task: textvqa, questions: textvqa/TextVQA_0.5.1_val.json, images: textvqa/train_images,
                    ocr: textvqa/TextVQA_Rosetta_OCR_v0.2_val.json}

Per benchmark, besides ``task``, ``questions``, ``images`` and ``annotations`` (``eval --task``'s files): ``batch_size``,
``max_new_tokens``, ``limit`` (also suite-wide, above), ``likelihood``, ``allow_missing`` (score the answered
questions of annotations that hold more, as ``eval --allow-missing``), and the settings of some tasks only, each
refused on another task: ``split`` (scienceqa, ai2d, refcoco), ``image_template`` (vqav2), ``box_frame``
(refcoco, ocidref), ``lang`` (mmbench: auto, en or cn) and ``ocr`` (textvqa: the OCR file, relative to ``root``).
These are the options ``eval --split / --image-template / --box-frame / --lang / --ocr`` of a single benchmark,
which ``eval --suite`` refuses: the benchmarks of a suite differ in layout, so each entry gives its own.

Precedence of ``batch_size``, ``max_new_tokens`` and ``limit``: a value given on the command line (``eval --suite
... --batch-size / --max-new-tokens / --limit``, or :func:`run_suite`'s argument when not None) wins over the
entry's, which wins over the suite-wide one, which wins over the built-in default (batch size 8, the task's reply
length, every question), as ``--train.*`` wins over a training YAML. ``eval --allow-missing`` applies to every
benchmark, whatever its entry says. A limited run's row in the summary says so: ``4 of 842`` questions.

Every benchmark's files are read and checked before the first question is answered (each image it will
answer about opened and decoded, :func:`emma_mamba.eval.runner.check_images`, and each existing output folder's
``eval_run.json`` compared with this run, :func:`emma_mamba.eval.runner.check_run_record`), so a typo, a
truncated image or a stale folder in the last entry does not cost the hours of the first ones. Should a
benchmark still fail, the summary of those finished before it is written (``"failed"`` names it) and the
error raised; a rerun continues where it stopped. Each benchmark writes into ``<out>/<name>/``
exactly what ``emma-mamba eval --task`` writes (answers, official results file, metrics) and resumes the same
way; ``<out>/summary.json`` and ``<out>/summary.md`` hold the headline numbers of all of them (with ``--only``, the
other benchmarks' rows of the folder's previous summary for the same checkpoint are kept, whose metrics.json files
are still there).

A ``--suite configs/NAME.yaml`` (or ``NAME.yaml``, ``NAME``) that does not exist where the command runs is the
shipped suite of that name (``emma-mamba configs`` lists the recipes), as ``--config`` takes a shipped recipe; its
``root`` is then taken relative to ``./configs``, as the repository's copy has it relative to the repository's
``configs/`` (the example's ``../playground/eval`` is ``./playground/eval``), never relative to the installed
package. To point it elsewhere: ``emma-mamba configs --copy configs NAME`` and edit ``root:``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError
from emma_mamba.eval.mmbench import LANGS
from emma_mamba.eval.refcoco import FRAMES
from emma_mamba.eval.runner import (LIKELIHOOD_TASKS, TASK_SETTINGS, TASKS, _resolve_identity, check_images,
                                    check_run_record, evaluate, merge_shards, prepare_run, with_shard_counts)

__all__ = ["SuiteEntry", "read_suite", "run_suite", "headline"]

log = logging.getLogger(__name__)

_ENTRY_KEYS = {"task", "questions", "images", "annotations", "split", "image_template", "batch_size",
               "max_new_tokens", "limit", "likelihood", "box_frame", "lang", "ocr", "allow_missing"}
_TOP_KEYS = {"root", "benchmarks", "batch_size", "max_new_tokens", "limit"}


@dataclass
class SuiteEntry:
    name: str
    task: str
    questions: Path
    images: Path | None = None
    annotations: Path | None = None
    options: dict = field(default_factory=dict)
    """batch_size, max_new_tokens, limit, split, image_template, likelihood, box_frame, lang, ocr (a resolved
    path), only those given: :func:`emma_mamba.eval.runner.evaluate`'s keyword arguments."""


def read_suite(path: str | Path) -> list[SuiteEntry]:
    """The benchmarks of a suite YAML, paths resolved; errors name the file, the entry and the key. A ``path`` that
    does not exist but names a shipped suite reads that one, its root relative to ``./configs`` (module docstring)."""
    import yaml

    p = Path(path)
    base = p.parent  # what root (and every path when there is none) is relative to
    shipped = None
    if not p.is_file():
        shipped = shipped_suite(p)
        if shipped is None:
            names = ", ".join(shipped_suites()) or "none found"
            raise ScoreInputError(f"suite file {p} does not exist (shipped suites, usable by name: {names}; "
                                  f"`emma-mamba configs --copy DIR NAME` copies one for editing)")
        base = Path(SHIPPED_BASE)
        p = shipped
    from emma_mamba.config import _unique_key_loader

    try:  # a benchmark (or a key) given twice is refused: plain YAML would keep the last one silently
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except UnicodeDecodeError as e:
        raise ScoreInputError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ScoreInputError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), dict) or not doc["benchmarks"]:
        raise ScoreInputError(f"{p}: expected a mapping with a non-empty 'benchmarks' mapping (name -> {{task, "
                              f"questions, images, ...}})")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ScoreInputError(f"{p}: unknown key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    if not isinstance(doc.get("root", "."), str):
        raise ScoreInputError(f"{p}: root must be a path (a string), got {doc['root']!r}")
    root = (base / doc.get("root", ".")).resolve()
    if shipped is not None:
        log.info("%s: no such file here; using the shipped suite %s with its root taken relative to ./%s, as in "
                 "a checkout: benchmark files under %s (`emma-mamba configs --copy %s %s` copies the suite here "
                 "to set its root: to where yours are)", path, shipped, SHIPPED_BASE, root, SHIPPED_BASE,
                 shipped.stem)
    defaults = {k: doc[k] for k in ("batch_size", "max_new_tokens", "limit") if k in doc}
    entries = []
    for name, spec in doc["benchmarks"].items():
        where = f"{p}: benchmarks.{name}"
        if not isinstance(spec, dict):
            raise ScoreInputError(f"{where}: expected a mapping {{task, questions, images, ...}}")
        unknown = set(spec) - _ENTRY_KEYS
        if unknown:
            raise ScoreInputError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(_ENTRY_KEYS)}")
        task = spec.get("task", name)
        if task not in TASKS:
            raise ScoreInputError(f"{where}: task {task!r} is not one of {list(TASKS)} (give 'task:' when the "
                                  f"name is not a task)")
        if "questions" not in spec:
            raise ScoreInputError(f"{where}: no 'questions'")
        for k in ("questions", "images", "annotations", "split", "image_template", "ocr"):  # paths, names: strings
            if k in spec and not isinstance(spec[k], str) and (spec[k] is not None or k in ("questions",
                                                                                      "image_template", "ocr")):
                raise ScoreInputError(f"{where}: {k} must be a string, got {spec[k]!r}")
        for k, tasks in TASK_SETTINGS.items():  # a setting another task would ignore: a mistake, named
            if spec.get(k) is not None and task not in tasks:
                raise ScoreInputError(f"{where}: {k} applies to {', '.join(tasks)} only, not {task}")
        opts = {**defaults, **{k: spec[k] for k in ("batch_size", "max_new_tokens", "limit", "split",
                                                     "image_template", "likelihood", "box_frame", "lang",
                                                     "allow_missing")
                               if k in spec}}
        if "ocr" in spec:
            opts["ocr"] = root / spec["ocr"]
        if opts.get("box_frame", "auto") not in ("auto", *FRAMES):
            raise ScoreInputError(f"{where}: box_frame must be one of {['auto', *FRAMES]}, got {opts['box_frame']!r}")
        if opts.get("lang", "auto") not in LANGS:
            raise ScoreInputError(f"{where}: lang must be one of {list(LANGS)}, got {opts['lang']!r}")
        if "likelihood" in opts:
            if not isinstance(opts["likelihood"], bool):
                raise ScoreInputError(f"{where}: likelihood must be true or false, got {opts['likelihood']!r}")
            if opts["likelihood"] and task not in LIKELIHOOD_TASKS:
                raise ScoreInputError(f"{where}: likelihood applies to the closed-set tasks "
                                      f"{list(LIKELIHOOD_TASKS)}, not {task}")
        if not isinstance(opts.get("allow_missing", False), bool):
            raise ScoreInputError(f"{where}: allow_missing must be true or false, got {opts['allow_missing']!r}")
        if opts.get("allow_missing") and task == "mme":
            raise ScoreInputError(f"{where}: allow_missing does not apply to mme (every image needs both answers)")
        for k in ("batch_size", "max_new_tokens", "limit"):
            if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], int) or opts[k] < 1):
                raise ScoreInputError(f"{where}: {k} must be an integer >= 1, got {opts[k]!r}")
        entries.append(SuiteEntry(str(name), task, root / str(spec["questions"]),
                                  root / str(spec["images"]) if spec.get("images") is not None else None,
                                  root / str(spec["annotations"]) if spec.get("annotations") is not None else None,
                                  opts))
    return entries


SHIPPED_BASE = "configs"
"""A shipped suite (``configs/NAME.yaml`` run where no such file exists) has its ``root`` taken relative to
``./configs``, where the command names it, as the repository's copy has it relative to the repository's
``configs/``: the same folders as running the command in a checkout."""


def shipped_suites() -> dict[str, Path]:
    """The shipped recipes that are suites (a top-level ``benchmarks:``): name -> file."""
    from emma_mamba.config import shipped_configs

    return {n: f for n, f in shipped_configs().items()
            if any(line.startswith("benchmarks:") for line in f.read_text(encoding="utf-8").splitlines())}


def shipped_suite(path: str | Path) -> Path | None:
    """The shipped suite ``path`` names when no such file exists (``configs/NAME.yaml``, ``NAME.yaml`` or ``NAME``,
    as :func:`emma_mamba.config.resolve_config_path` takes recipes), else None."""
    p = Path(path)
    if p.is_file() or p.is_absolute() or p.parent not in (Path("."), Path(SHIPPED_BASE)):
        return None
    return shipped_suites().get(p.name[:-5] if p.name.endswith(".yaml") else p.name)


def headline(task: str, metrics: dict | None) -> dict:
    """The numbers a paper's table reports for a benchmark (percent), from its metrics."""
    if metrics is None:
        return {}
    if task == "mme":
        if metrics.get("partial"):  # --limit cut the categories: no totals (emma_mamba.eval.runner._partial_mme)
            return {"partial": True}
        return {"perception": metrics["perception"], "cognition": metrics["cognition"]}
    out = {"accuracy": 100 * metrics["accuracy"]}
    if task == "pope":
        out["f1"] = 100 * metrics["f1"]
    return out


def run_suite(model, entries: list[SuiteEntry], out_dir: str | Path, *, checkpoint: str | None = None,
              progress: bool = True, only: list[str] | None = None, batch_size: int | None = None,
              max_new_tokens: int | None = None, limit: int | None = None, answer_fn=None, cuda_graphs: bool = False,
              compile: bool = False, likelihood: bool = False, shard: tuple[int, int] | None = None,
              sync=None, batching: str = "continuous", allow_missing: bool = False) -> dict | None:
    """Check every benchmark's files, then answer and score each; write and return the summary.

    ``batch_size``, ``max_new_tokens``, ``limit``: where not None (given on the command line), they win over the
    suite's and each entry's own values (module docstring); else those, else 8, the task's default and every
    question. ``allow_missing``: every benchmark scored as ``eval --allow-missing`` (else as its entry says);
    ``answer_fn`` and ``batching`` as in :func:`emma_mamba.eval.runner.evaluate`. ``likelihood``: every closed-set
    benchmark (``LIKELIHOOD_TASKS``) answered by its options' likelihood, unless its entry says otherwise.
    ``shard=(rank, world)`` with ``sync`` (a barrier): several processes (torchrun) share each benchmark's
    questions, rank 0 merges and scores after ``sync``; the other ranks return None."""
    out = Path(out_dir)
    kept: dict[str, dict] = {}  # --only: the other benchmarks' rows of this folder's summary, for this checkpoint
    suite_order = [e.name for e in entries]
    if only:
        names = set(suite_order)
        missing = [n for n in only if n not in names]
        if missing:
            raise ScoreInputError(f"--only {missing}: not in the suite (it has {sorted(names)})")
        entries = [e for e in entries if e.name in only]
        kept = _previous_rows(out, checkpoint, names - set(only))
    identity = _resolve_identity(None, answer_fn, checkpoint)  # one model answers every benchmark
    problems = []
    for e in entries:  # fail fast: every file, image and output folder is checked before any answering
        opts = _options(e, batch_size, max_new_tokens, limit, likelihood, allow_missing)
        try:  # the run as evaluate prepares it: the same questions, settings and eval_run.json
            prep = prepare_run(model, e.task, e.questions, e.images, **{k: opts[k] for k in _PREPARE_KEYS if k in opts})
            check_images(prep.questions, f"{e.task} {e.questions}")
            check_run_record(out / e.name, prep.record(identity))
        except ScoreInputError as err:  # every benchmark's first problem, not only the first benchmark's
            problems.append(f"benchmark {e.name!r}: {err}")
    if len(problems) == 1:
        raise ScoreInputError(problems[0])
    if problems:
        raise ScoreInputError(f"{len(problems)} of the {len(entries)} benchmarks cannot run:\n  "
                              + "\n  ".join(problems))
    from emma_mamba.training.parallel import all_gather_object

    rows, reports = [], {}
    try:
        for i, e in enumerate(entries, 1):
            log.info("[%d/%d] %s (%s)", i, len(entries), e.name, e.task)
            kw = dict(annotations=e.annotations, checkpoint=checkpoint, progress=progress, answer_fn=answer_fn,
                      cuda_graphs=cuda_graphs, compile=compile, identity=identity, check_files=False,
                      batching=batching, **_options(e, batch_size, max_new_tokens, limit, likelihood, allow_missing))
            if shard is None:
                rep = evaluate(model, e.task, e.questions, e.images, out / e.name, **kw)
            else:
                shards = all_gather_object(evaluate(model, e.task, e.questions, e.images, out / e.name, shard=shard,
                                                    sync=sync, **kw))  # (a barrier too)
                rep = None
                if shard[0] == 0:
                    merge_shards(out / e.name, shard[1])
                    rep = with_shard_counts(evaluate(model, e.task, e.questions, e.images, out / e.name, merged=True,
                                                     **kw), shards, out / e.name)
                sync()
                if rep is None:
                    continue
            reports[e.name] = rep
            m = rep["metrics"]
            n = m["n"] if m is not None and "n" in m else rep["n_questions"]  # MMBench: questions, not rounds
            row = {"benchmark": e.name, "task": e.task, "n": n, **headline(e.task, m)}
            if rep.get("limited"):  # a --limit run: "4 of 842" questions
                row["of"] = rep["limited"]["of"]
            fallback = rep["scored_from_replies"]
            if fallback is not None and (fallback["n"] or fallback["errors"]):  # not all by likelihood: said
                row["scored_from_replies"] = fallback["n"]
            rows.append(row)
    except BaseException as err:
        # keep the finished benchmarks' table (rank 0; the others write nothing), then let the error through
        if rows and (shard is None or shard[0] == 0):
            _write_summary(out, checkpoint, rows, [x for x in entries if x.name in reports],
                           failed={"benchmark": e.name, "error": f"{type(err).__name__}: {err}"})
        raise
    if shard is not None and shard[0] != 0:
        return None
    if kept:  # the whole suite's table again, in the suite's order, the benchmarks just run updated
        by_name = {**kept, **{r["benchmark"]: r for r in rows}}
        rows = [by_name[n] for n in suite_order if n in by_name]
        log.info("summary: %s kept from the previous run in %s (--only)", ", ".join(sorted(kept)), out)
    return _write_summary(out, checkpoint, rows, entries, kept)


_PREPARE_KEYS = ("image_template", "split", "likelihood", "lang", "ocr", "limit", "max_new_tokens", "box_frame")
"""The options of :func:`_options` that :func:`emma_mamba.eval.runner.prepare_run` takes."""


def _options(e: SuiteEntry, batch_size, max_new_tokens, limit, likelihood: bool, allow_missing: bool = False) -> dict:
    """Entry ``e``'s keyword arguments for :func:`evaluate`: the run's values given (not None) over its own values,
    those over the built-in defaults (batch size 8; the others None: the task's reply length, every question)."""
    given = {k: v for k, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("limit", limit))
             if v is not None}
    opts = {"batch_size": 8, "max_new_tokens": None, "limit": None, **e.options, **given,
            "likelihood": _likelihood(e, likelihood)}
    if allow_missing and e.task != "mme":  # MME is scored whole (or, cut by --limit, per category)
        opts["allow_missing"] = True
    return opts


def _previous_rows(out: Path, checkpoint, names: set[str]) -> dict[str, dict]:
    """The rows of ``names`` in ``out``'s summary.json when it was written for ``checkpoint`` and each one's
    metrics.json is still there (an --only rerun keeps the rest of the table); else none."""
    try:
        prev = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(prev, dict) or prev.get("checkpoint") != checkpoint:
        return {}
    return {r["benchmark"]: r for r in prev.get("benchmarks") or [] if isinstance(r, dict)
            and r.get("benchmark") in names and (out / r["benchmark"] / "metrics.json").is_file()}


def _write_summary(out: Path, checkpoint, rows: list[dict], entries: list[SuiteEntry],
                   kept: dict | None = None, failed: dict | None = None) -> dict:
    """Write and return ``summary.json`` / ``summary.md`` (with ``failed``: the benchmark that stopped the run;
    ``kept``: rows of benchmarks not run now, from the folder's previous summary)."""
    files = {e.name: str(out / e.name / "metrics.json") for e in entries}
    files.update({n: str(out / n / "metrics.json") for n in kept or {}})
    summary = {"checkpoint": checkpoint, "benchmarks": rows, "metrics_files": files}
    if failed is not None:
        summary["failed"] = failed
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    md = format_summary(rows)
    if failed is not None:
        md += f"\n\nIncomplete: benchmark {failed['benchmark']} failed ({failed['error']}); rerun to continue."
    (out / "summary.md").write_text(md + "\n", encoding="utf-8")
    return summary


def _likelihood(e: SuiteEntry, default: bool) -> bool:
    """Whether entry ``e`` is answered by likelihood: its own ``likelihood`` key, else the run's default where
    the task allows it."""
    if "likelihood" in e.options:
        return bool(e.options["likelihood"])
    return default and e.task in LIKELIHOOD_TASKS


def format_summary(rows: list[dict]) -> str:
    """A markdown table: one row per benchmark, its headline numbers (no ground truth: answers only)."""
    lines = ["| benchmark | task | questions | result |", "| --- | --- | --- | --- |"]
    for r in rows:
        nums = {k: v for k, v in r.items()
                if k not in ("benchmark", "task", "n", "of", "partial", "scored_from_replies")}
        text = ", ".join(f"{k} {v:.2f}" for k, v in nums.items()) or (
            "partial answers (--limit): no totals" if r.get("partial") else "answers only (no ground truth)")
        if "scored_from_replies" in r:  # a likelihood benchmark that fell back to parsed replies
            n = r["scored_from_replies"]
            text += (f"; {n if n is not None else 'some'} scored from parsed replies, not by likelihood (see its "
                     f"metrics.json: scored_from_replies)")
        n = f"{r['n']} of {r['of']}" if r.get("of") is not None else r["n"]  # a --limit run
        lines.append(f"| {r['benchmark']} | {r['task']} | {n} | {text} |")
    return "\n".join(lines)
