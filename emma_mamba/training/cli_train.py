"""`emma-mamba pretrain` and `emma-mamba finetune`: run one training stage from a YAML recipe.

    emma-mamba pretrain --config configs/train_tiny_stage1.yaml [--resume auto|DIR] [--train.lr 1e-3 ...]
    emma-mamba finetune --config configs/train_tiny_stage2.yaml
    torchrun --nproc_per_node=2 -m emma_mamba.cli pretrain --config ...     (DDP; FSDP2 with parallel.strategy)

Every config field is also a command-line option with its dotted path (``--train.lr``, ``--data.packing``,
``--model.lm.d_state``; see ``--help``), parsed as a YAML value and validated like the YAML keys; each may be
given once (argparse would keep the last of two silently: a repeat is refused, naming both values). The command
fixes the stage: a YAML whose ``stage`` names the other command is an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from emma_mamba.training.config import dotted_fields

_STAGE_OF = {"pretrain": "pretrain", "finetune": "finetune"}


def _stage_from_prog(prog: str) -> str:
    last = prog.split()[-1] if prog else ""
    return _STAGE_OF.get(last, "pretrain")


def add_arguments(p: argparse.ArgumentParser, stage: str | None = None) -> None:
    p.allow_abbrev = False  # `--train.l` must not silently mean `--train.lr`
    p.usage = (f"{p.prog} --config YAML [--model NAME|YAML] [--resume DIR|auto] [--device D] [--print-config] "
               f"[--SECTION.KEY VALUE ...]")
    p.set_defaults(_stage=stage or _stage_from_prog(p.prog))
    p.add_argument("--config", required=True,
                   help="run YAML (configs/train_*.yaml; a shipped recipe may also be named without the file: "
                        "train_tiny_stage1)")
    p.add_argument("--resume", default=None, metavar="DIR|auto",
                   help="continue a run exactly: a checkpoints/step_N directory, or 'auto' for the latest one in "
                        "output_dir (a fresh start if there is none)")
    p.add_argument("--model", dest="_model", default=None, metavar="NAME|YAML",
                   help="replace the recipe's model: a preset (emma-mamba-2.8b-dinosiglip, ...) or a model YAML "
                        "(configs/model_*.yaml); --model.* keys then apply on top of it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_override_arguments(p)


class _Once(argparse.Action):
    """Stores a config override, refusing a second one of the same key: argparse keeps the last silently, so
    `--train.lr 1e-4` appended to a command that already sets it would quietly win or lose by its position."""

    def __call__(self, parser, namespace, values, option_string=None):
        if hasattr(namespace, self.dest):  # default=SUPPRESS: set only by an earlier occurrence
            raise argparse.ArgumentError(self, f"given twice, {getattr(namespace, self.dest)!r} and {values!r}; "
                                               f"give each config key once")
        setattr(namespace, self.dest, values)


def add_override_arguments(p: argparse.ArgumentParser) -> None:
    """--SECTION.KEY options for every run-config field but the stage (read back by ``_overrides``); each may be
    given once."""
    g = p.add_argument_group("config overrides (dotted paths of the run YAML; values are YAML)")
    for path, doc in dotted_fields():
        if path == "stage":
            continue
        g.add_argument(f"--{path}", dest=path, default=argparse.SUPPRESS, metavar="V", action=_Once,
                       help=doc.replace("%", "%%") if doc else None)  # argparse %-formats help


def _overrides(args: argparse.Namespace) -> dict:
    from emma_mamba.training.config import overrides_from_pairs

    # only config options carry a value here (default=SUPPRESS); top-level fields have no dot in their name
    top = {path for path, _ in dotted_fields() if "." not in path}
    return overrides_from_pairs([(k, v) for k, v in vars(args).items() if "." in k or k in top])


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun every process says its error at once, and print's two
    writes (the text, then the newline) ran two processes' lines together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    import yaml

    from emma_mamba.config import ConfigError, read_yaml_mapping, resolve_config_path
    from emma_mamba.data.llava import DataError
    from emma_mamba.training.config import load_run_config, run_config_to_dict

    stage = args._stage
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    # our own progress lines on rank 0; libraries (open_clip logs its model building at INFO) stay quiet
    logging.getLogger("emma_mamba").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank > 0:
        # every rank reads the whole data file, so its warnings (bad or truncated records) would repeat once per
        # process: rank 0 reports them; errors still come from every rank, and so do the records each rank skips
        # while training (an image it failed to read: its own)
        logging.getLogger("emma_mamba.data").setLevel(logging.ERROR)
        logging.getLogger("emma_mamba.data.llava.loading").setLevel(logging.WARNING)
    prog = f"emma-mamba {stage}"
    # under torchrun every process prints its own one-line error: each says whose it is
    world = int(os.environ.get("WORLD_SIZE", "1"))
    said = f"[rank {rank}] {prog}" if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ else prog
    try:
        path = resolve_config_path(args.config, "run config")
        raw = read_yaml_mapping(path)
        if isinstance(raw, dict) and raw.get("stage", stage) != stage:
            other = raw["stage"]
            raise ConfigError(f"{path}: stage is {other!r}; run it with `emma-mamba {other}`, not {prog}")
        overrides = _overrides(args)
        overrides["stage"] = stage
        cfg = load_run_config(path, overrides, model=args._model, override_source="command line")
    except (ConfigError, OSError, yaml.YAMLError) as e:
        _say(f"{said}: {e}")
        return 2
    if args.print_config:
        print(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from emma_mamba.models.mamba import CheckpointError
    from emma_mamba.training import TrainingError, TrainingInterrupted
    from emma_mamba.training.parallel import lost_peer
    from emma_mamba.training.trainer import train

    finished = False
    held = _hold_sigterm() if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ else None
    try:
        train(cfg, resume=args.resume, device=args.device)
        finished = True
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError, TrainingError) as e:
        _say(f"{said}: {e}")
        return e.exit_code if isinstance(e, TrainingInterrupted) else 2
    except KeyboardInterrupt:  # while the model or data were being built: nothing was trained yet
        _say(f"{said}: interrupted before the first step")
        return 130
    except Exception as e:  # a collective outside the steps (building the model, the final write) lost a process
        gone = lost_peer(e)
        if gone is None:
            raise
        _say(f"{said}: another process stopped first (its error is above; here: {gone})")
        return 2
    finally:
        from emma_mamba.training.parallel import destroy_distributed

        destroy_distributed(finished)
        if held is not None:
            signal.signal(signal.SIGTERM, held)
    return 0


def _hold_sigterm():
    """Under torchrun, outside the trainer's own handling (its steps), SIGTERM is held instead of ending the process
    at once: torchrun sends it to the other processes as soon as one fails, and a process whose error (its peer
    died) was on its way to the terminal was killed before its line. torchrun kills a process that does not end
    30 s later. Returns the handler to put back (None outside the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    return signal.SIG_DFL if previous is None else previous  # None: a handler set outside Python


def main(argv: list[str] | None = None, stage: str = "pretrain") -> int:
    """Programmatic entry (tests): same as `emma-mamba <stage> ...`."""
    p = argparse.ArgumentParser(prog=f"emma-mamba {stage}")
    add_arguments(p, stage)
    return run(p.parse_args(argv))
