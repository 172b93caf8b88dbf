"""`emma-mamba <command>`: one entry point for every job.

Each command lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int | None``;
a module is imported only when its command runs, so `emma-mamba --help` stays instant and a command's heavy
imports (open_clip, transformers) never slow the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command path -> (module, one-line help). Add a command by adding one line here.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("bench", "kernels"): ("emma_mamba.bench.kernels", "time the selective-scan kernels against the reference and peers"),
    ("data", "shapes"): ("emma_mamba.data.cli_shapes", "generate the ShapesWorld synthetic data set (LLaVA JSON + benchmarks)"),
    ("data", "lrv"): ("emma_mamba.data.lrv", "convert LRV-Instruct's release into LLaVA-format training data (the paper's mixture)"),
    ("data", "check"): ("emma_mamba.data.cli_check", "check a run's data before training: every record and image, lengths, steps per epoch"),
    ("score",): ("emma_mamba.eval.cli_score", "score an answers file against a benchmark's standard annotation files"),
    ("configs",): ("emma_mamba.recipes", "list the shipped recipes (configs/*.yaml) or copy them into a folder to edit"),
    ("convert", "cobra"): ("emma_mamba.convert", "a released Cobra model (han1997/cobra) as an EmmaMamba checkpoint: its projector and LM, local vision weights"),
    ("export",): ("emma_mamba.export", "a checkpoint as a model to share: inference weights (bf16 optional), or the LM in transformers' layout"),
    ("info",): ("emma_mamba.info", "parameter report of a model preset or config, per module and training stage"),
    ("env",): ("emma_mamba.envinfo", "versions, compiled kernels, GPUs and their coverage, backends and their choice: for bug reports"),
    ("generate",): ("emma_mamba.inference.cli_generate", "answer about an image (--checkpoint) or continue text (--lm), streamed"),
    ("serve",): ("emma_mamba.inference.cli_serve", "OpenAI-compatible chat-completions HTTP API over a checkpoint (images as data: URLs, streaming)"),
    ("visualize",): ("emma_mamba.inference.cli_visualize", "heat maps of how strongly the LM carries each image patch through its layers"),
    ("chat",): ("emma_mamba.inference.cli_chat", "multi-turn chat about an image (or text), the Mamba state carried between turns"),
    ("bench", "lm"): ("emma_mamba.bench.lm", "CPU prefill/decode speed of MambaLM vs transformers' MambaForCausalLM"),
    ("bench", "latency"): ("emma_mamba.bench.latency", "TTFT, decode latency vs context, tokens/s, memory: EMMA-Mamba vs a matched transformer MLLM"),
    ("pretrain",): ("emma_mamba.training.cli_train", "stage 1: train MFF, projector, instruction fusion (ViT and LM frozen)"),
    ("finetune",): ("emma_mamba.training.cli_train", "stage 2: also train the LM and the alignment head (or one-stage recipes)"),
    ("plot",): ("emma_mamba.training.cli_plot", "training curves (loss, lr, grad norm, tokens/s) of one or several runs as a PNG"),
    ("eval",): ("emma_mamba.eval.cli_eval", "answer and score a benchmark (VQAv2, GQA, POPE, MME, MMBench, VSR, ...) with a checkpoint or an API"),
    ("quickstart",): ("emma_mamba.quickstart", "ShapesWorld end to end on a CPU in minutes: data, stage 0 (a tiny CLIP), stage 1, stage 2, eval, a demo answer"),
    ("ablate",): ("emma_mamba.ablation", "ShapesWorld ablation: cobra-like vs +MFF, +alignment head, +instruction fusion, all; seeds"),
}


def _groups():
    groups: dict[str, list[tuple[str, ...]]] = {}
    for path in COMMANDS:
        groups.setdefault(path[0], []).append(path)
    return groups


def _usage() -> str:
    lines = ["usage: emma-mamba <command> [options]", "", "commands:"]
    for path, (_, help_) in sorted(COMMANDS.items()):
        lines.append(f"  {' '.join(path):<22} {help_}")
    lines.append("")
    lines.append("`emma-mamba <command> --help` shows a command's options.")
    return "\n".join(lines)


def _did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """' (did you mean --train.lr?)' for a mistyped option close to a real one, else ''."""
    import difflib

    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1, cutoff=0.75)
            if close:
                hints.append(close[0])
    return f" (did you mean {' / '.join(hints)}?)" if hints else ""


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (threads, workers): argparse names the option."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def as_options(message: str, owner: str) -> str:
    """``message`` with ``<owner>.field`` names written as the command-line options that set them
    (``GenerationConfig.top_p`` -> ``--top-p``): an error names what the user typed."""
    import re

    return re.sub(rf"{re.escape(owner)}\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


class _TorchrunErrorFile:
    """Under torchrun (``TORCHELASTIC_ERROR_FILE`` set for each process), what this process failed with goes into
    that file, as torch's ``@record`` writes it, so torchrun's closing summary of failed processes shows the error
    (its ``traceback :`` line) instead of ``error_file: <N/A>`` and a pointer to the elastic docs. A command's error
    is one line on stderr and a non-zero exit, not an exception: stderr's tail is kept while the command runs and
    its last error line (from the last line that starts ``emma-mamba`` or ``[rank``, else the last line) is what is
    recorded; an uncaught exception is recorded with its traceback, as ``@record`` does."""

    KEEP = 8192

    def __init__(self, path: str, stream):
        self.path, self.stream, self.tail = path, stream, ""

    def write(self, text):
        self.tail = (self.tail + text)[-self.KEEP:]
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, ...: the real stream's
        return getattr(self.stream, name)

    def last_error(self) -> str:
        lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in self.tail.splitlines()]  # a progress bar's last frame
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            return ""
        starts = [i for i, ln in enumerate(lines) if ln.startswith(("emma-mamba", "[rank"))]
        return "\n".join(lines[starts[-1]:] if starts else lines[-1:])

    def record(self, message: str, callstack: str) -> None:
        import json
        import time

        data = {"message": {"message": message, "extraInfo": {"py_callstack": callstack,
                                                              "timestamp": str(int(time.time()))}}}
        try:
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(data, f)
        except OSError as e:  # the summary then says <N/A>, as before; the error itself is on stderr already
            self.stream.write(f"emma-mamba: could not write torchrun's error file {self.path}: {e}\n")

    def record_exit(self, code) -> None:
        """A non-zero exit: its last error line on stderr (or the exit code) as the message."""
        if code not in (0, None):
            line = self.last_error() or f"exit {code}"
            self.record(line, line)


def main(argv: list[str] | None = None) -> int:
    import os

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return _main_reporting(argv)
    errors = _TorchrunErrorFile(path, sys.stderr)
    sys.stderr = errors
    try:
        rc = _main_reporting(argv)
    except SystemExit as e:  # argparse's usage errors (exit 2, the message on stderr)
        errors.record_exit(e.code)
        raise
    except BaseException as e:
        import traceback

        errors.record(f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    finally:
        sys.stderr = errors.stream
    errors.record_exit(rc)
    return rc


# optional packages some commands import (module -> what to pip install): the peers of the benchmarks, plots, W&B
_OPTIONAL_PACKAGES = {"transformers": "transformers", "mambapy": "mambapy", "matplotlib": "matplotlib",
                      "wandb": "wandb", "lmms_eval": '"lmms-eval>=0.7.3,<0.8" "filelock<4"', "timm": "timm",
                      "openai": "openai", "mamba_ssm": "mamba-ssm (see docs/install.md: GPU peers)",
                      "causal_conv1d": "causal-conv1d (see docs/install.md: GPU peers)"}


def _main_reporting(argv: list[str] | None) -> int:
    try:
        rc = _main(argv)
        sys.stdout.flush()  # a short output still in the buffer meets the closed pipe here, not at exit
        return rc
    except RuntimeError as e:  # a kernel backend asked for (EMMA_MAMBA_BACKEND) that cannot run here, or CPU
        ops = sys.modules.get("emma_mamba.ops")  # kernels asked for (EMMA_CPU_ISA) that this CPU lacks: one line
        first = str(e).splitlines()[0] if str(e) else ""
        if first.startswith("emma_mamba: EMMA_CPU_ISA="):  # the compiled kernels' TORCH_CHECK, from deep inside
            print(f"emma-mamba: {first.removeprefix('emma_mamba: ')}", file=sys.stderr)
            return 2
        if ops is None or not isinstance(e, ops.BackendUnavailableError):
            raise
        print(f"emma-mamba: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package a command needs (a base install lacks the peers): one line
        top = (e.name or "").partition(".")[0]
        if top not in _OPTIONAL_PACKAGES:
            raise
        print(f"emma-mamba: this command needs {top}, which is not installed: pip install {_OPTIONAL_PACKAGES[top]}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where a command has no handling of its own (while torch imports): one line
        print("emma-mamba: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `emma-mamba info ... | head`: the reader left; say nothing more, as `cat` does
        if not _stdout_reader_gone():
            raise  # another pipe or socket (an HTTP peer that went away): an error to report, not silence
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by the broken pipe


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file behind stdout, or no poll() here
        return False


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from emma_mamba import __version__
        print(f"emma-mamba {__version__}")
        return 0
    path = None
    for n in (2, 1):
        if tuple(argv[:n]) in COMMANDS:
            path = tuple(argv[:n])
            break
    if path is None:
        group = _groups().get(argv[0])
        if group and argv[1:2] in (["-h"], ["--help"]):  # `emma-mamba bench --help`: the group's commands
            width = max(len(" ".join(p)) for p in group) + 2
            print(f"usage: emma-mamba {argv[0]} {{{','.join(p[1] for p in group)}}} [options]\n\ncommands:\n"
                  + "\n".join(f"  {' '.join(p):<{width}} {COMMANDS[p][1]}" for p in group)
                  + f"\n\n`emma-mamba {argv[0]} <command> --help` shows a command's options.")
            return 0
        if group:
            subs = ", ".join(p[1] for p in group)
            print(f"emma-mamba {argv[0]}: choose one of: {subs}", file=sys.stderr)
        else:
            import difflib

            names = sorted({p[0] for p in COMMANDS} | {" ".join(p) for p in COMMANDS})
            close = difflib.get_close_matches(argv[0], names, n=1, cutoff=0.7)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            print(f"emma-mamba: unknown command {argv[0]!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, help_ = COMMANDS[path]
    parser = argparse.ArgumentParser(prog="emma-mamba " + " ".join(path), description=help_)
    mod = importlib.import_module(module)
    mod.add_arguments(parser)
    args, unknown = parser.parse_known_args(argv[len(path):])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(parser, unknown)}")
    from emma_mamba.config import ConfigError

    # --threads (quickstart, bench) sets torch's process-wide thread count: put it back when a command called in
    # a process that already uses torch (main(argv), as the tests do) returns, rather than leaving every later
    # torch op on that count (a fresh CLI process need not import torch for it)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    levels = _log_levels()  # likewise the levels commands give the package's loggers (INFO, quiet_logs' ERROR)
    try:
        rc = mod.run(args)
    except ConfigError as e:  # a bad config file or key: the message names it, a traceback would bury it
        print(f"emma-mamba {' '.join(path)}: {e}", file=sys.stderr)
        return 2
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        _restore_log_levels(levels)
    return int(rc or 0)


def _package_loggers() -> list:
    """The package's loggers created so far (``emma_mamba`` and below)."""
    import logging

    return [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
            if n == "emma_mamba" or n.startswith("emma_mamba.")]


def _log_levels() -> dict:
    """The levels of the package's loggers set so far, and the root logger's level and handlers (commands call
    logging.basicConfig)."""
    import logging

    root = logging.getLogger()
    return {"loggers": {lg.name: lg.level for lg in _package_loggers()}, "root": (root.level, list(root.handlers))}


def _restore_log_levels(levels: dict) -> None:
    """Put the package's loggers back at ``levels`` (:func:`_log_levels`), one created since at NOTSET (its parent's
    level), and the root logger's level and handlers: a command run through :func:`main` in a longer process (the
    tests, a notebook) leaves no logger quieter or louder than it found it."""
    import logging

    for lg in _package_loggers():
        lg.setLevel(levels["loggers"].get(lg.name, logging.NOTSET))
    root = logging.getLogger()
    level, handlers = levels["root"]
    root.setLevel(level)
    for h in [h for h in root.handlers if h not in handlers]:  # basicConfig's, added by the command
        root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)


if __name__ == "__main__":
    sys.exit(main())
