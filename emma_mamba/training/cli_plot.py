"""`emma-mamba plot`: training curves of one or several runs from their ``metrics.jsonl``, as one PNG.

    emma-mamba plot runs/stage1 runs/stage2                       # loss, lr, grad norm, tokens/s per run
    emma-mamba plot runs/a runs/b --keys lm_loss align_loss --smooth 100 --out ab.png

A run is a training ``output_dir`` (or its ``metrics.jsonl``, or a CLIP stage-0 ``clip_metrics.jsonl``). One
panel per metric, one line per run against the step (``--x total_tokens`` or ``epoch`` instead); raw values
are drawn faintly under their running mean over ``--smooth`` logged steps. A metric that is constant zero in
every run (``align_loss`` without the alignment head) is left out of the default panels. Validation records
(``val.json``: ``val_loss``, ``val_lm_loss``, ...) are drawn as dashed lines with markers in their training
metric's panel; ``val_token_acc`` gets its own. A file in which a step is logged more than once (two runs that
wrote into one output_dir at the same time) is plotted with a warning naming those steps. A NaN or inf value
(a diverged step) is left out of its curve (it would make the running mean NaN from there on), with a warning
naming the file, line and field; so is a line left out (a torn last line, a JSON value that is not an object).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from emma_mamba.fileio import output_problem, text_lines

PROFILED_SKIP = ("tokens_per_s", "step_time", "tflops", "mfu")
"""Timings left out of the curves for the steps run under the profiler (``profiled: true``: slower)."""
DEFAULT_KEYS = ("loss", "lm_loss", "align_loss", "lr", "grad_norm", "tokens_per_s", "val_token_acc")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl) or metrics files")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help=f"metrics to plot (default: those of {', '.join(DEFAULT_KEYS)} the runs logged)")
    p.add_argument("--x", default="step", choices=["step", "total_tokens", "epoch"], help="x axis (default step)")
    p.add_argument("--smooth", type=int, default=None,
                   help="running-mean window in logged steps (default: about 1/50 of the longest run; 1 = off)")
    p.add_argument("--out", default=None, help="PNG path (default: curves.png in the first run's directory)")


class PlotError(ValueError):
    pass


def metrics_file(run: str | Path) -> Path:
    p = Path(run)
    if p.is_dir():
        for name in ("metrics.jsonl", "clip_metrics.jsonl"):
            if (p / name).is_file():
                return p / name
        raise PlotError(f"{p}: no metrics.jsonl (is it a training output_dir?)")
    if p.is_file():
        return p
    raise PlotError(f"{p}: no such run directory or metrics file")


def read_metrics(path: Path) -> list[dict]:
    """The logged records of a metrics file; a torn last line (a run killed mid-write) is skipped."""
    return [rec for _, rec in read_metrics_lines(path)]


def read_metrics_lines(path: Path, skipped: list | None = None) -> list[tuple[int, dict]]:
    """(line number, record) of each logged record of a metrics file (:func:`read_metrics`); with ``skipped``
    given, the lines left out (a torn last line, a JSON value that is not an object) are appended to it as
    (line number, why)."""
    rows = []
    try:
        lines = text_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path}: cannot read it ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                if skipped is not None:
                    skipped.append((n, "the last line, not complete JSON (a run writing it, or killed mid-write)"))
                continue
            raise PlotError(f"{path}: line {n}: not valid JSON") from None
        if isinstance(rec, dict):
            rows.append((n, rec))
        elif skipped is not None:
            skipped.append((n, f"a JSON {type(rec).__name__}, not an object"))
    if not rows:
        raise PlotError(f"{path}: no metrics logged yet")
    return rows


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_points(rows: list[dict], key: str, x: str, skip_profiled: bool = True,
                 lines: list[int] | None = None, dropped: list | None = None) -> list[tuple[float, float]]:
    """The (x, value) points of ``key`` a panel draws from a run's records: those logging both as numbers, in
    file order; a non-finite value (NaN, inf: a diverged step) is left out (it would turn the running mean into
    NaN for the rest of the run) and, with ``dropped`` given, appended to it as (line number, field, value)
    (``lines``: each record's line number in the file)."""
    pts = []
    for i, r in enumerate(rows):
        xv, yv = r.get(x), r.get(key)
        if not (_number(xv) and _number(yv)) or (skip_profiled and key in PROFILED_SKIP and r.get("profiled")):
            continue
        bad = [(f, v) for f, v in ((key, yv), (x, xv)) if not math.isfinite(v)]
        if bad:
            if dropped is not None:
                dropped.extend((lines[i] if lines else i + 1, f, v) for f, v in bad)
            continue
        pts.append((xv, yv))
    return pts


def is_val(rec: dict) -> bool:
    """Whether a metrics record is a validation one (``val_*`` fields) rather than a training step's."""
    return any(k.startswith("val_") for k in rec)


def _ranges(steps: list[int]) -> str:
    """Sorted step numbers as ranges: [1, 2, 3, 7] -> '1-3, 7'."""
    out, start, prev = [], None, None
    for s in steps + [None]:
        if start is not None and (s is None or not isinstance(prev, int) or s != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if s is not None and start is None:
            start = s
        prev = s
    return ", ".join(out)


def duplicated_steps(rows: list[dict]) -> dict[str, list]:
    """{'training' / 'validation': the steps logged more than once} of a run's records (empty lists left out)."""
    out = {}
    for kind, val in (("training", False), ("validation", True)):
        seen, dup = set(), set()
        for r in rows:
            s = r.get("step")
            if is_val(r) != val:
                continue
            if isinstance(s, (int, float)) and not isinstance(s, bool):
                (dup if s in seen else seen).add(s)
        if dup:
            out[kind] = sorted(dup)
    return out


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _label(path: Path, all_paths: list[Path]) -> str:
    """The shortest trailing part of the run's directory that tells the runs apart."""
    parts = [p.parent.parts for p in all_paths]
    for k in range(1, max(len(x) for x in parts) + 1):
        tails = ["/".join(x[-k:]) for x in parts]
        if len(set(tails)) == len(tails):
            return "/".join(path.parent.parts[-k:])
    return str(path)


def run(args) -> int:
    try:
        return _run(args)
    except PlotError as e:
        print(f"emma-mamba plot: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    paths = [metrics_file(r) for r in args.runs]
    numbered = []
    for p in paths:  # every line left out is said: a curve shorter than the log without a word looks like a bug
        skipped: list = []
        numbered.append(read_metrics_lines(p, skipped))
        if skipped:
            print(f"emma-mamba plot: warning: {p}: {len(skipped)} line(s) left out: "
                  + "; ".join(f"line {n}: {why}" for n, why in skipped[:3]) + ("; ..." if len(skipped) > 3 else ""),
                  file=sys.stderr)
    runs = [(p, [rec for _, rec in recs]) for p, recs in zip(paths, numbered)]
    line_of = [[n for n, _ in recs] for recs in numbered]
    for p, rows in runs:  # a line through them would zigzag between two runs' values without a word
        dup = duplicated_steps(rows)
        if dup:
            print(f"emma-mamba plot: warning: {p}: " + "; ".join(
                f"{kind} step(s) {_ranges(steps)} logged more than once" for kind, steps in dup.items())
                + " (two runs wrote into this output_dir? its curves zigzag between them)", file=sys.stderr)
    n_train = [sum(1 for r in rows if not is_val(r)) for _, rows in runs]
    lacking = [str(p) for p, rows in runs if not any(isinstance(r.get(args.x), (int, float)) for r in rows)]
    if lacking:  # its lines would be left out without a word (every panel empty when no run has it)
        raise PlotError(f"--x {args.x}: not logged in {', '.join(lacking)} (a CLIP stage-0 clip_metrics.jsonl "
                        f"has step only); plot against --x step")
    present = sorted({k for _, rows in runs for r in rows for k, v in r.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if args.keys:
        unknown = [k for k in args.keys if k not in present]
        if unknown:
            raise PlotError(f"--keys {unknown} were not logged; the runs have: {', '.join(present)}")
        keys = list(args.keys)
    else:
        keys = [k for k in DEFAULT_KEYS if k in present
                and any(r.get(k) not in (None, 0, 0.0) or r.get("val_" + k) not in (None, 0, 0.0)
                        for _, rows in runs for r in rows)]
        if not keys:
            raise PlotError(f"none of {', '.join(DEFAULT_KEYS)} was logged; pass --keys (the runs have: "
                            f"{', '.join(present)})")
    if args.smooth is not None and args.smooth < 1:
        raise PlotError(f"--smooth must be >= 1, got {args.smooth}")
    window = args.smooth or max(1, max(n_train) // 50)
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out) if args.out else paths[0].parent / "curves.png"
    problem = output_problem(out, what=f"name the PNG file, e.g. {out / 'curves.png'}")
    if problem:  # before drawing: a directory, a parent that is a file, or not writable, named in one line
        raise PlotError(f"--out {out}: {problem}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(f"--out {out}: cannot create its folder {out.parent} ({e.strerror or e})") from None

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    dropped: dict[Path, list] = {p: [] for p in paths}  # non-finite values left out of the curves
    for ax, key in zip(axes.flat, keys):
        for i, (path, rows) in enumerate(runs):
            pts = curve_points(rows, key, args.x, lines=line_of[i], dropped=dropped[path])
            if not pts:
                continue
            xs, ys = zip(*pts)
            colour = f"C{i % 10}"
            if window > 1 and key != "lr" and not key.startswith("val_"):  # few validation points: drawn raw
                ax.plot(xs, ys, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(xs, running_mean(list(ys), window), color=colour, linewidth=1.5, label=_label(path, paths))
            else:
                ax.plot(xs, ys, color=colour, linewidth=1.5, label=_label(path, paths))
        for i, (path, rows) in enumerate(runs):  # validation points over their training metric
            pts = curve_points(rows, "val_" + key, args.x, lines=line_of[i], dropped=dropped[path])
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=f"C{i % 10}", linestyle="--", marker="o", markersize=3, linewidth=1.2,
                        label=_label(path, paths) + " (val)")
        ax.set_title(key + (" (- - val)" if any("val_" + key in r for _, rows in runs for r in rows) else ""))
        ax.set_xlabel(args.x)
        if key.endswith("loss") and all(v > 0 for _, rows in runs for r in rows for k in (key, "val_" + key)
                                        if _number(v := r.get(k)) and math.isfinite(v)):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{len(runs)} run(s); running mean over {window} logged steps" if window > 1 else f"{len(runs)} run(s)")
    fig.tight_layout()
    for path, bad in dropped.items():  # each (line, field) once: a value can be in two panels' data (--x)
        bad = sorted(set((n, f, repr(v)) for n, f, v in bad))
        if bad:
            shown = ", ".join(f"line {n}: {f} {v}" for n, f, v in bad[:5]) + (
                f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            print(f"emma-mamba plot: warning: {path}: {len(bad)} non-finite value(s) left out of the curves "
                  f"({shown})", file=sys.stderr)
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise PlotError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    n_val = sum(len(rows) for _, rows in runs) - sum(n_train)
    print(f"wrote {out} ({', '.join(keys)}; {sum(n_train)} logged steps"
          + (f" and {n_val} validation records" if n_val else "") + f" from {len(runs)} run(s))")
    return 0
