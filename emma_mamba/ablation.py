"""`emma-mamba ablate`: what each EMMA component buys, on ShapesWorld, over several seeds.

    emma-mamba ablate [--config configs/quickstart.yaml] [--seeds 0 1 2] [--out runs/ablation]
                      [--results benchmarks/results/ablation.json] [--plot benchmarks/results/ablation.png]

Five model variants, each trained with the quickstart pipeline (:mod:`emma_mamba.quickstart`: stage 1, stage 2,
held-out evaluation) from the same recipe, differing only in the model section:

| variant       | ViT taps      | MFF      | instruction fusion | pixel alignment head |
| ------------- | ------------- | -------- | ------------------ | -------------------- |
| cobra-like    | penultimate   | none     | off                | off                  |
| +MFF          | recipe's taps | recipe's | off                | off                  |
| +align        | penultimate   | none     | off                | on                   |
| +instruction  | penultimate   | none     | on                 | off                  |
| all (EMMA)    | recipe's taps | recipe's | on                 | on                   |

The data set (ShapesWorld ``--data-seed``, default 0) is the same for every run; ``--seeds`` vary the model
initialisation and the data order. Per metric the table reports mean ± sample standard deviation (ddof = 1)
over seeds. When the recipe has a stage 0 (``clip``), one CLIP is pretrained per seed and shared by every
variant of that seed, as one downloaded CLIP would be. Runs go one at a time or, with ``--jobs N``, N at once
in worker processes; they are resumable: each finished run leaves
``<out>/<variant>/seed<k>/result.json`` and is skipped on a rerun; the results JSON is rewritten after every
run, so an interrupted ablation still leaves its finished part.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from emma_mamba.fileio import write_whole

__all__ = ["VARIANTS", "METRICS", "variant_model", "stage_overrides_for", "aggregate", "markdown_table", "plot", "run_ablation"]

log = logging.getLogger("emma_mamba.ablation")

VARIANTS: dict[str, dict] = {
    "cobra-like": {"mff": False, "instruction": False, "align": False},
    "+MFF": {"mff": True, "instruction": False, "align": False},
    "+align": {"mff": False, "instruction": False, "align": True},
    "+instruction": {"mff": False, "instruction": True, "align": False},
    "all (EMMA)": {"mff": True, "instruction": True, "align": True},
}
"""Variant name -> which of the three EMMA components it turns on."""

METRICS: tuple[tuple[str, str, str], ...] = (
    ("vqav2", "accuracy", "VQAv2 acc"),
    ("gqa", "accuracy", "GQA acc"),
    ("pope_random", "accuracy", "POPE-rand acc"),
    ("pope_popular", "accuracy", "POPE-pop acc"),
    ("pope_adversarial", "accuracy", "POPE-adv acc"),
    ("pope_adversarial", "f1", "POPE-adv F1"),
)
"""(task, metric, column label) reported in the table and the plot (all fractions, shown in percent)."""


PARTIAL_DATA_MARKER = ".ablation-data-partial"  # under --out while data/ is being written (run_ablation)

def variant_model(base: dict, on: dict) -> dict:
    """The model config mapping of a variant: ``base`` (the recipe's model, e.g. the tiny preset with every
    component on) with the components that ``on`` turns off removed. Off MFF = the penultimate ViT block only
    (mff.mode none, taps [-2]), the LLaVA/Cobra feature layer."""
    from emma_mamba.config import config_from_dict, config_to_dict

    cfg = config_from_dict(copy.deepcopy(base), source="ablation base model")
    if not on["mff"]:
        cfg.vision.taps = [-2]
        cfg.mff.mode = "none"
    elif cfg.mff.mode == "none" or len(cfg.vision.taps) < 2:
        raise ValueError("the ablation's base model must have MFF on (several vision.taps and an mff.mode)")
    cfg.instruction.enabled = bool(on["instruction"])
    cfg.align.enabled = bool(on["align"])
    cfg.name = f"{cfg.name}-ablation"
    d = config_to_dict(cfg.validate())
    d.pop("name")
    return d


def aggregate(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1; 0.0 for a single value)."""
    if not values:
        raise ValueError("aggregate: no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: mean and std of each METRICS entry over its runs (each run: {"metrics": {task: {...}}})."""
    out = {}
    for name, rs in runs.items():
        if not rs:
            continue
        stats = {}
        for task, metric, label in METRICS:
            m, s = aggregate([r["metrics"][task][metric] for r in rs])
            stats[label] = {"mean": m, "std": s}
        out[name] = {"n_seeds": len(rs), "seeds": [r["seed"] for r in rs], "stats": stats}
    return out


def markdown_table(summary: dict, chance: dict | None = None) -> str:
    """Mean ± std (percent) per variant and metric (a variant of one seed: its value, no spread); an optional first
    row with the blind baseline."""
    labels = [label for _, _, label in METRICS]
    lines = ["| variant | seeds | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    if chance:
        lines.append("| blind baseline (chance) | - | " + " | ".join(
            f"{100 * chance[task][metric]:.1f}" for task, metric, _ in METRICS) + " |")
    for name, v in summary.items():
        cells = [f"{100 * v['stats'][l]['mean']:.1f}" + (f" ± {100 * v['stats'][l]['std']:.1f}" if v["n_seeds"] > 1
                                                          else "") for l in labels]  # one seed: no spread
        lines.append(f"| {name} | {v['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path, chance: dict | None = None, title: str = "") -> Path:
    """Grouped bars (one group per metric, one bar per variant) with ±std error bars; chance as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for _, _, label in METRICS]
    names = list(summary)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, name in enumerate(names):
        st = summary[name]["stats"]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(labels))]
        ax.bar(xs, [100 * st[l]["mean"] for l in labels], width, yerr=[100 * st[l]["std"] for l in labels],
               capsize=3, label=f"{name} (n={summary[name]['n_seeds']})")
    if chance:
        for j, (task, metric, _) in enumerate(METRICS):
            ax.hlines(100 * chance[task][metric], j - 0.42, j + 0.42, colors="k", linestyles="dashed",
                      label="blind baseline (chance)" if j == 0 else None)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("percent (mean ± std over seeds)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "ShapesWorld ablation")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_ablation(config: str | Path, out: str | Path, seeds: list[int], variants: list[str], results: str | Path,
                 plot_path: str | Path | None, data_seed: int = 0, progress: bool = False, echo=print,
                 jobs: int = 1, threads: int = 1) -> dict:
    from emma_mamba.quickstart import blind_chance, load_quickstart_config, make_data

    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    for flag, given in (("--seeds", seeds), ("--variants", variants)):  # a repeat would be trained and counted twice
        twice = next((x for i, x in enumerate(given) if x in given[:i]), None)
        if twice is not None:
            raise ValueError(f"{flag}: {twice!r} is given twice (each is one run, counted once in the mean and "
                             f"std)")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    from emma_mamba.quickstart import check_recipe, check_seed

    for s in seeds:
        check_seed(s, "--seeds")
    qc = load_quickstart_config(config)
    for v in variants:  # every variant's stage configs, before the data and stage 0 are made
        on = VARIANTS[v]
        vq = copy.copy(qc)
        vq.stage1, vq.stage2 = stage_overrides_for(qc.stage1, on), stage_overrides_for(qc.stage2, on)
        check_recipe(vq, seeds[0] if seeds else 0, str(config), model=variant_model(qc.model, on))
    out = Path(out)
    data_dir, blind_dir = out / "data", out / "blind"
    # meta.json is written before the word tokenizer and the blind baseline: both must be there
    if not ((data_dir / "meta.json").is_file() and (data_dir / "tokenizer" / "tokenizer.json").is_file()):
        # an incomplete data folder is deleted only when this command began it (its marker beside it): a folder
        # named `data` that the user keeps under --out (`ablate --out .` in a project) is not ShapesWorld's
        partial = out / PARTIAL_DATA_MARKER
        if data_dir.exists() and any(data_dir.iterdir()):
            if not partial.is_file():
                raise ValueError(f"{data_dir} holds files that no ablation wrote (no ShapesWorld meta.json, no "
                                 f"{PARTIAL_DATA_MARKER} beside it); refusing to replace it: choose another --out")
            shutil.rmtree(data_dir)
        out.mkdir(parents=True, exist_ok=True)
        partial.write_text("ShapesWorld is being written into data/ by emma-mamba ablate\n")
        make_data(qc, data_dir, data_seed, blind_dir)  # the same data for every variant and seed
        partial.unlink()
    meta = json.loads((data_dir / "meta.json").read_text())
    from emma_mamba.data.shapes import ShapesConfig

    # the whole ShapesWorld config must match (a key missing from an older meta.json counts as its default)
    want = json.loads(json.dumps(asdict(ShapesConfig(seed=data_seed, **qc.data))))  # tuples -> lists
    have = {**json.loads(json.dumps(asdict(ShapesConfig()))), **meta["config"]}
    differ = [k for k in want if have[k] != want[k]]
    if differ:
        detail = ", ".join(f"{k}: {have[k]!r} there, {want[k]!r} in the recipe" for k in differ)
        raise ValueError(f"{data_dir} holds a different ShapesWorld ({detail}); use another --out")
    blind_files, chance = blind_chance(data_dir, blind_dir)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    t_start = time.perf_counter()
    todo = []
    for v in variants:
        for seed in seeds:
            res_file = out / _slug(v) / f"seed{seed}" / "result.json"
            if res_file.is_file():
                rec = json.loads(res_file.read_text())
                want = _run_recipe(qc, v)
                if "recipe" in rec and rec["recipe"] != want:  # (older result.json files hold none)
                    differ = sorted(k for k in set(want) | set(rec["recipe"]) if rec["recipe"].get(k) != want.get(k))
                    raise ValueError(f"{res_file} is a run of another recipe (it differs in: {', '.join(differ)}); "
                                     f"use another --out, or delete {res_file.parent} to train it again")
                runs[v].append(rec)
                echo(f"{v} seed {seed}: done earlier ({res_file})")
            else:
                todo.append((v, seed))
    # Stage 0 (when the recipe has one): one CLIP per seed, shared by every variant of that seed, as one
    # downloaded CLIP would be; the variants differ only in what they build on it.
    clip_ckpts: dict[int, Path | None] = {seed: None for seed in seeds}
    if int(qc.clip.get("steps", 0) or 0) > 0:
        for seed in sorted({s for _, s in todo}):
            clip_ckpts[seed] = out / "clip" / f"seed{seed}" / "open_clip.pt"
        need = [s for s, p in clip_ckpts.items() if p is not None and not p.is_file()]
        failed = _parallel(_clip_job, [(str(config), str(out), str(data_dir), s, clip_ckpts[s], progress)
                                       for s in need], jobs, threads,
                           lambda r: echo(f"stage 0 (CLIP) seed {r['seed']}: loss {r['first_loss']:.3f} -> "
                                          f"{r['last_loss']:.3f}, in-batch retrieval {100 * r['last_i2t_acc']:.0f}%"),
                           name=lambda a: f"stage 0 (CLIP) seed {a[3]}")
        if failed:  # every variant of that seed needs it
            raise RunsFailed(failed)

    def done(rec):
        runs[rec["variant"]].append(rec)
        echo(f"{rec['variant']} seed {rec['seed']}: " + ", ".join(
            f"{label} {100 * rec['metrics'][task][metric]:.1f}" for task, metric, label in METRICS)
            + f" ({rec['seconds']['total']:.0f}s)")
        _write(results, plot_path, qc, config, seeds, data_seed, runs, chance, meta, t_start, jobs)

    failed = _parallel(_variant_job, [(str(config), str(out), str(data_dir), v, s, clip_ckpts[s], blind_files, chance,
                                       progress) for v, s in todo], jobs, threads, done,
                       name=lambda a: f"{a[3]} seed {a[4]}")
    for v in runs:  # the table lists seeds in order whatever order the runs finished in
        runs[v].sort(key=lambda r: r["seed"])
    doc = _write(results, plot_path, qc, config, seeds, data_seed, runs, chance, meta, t_start, jobs)
    if failed:
        raise RunsFailed(failed, doc)
    return doc


class RunsFailed(Exception):
    """Some runs raised; the others finished and are in the results (``doc``). ``failed``: [(run, error)]."""

    def __init__(self, failed: list[tuple[str, BaseException]], doc: dict | None = None):
        self.failed, self.doc = failed, doc
        super().__init__("; ".join(f"{name} failed: {type(e).__name__}: {e}" for name, e in failed))


def _run_recipe(qc, v: str) -> dict:
    """What a variant's run of this recipe trains and evaluates (kept in its result.json: a rerun with another
    recipe into the same --out is refused rather than mixing its runs with the old ones)."""
    on = VARIANTS[v]
    doc = {"model": variant_model(qc.model, on), "clip": qc.clip, "stage1": stage_overrides_for(qc.stage1, on),
           "stage2": stage_overrides_for(qc.stage2, on), "eval": qc.eval}
    return json.loads(json.dumps(doc))


def stage_overrides_for(stage: dict, on: dict) -> dict:
    """A recipe's stage overrides for a variant: modules the variant does not have are dropped from
    ``train.trainable`` (a recipe that trains instruction fusion in stage 1 still runs the variant without it)."""
    stage = copy.deepcopy(stage)
    trainable = (stage.get("train") or {}).get("trainable")
    if trainable is not None:
        absent = {"instruction"} if not on["instruction"] else set()
        absent |= {"align_head"} if not on["align"] else set()
        stage["train"]["trainable"] = [m for m in trainable if m not in absent]
    return stage


def _parallel(fn, args_list: list[tuple], jobs: int, threads: int, on_result, name=repr) -> list:
    """Runs ``fn(*args)`` for each args tuple, in this process (jobs=1) or in ``jobs`` worker processes (spawned,
    each with ``threads`` torch threads), calling ``on_result`` with each result as it finishes. A run that
    raises does not stop the others: returns [(name(args), exception)] of the failed ones. Ctrl-C or SIGTERM
    stops the workers too (SIGTERM to each: a training stage checkpoints and stops) before it is raised."""
    from emma_mamba.training import TrainingInterrupted

    failed = []
    if not args_list:
        return failed
    if jobs == 1:
        for a in args_list:
            try:
                r = fn(*a)
            except TrainingInterrupted:  # Ctrl-C / SIGTERM inside a training stage: stop, as anywhere else
                raise
            except Exception as e:
                log.error("%s failed: %s: %s", name(a), type(e).__name__, e)
                failed.append((name(a), e))
                continue
            on_result(r)
        return failed
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    before = {p.pid for p in mp.active_children()}
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(args_list)), mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))
    try:
        futures = {pool.submit(fn, *a): a for a in args_list}
        for f in as_completed(futures):
            try:
                r = f.result()
            except TrainingInterrupted:
                raise
            except Exception as e:
                log.error("%s failed: %s: %s", name(futures[f]), type(e).__name__, e)
                failed.append((name(futures[f]), e))
                continue
            on_result(r)
    except BaseException:
        for p in mp.active_children():  # the pool's workers: this process's children started since the pool
            if p.pid not in before:
                p.terminate()  # SIGTERM: without it the workers of a killed parent train on, orphaned
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failed


def _worker_init(threads: int) -> None:
    from emma_mamba.quickstart import quiet_logs, set_threads

    quiet_logs()
    set_threads(threads)


def _clip_job(config: str, out: str, data_dir: str, seed: int, ckpt: Path, progress: bool) -> dict:
    from emma_mamba.quickstart import load_quickstart_config, pretrain_clip_stage

    qc = load_quickstart_config(config)
    ckpt = Path(ckpt)  # (written whole or not at all: a rerun trusts any open_clip.pt it finds)
    _, res, _ = pretrain_clip_stage(qc, Path(out), Path(data_dir), seed, progress=progress, checkpoint=ckpt)
    return {**res, "checkpoint": str(ckpt), "seed": seed}


def _variant_job(config: str, out: str, data_dir: str, v: str, seed: int, clip_ckpt: Path | None, blind_files: dict,
                 chance: dict, progress: bool) -> dict:
    from emma_mamba.models.vlm import load
    from emma_mamba.quickstart import evaluate_heldout, load_quickstart_config, train_stages

    qc = load_quickstart_config(config)
    on = VARIANTS[v]
    recipe = _run_recipe(qc, v)  # (before the variant's overrides are applied to qc below)
    qc.stage1 = stage_overrides_for(qc.stage1, on)
    qc.stage2 = stage_overrides_for(qc.stage2, on)
    run_dir = Path(out) / _slug(v) / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it again
    t0 = time.perf_counter()
    hist, t_train = train_stages(qc, run_dir, Path(data_dir), seed, source=config, model=variant_model(qc.model, on),
                                 progress=progress, clip_checkpoint=clip_ckpt)
    model = load(run_dir / "stage2")
    metrics, ch = evaluate_heldout(model, qc, Path(data_dir), run_dir / "eval", blind_files, chance,
                                   checkpoint=str(run_dir / "stage2"), progress=progress)
    rec = {"variant": v, "seed": seed, "components": on, "recipe": recipe,
           "metrics": metrics, "chance": ch,
           "clip_checkpoint": None if clip_ckpt is None else str(clip_ckpt),
           "training": hist, "seconds": {**t_train, "total": time.perf_counter() - t0}}
    # whole or not at all: a rerun skips every run with a result.json
    write_whole(run_dir / "result.json", lambda tmp: tmp.write_text(json.dumps(rec, indent=1) + "\n"))
    return rec


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


def _write(results, plot_path, qc, config, seeds, data_seed, runs, chance, meta, t_start, jobs=1) -> dict:
    from emma_mamba.quickstart import run_environment

    summary = summarise(runs)
    # chance on the questions actually evaluated (eval.limit may cut the files): from any finished run
    first = next((r for rs in runs.values() for r in rs), None)
    ch = first["chance"] if first else chance
    doc = {
        "what": "ShapesWorld ablation of the EMMA components (emma-mamba ablate)",
        "config": str(config), "recipe": {"data": qc.data, "model": qc.model, "clip": qc.clip,
                                          "stage1": qc.stage1, "stage2": qc.stage2, "eval": qc.eval},
        "data_seed": data_seed, "seeds": seeds, "std": "sample standard deviation over seeds (ddof=1)",
        "variants": {v: VARIANTS[v] for v in runs},
        "summary": summary, "table_markdown": markdown_table(summary, ch),
        "chance": {t: ch[t] for t in ch}, "runs": runs,
        "seconds": time.perf_counter() - t_start,
        "seconds_of_runs": sum(r["seconds"]["total"] for rs in runs.values() for r in rs), "jobs": jobs,
        **run_environment(), "data_counts": meta["counts"],
    }
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(doc, indent=1) + "\n")
    if plot_path and summary:
        plot(summary, plot_path, ch, title=f"ShapesWorld ablation, tiny preset, seeds {seeds}")
    return doc


# ------------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from emma_mamba.cli import positive_int

    p.add_argument("--config", default=None, help="quickstart-format recipe (default configs/quickstart.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--data-seed", type=int, default=0, help="ShapesWorld seed shared by every run (default 0)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                   help=f"subset of: {', '.join(repr(v) for v in VARIANTS)}")
    p.add_argument("--out", default="runs/ablation", help="run folder (resumable; default %(default)s)")
    p.add_argument("--results", default="benchmarks/results/ablation.json", help="results JSON (default %(default)s)")
    p.add_argument("--plot", default="benchmarks/results/ablation.png", help="PNG plot (default %(default)s; '' = none)")
    p.add_argument("--progress", action="store_true", help="progress bars for every stage")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads per run (default 1; see quickstart)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel, each in its own process with --threads threads (default 1; on an "
                        "N-core CPU, --jobs N with --threads 1 keeps every core busy with the tiny model)")


def run(args: argparse.Namespace) -> int:
    from emma_mamba.config import ConfigError
    from emma_mamba.quickstart import quiet_logs, recipe_path, set_threads

    quiet_logs()
    set_threads(args.threads)
    from emma_mamba.quickstart import interrupted_exit, sigterm_as_interrupt
    from emma_mamba.training import TrainingInterrupted

    previous = sigterm_as_interrupt()
    try:
        config = recipe_path(args.config)
        doc = run_ablation(config, args.out, args.seeds, args.variants, args.results, args.plot or None,
                           data_seed=args.data_seed, progress=args.progress, jobs=args.jobs, threads=args.threads,
                           echo=lambda line: print(line, flush=True))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"emma-mamba ablate: {e}", file=sys.stderr)
        return 2
    except RunsFailed as e:
        for name, err in e.failed:
            print(f"emma-mamba ablate: {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
        if e.doc is not None:
            print(f"the other runs' results are in {args.results}; a rerun trains only the failed and missing runs",
                  file=sys.stderr)
        return 1
    except (KeyboardInterrupt, TrainingInterrupted) as e:
        what, code = interrupted_exit(e)
        print(f"emma-mamba ablate: {what}; finished runs are kept (each run's result.json), a rerun of the same "
              f"command trains the others from their start", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print()
    print(doc["table_markdown"])
    print(f"\nresults in {args.results}" + (f", plot in {args.plot}" if args.plot else "")
          + f"; {doc['seconds']:.0f}s")
    return 0
