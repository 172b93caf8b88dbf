"""README.md stays true to the code: the commands, options and repository paths it names exist.

What is read from README.md: fenced code blocks (line by line, a line ending in ``\\`` joined to the next) and
inline code spans (a span may run over the lines of one paragraph; in a table, each cell's spans, ``\\|`` read as
``|``). Prose outside code is read for repository paths only.

What is checked:

1. Commands. In a code-block line or a code span, every ``emma-mamba <command> [<subcommand>]`` (also after
   ``time``, ``VAR=1``, ``&&``), every ``python -m emma_mamba.cli <command>`` / ``torchrun ... -m emma_mamba.cli
   <command>``, and a span that *starts* with a bare command name (``bench latency --compile``, ``info --config``,
   ``data check``; a group without its subcommand, ``convert --config``, stands for any of its commands) names a
   command of ``emma_mamba.cli.COMMANDS`` (``a|b`` alternatives each); every ``--option``
   after it, up to the end of the line / span or a shell separator (``|``, ``||``, ``&&``, ``;``, ``&``, a
   redirection) or a ``#`` comment, is an option string of that command's parser, built as ``emma-mamba`` builds it
   (``add_arguments`` of the command's module; nothing runs) and spelled in full (argparse would accept the
   abbreviation ``--max-new-token``; the README must not rely on it). For pretrain / finetune / data check that
   includes the dotted config overrides the parser registers from the run-config fields, ``--model.*`` leaves
   included (``--model.lm.d_model``: checked against the model config's fields, as the parser has them); a
   ``--model.*`` wildcard passes when some such option exists. In a table row whose first cell starts with an
   ``emma-mamba`` command (the CLI table), a span anywhere in the row that starts with ``--`` (``(or `--lm DIR`)``,
   the description's ``--no-web-ui``) is checked against that row's command.
   ``python -m emma_mamba.X --opts``: the module exists; with options, they belong to its ``add_arguments`` parser.
   ``python benchmarks/X.py [sub] --opts``: the script exists; with options, its argparse parser is taken by
   running the script as ``__main__`` with ``ArgumentParser.parse_args`` replaced by a function that stops it
   there (every script builds its parser before any work), and the options belong to it (or to the named
   subcommand's parser).
2. Paths. Every ``configs/``, ``benchmarks/``, ``tests/``, ``csrc/``, ``emma_mamba/`` or ``.ci/`` path anywhere in
   the text exists in the checkout: ``{a,b}`` braces expanded, ``*`` globs must match at least one file. In a
   tree listing in a code block (the Layout section: ``emma_mamba/   ops/ (...), export.py, ...``), each ``name/``
   and ``name.py`` of a folder's description exists inside that folder.
3. Every concrete ``configs/NAME.yaml`` named is listed by ``emma-mamba configs`` (a shipped recipe).

Deliberately skipped: a ``--option`` in a span or line without a command before it (``--split`` in a sentence:
which command it belongs to is prose), other tools' options (``pytest -n 2``, ``lm_eval --model``, ``pip``);
placeholder options (``--SECTION.KEY``: capitals); option *values* (``--task pope``, ``--preset cobra-3b``);
paths with placeholders (``<run>``, a capitalised component such as
``configs/NAME.yaml``, ``...``); paths that do not start at the repository's top (``runs/``, ``checkpoints/``,
``playground/``, ``heldout/captions.json``: user data; the bare ``existence_probe.py``); ``emma_mamba/configs``,
where setup.py installs configs/ (checked in setup.py instead); recipe names given without ``configs/``; the
module names in a tree listing's parentheses (``models/ (mamba (Mamba-1 ...), vision, ...)``); dotted names
(``emma_mamba.load``, ``emma_mamba.batch_rows``: several are response fields or op names, not attributes).

``test_checker_*`` run the same checker on synthetic README text: each kind of mistake is found, each kind of
prose above is left alone, and a copy of the real README with one option misspelled or one recipe path broken
fails.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib
import importlib.util
import io
import itertools
import re
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest

from emma_mamba.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# paths the README names that are not in the checkout, each with where it comes from (verified below)
NOT_IN_CHECKOUT = {"emma_mamba/configs": "setup.py installs configs/ as the package emma_mamba.configs"}

_PATH_RE = re.compile(r"(?<![\w./-])(?:configs|benchmarks|tests|csrc|emma_mamba|\.ci)/(?:\{[^}\s]*\}|[^\s`'\"(),;:{}<>\[\]|])*")
_FENCE_RE = re.compile(r"^\s*```")
_STOP_TOKENS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1", "<", "&>"}
_GROUPS = {p[0] for p in COMMANDS}


# ---------------------------------------------------------------- extraction: README text -> code contexts

@functools.lru_cache(maxsize=None)
def _split_markdown(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, list[list[str]]]], list[tuple[int, str]]]:
    """(code-block lines, table rows as cells of code spans, prose code spans), each with its 1-based line."""
    lines = text.split("\n")
    block_lines: list[tuple[int, str]] = []
    rows: list[tuple[int, list[list[str]]]] = []
    prose = []  # the text outside fences and tables, same line count (blanked elsewhere)
    in_fence = False
    pending = None  # a code line continued with a trailing backslash
    for i, line in enumerate(lines, 1):
        if _FENCE_RE.match(line):
            in_fence = not in_fence
            prose.append("")
            continue
        if in_fence:
            if pending is not None:
                line = pending[1] + " " + line.strip()
                i = pending[0]
            if line.rstrip().endswith("\\"):
                pending = (i, line.rstrip()[:-1])
            else:
                pending = None
                block_lines.append((i, line))
            prose.append("")
            continue
        if line.lstrip().startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            rows.append((i, [[s.replace("\\|", "|") for s in _spans(c)] for c in cells]))
            prose.append("")
            continue
        prose.append(line)
    spans = []
    for para_start, para in _paragraphs(prose):
        for m in re.finditer(r"`([^`]+)`", para):
            spans.append((para_start + para.count("\n", 0, m.start()), m.group(1).replace("\n", " ")))
    return block_lines, rows, spans


def _paragraphs(lines: list[str]):
    start, buf = 1, []
    for i, line in enumerate(lines + [""], 1):
        if line.strip():
            if not buf:
                start = i
            buf.append(line)
        elif buf:
            yield start, "\n".join(buf)
            buf = []


def _spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _tokens(s: str) -> list[str]:
    return re.findall(r'"[^"]*"|\S+', s)


# ---------------------------------------------------------------- commands in one context

def _clean_option(tok: str) -> str | None:
    """'--foo' of '[--foo', '(--foo=3)', '--foo,'; None for a non-option or a placeholder."""
    tok = tok.lstrip("[(\"'").rstrip("])\"',.:;")
    if not tok.startswith("--") or tok == "--":
        return None
    tok = tok.split("=", 1)[0]
    if re.search(r"[A-Z]", tok):  # --SECTION.KEY
        return None
    return tok


def _command_starts(toks: list[str]):
    """(index after the command word, kind, name) for each command start in a token list."""
    for i, t in enumerate(toks):
        if t == "emma-mamba":
            yield i + 1, "cli", None
        elif t == "-m" and i + 1 < len(toks) and toks[i + 1].startswith("emma_mamba"):
            if toks[i + 1] == "emma_mamba.cli":
                yield i + 2, "cli", None
            else:
                yield i + 2, "module", toks[i + 1].rstrip(".,;:)")
        elif re.fullmatch(r"(?:\S*/)?python[0-9.]*", t) and i + 1 < len(toks) and toks[i + 1].startswith("benchmarks/"):
            yield i + 2, "script", toks[i + 1].rstrip(".,;:)")


def _until_stop(toks: list[str]) -> list[str]:
    out = []
    for t in toks:
        if t in _STOP_TOKENS or t.startswith("#") or t.startswith(">") or t.startswith("2>"):
            break
        if t.endswith(";"):
            out.append(t[:-1])
            break
        out.append(t)
    return out


def _commands_in(text: str, bare: bool = False):
    """(kind, name-or-path, tokens after it up to a separator) for each command in one context; with ``bare``, a
    context starting with a command name (``bench latency --compile``) is one too."""
    toks = _tokens(text)
    toks = list(itertools.takewhile(lambda t: not t.startswith("#"), toks))  # a shell comment
    found = []
    for start, kind, name in _command_starts(toks):
        found.append((kind, name, _until_stop(toks[start:])))
    if bare and not found and toks and toks[0] in _GROUPS and len(toks) > 1:
        nxt = toks[1]
        subs = {p[1] for p in COMMANDS if p[0] == toks[0] and len(p) == 2}
        if nxt.startswith("--") or any(s in subs for s in nxt.split("|")):
            found.append(("cli", None, _until_stop(toks)))
    return found


def _resolve_cli(rest: list[str]) -> tuple[list[tuple[str, ...]], list[str], str | None]:
    """([command paths], remaining tokens, problem) for the tokens after `emma-mamba`."""
    if not rest or rest[0].startswith("<") or rest[0] in ("...", "--help", "-h", "--version", "-V"):
        return [], [], None
    first = rest[0].rstrip(".,:;)`")
    paths, used = [], 1
    for a in first.split("|"):
        if a in _GROUPS and any(len(p) == 2 and p[0] == a for p in COMMANDS):
            sub = rest[1].rstrip(".,:;)`") if len(rest) > 1 else ""
            if not sub or sub.startswith("-") or sub in ("...",) or sub.startswith("<"):
                # the group without its subcommand (prose: `convert --config`): an option passes when one of the
                # group's commands has it
                paths.append(tuple(sorted(p for p in COMMANDS if p[0] == a)))
                continue
            used = 2
            for s in sub.split("|"):
                if (a, s) not in COMMANDS:
                    return [], [], f"`emma-mamba {a} {s}`: no such command"
                paths.append((a, s))
        elif (a,) in COMMANDS:
            paths.append((a,))
        else:
            return [], [], f"`emma-mamba {a}`: no such command"
    return paths, rest[used:], None


@functools.lru_cache(maxsize=None)
def cli_parser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    """The parser `emma-mamba <path>` parses with, built as emma_mamba.cli builds it (without running anything)."""
    module, help_ = COMMANDS[path]
    parser = argparse.ArgumentParser(prog="emma-mamba " + " ".join(path), description=help_)
    importlib.import_module(module).add_arguments(parser)
    return parser


def _cli_options(path) -> set[str]:
    """A command's option strings; for a group named without its subcommand (a tuple of paths), all of theirs."""
    if path and isinstance(path[0], tuple):
        return set().union(*(_option_strings(cli_parser(p)) for p in path))
    return _option_strings(cli_parser(path))


def _cli_name(path) -> str:
    if path and isinstance(path[0], tuple):
        return f"{path[0][0]} {'|'.join(p[1] for p in path)}"
    return " ".join(path)


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@functools.lru_cache(maxsize=None)
def script_parser(script: str) -> argparse.ArgumentParser | None:
    """A benchmark script's parser: the script run as __main__ until it parses its arguments (None: it has none)."""
    src = (ROOT / script).read_text()
    if "parse_args" not in src and "lm_step_parser" not in src:
        return None

    def grab(self, *a, **k):
        raise _Parsed(self)

    saved_path, saved_mods = list(sys.path), set(sys.modules)
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_args", grab), \
                mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab), \
                mock.patch.object(sys, "argv", [script]), \
                contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except _Parsed as e:
        return e.parser
    finally:
        sys.path[:] = saved_path
        for m in set(sys.modules) - saved_mods:
            if m == "benchmarks" or m.startswith("benchmarks."):
                del sys.modules[m]
    raise AssertionError(f"{script} ran to its end without parsing arguments")


def _option_strings(parser: argparse.ArgumentParser, sub: str | None = None) -> set[str]:
    opts = {o for a in parser._actions for o in a.option_strings}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                if sub is None or name == sub:
                    opts |= _option_strings(p)
    return opts


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {n for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices}


def _bad_options(words: list[str], options: set[str]) -> list[str]:
    bad = []
    for w in words:
        opt = _clean_option(w)
        if opt is None:
            continue
        if "*" in opt:
            prefix = opt.split("*", 1)[0]
            if not any(o.startswith(prefix) for o in options):
                bad.append(opt)
        elif opt not in options:
            bad.append(opt)
    return bad


def _check_command(kind: str, name: str | None, rest: list[str], where: str, problems: list[str],
                   row_command: list | None = None) -> None:
    if kind == "cli":
        paths, words, problem = _resolve_cli(rest)
        if problem:
            problems.append(f"{where}: {problem}")
            return
        if row_command is not None:
            row_command.extend(paths)
        for path in paths:
            for opt in _bad_options(words, _cli_options(path)):
                problems.append(f"{where}: `emma-mamba {_cli_name(path)}` has no option {opt}")
    elif kind == "module":
        if importlib.util.find_spec(name) is None:
            problems.append(f"{where}: `python -m {name}`: no such module")
            return
        if any(_clean_option(w) for w in rest):
            mod = importlib.import_module(name)
            if not hasattr(mod, "add_arguments"):
                return  # options of a module without a parser we can build: not checked
            parser = argparse.ArgumentParser(prog=f"python -m {name}")
            mod.add_arguments(parser)
            for opt in _bad_options(rest, _option_strings(parser)):
                problems.append(f"{where}: `python -m {name}` has no option {opt}")
    else:  # script
        if not (ROOT / name).is_file():
            return  # the path check names it
        if any(_clean_option(w) for w in rest):
            parser = script_parser(name)
            if parser is None:
                problems.append(f"{where}: `python {name}` takes no options")
                return
            sub = rest[0] if rest and rest[0] in _subcommands(parser) else None
            for opt in _bad_options(rest, _option_strings(parser, sub)):
                problems.append(f"{where}: `python {name}{' ' + sub if sub else ''}` has no option {opt}")


# ---------------------------------------------------------------- paths

def _expand_braces(p: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", p)
    if not m:
        return [p]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(p[:m.start()] + alt + p[m.end():])]


def _is_placeholder(p: str) -> bool:
    parts = [c.split(".")[0] for c in p.split("/") if c]
    return "..." in p or any(re.fullmatch(r"[A-Z][A-Z_]*", c) and c not in ("README", "MANIFEST") for c in parts)


def repo_paths(text: str) -> list[tuple[int, str]]:
    """(line, path) of every repository path named anywhere in the text, trailing punctuation removed."""
    out = []
    for m in _PATH_RE.finditer(text):
        p = m.group(0).rstrip(".")
        line = text.count("\n", 0, m.start()) + 1
        if _is_placeholder(p) or p.rstrip("/") in NOT_IN_CHECKOUT:
            continue
        out.append((line, p))
    return out


_TOP = r"(?:configs|benchmarks|tests|csrc|emma_mamba)/"


def layout_paths(text: str) -> list[tuple[int, str]]:
    """(line, path) of the entries of a tree listing in a code block (a line starting with a top folder and
    spaces, its description continued on indented lines): each ``name/`` and ``name.py`` in the description is
    taken inside that folder (``emma_mamba/   ops/ (...), export.py`` -> emma_mamba/ops/, emma_mamba/export.py)."""
    out = []
    top = None
    for line, code in _split_markdown(text)[0]:
        m = re.match(rf"({_TOP})\s{{2,}}(.*)", code)
        if m:
            top, rest = m.group(1), m.group(2)
        elif top and code.startswith(" "):
            rest = code
        else:
            top = None
            continue
        for name in re.findall(r"(?<![\w./`-])([a-z_][\w-]*/|[a-z_]\w*\.py)(?![\w/])", rest):
            out.append((line, top + name))
    return out


@functools.lru_cache(maxsize=None)
def shipped_recipes() -> frozenset[str]:
    """The recipe names `emma-mamba configs` lists."""
    from emma_mamba.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["configs"]) == 0
    lines = buf.getvalue().splitlines()[1:]
    return frozenset(line.split()[0] for line in lines if line.strip())


# ---------------------------------------------------------------- the checker

def readme_problems(text: str, root: Path = ROOT) -> list[str]:
    """Every mismatch between README text and the code, one line each naming the README line."""
    problems: list[str] = []
    block_lines, rows, spans = _split_markdown(text)
    for line, code in block_lines:
        for kind, name, rest in _commands_in(code):
            _check_command(kind, name, rest, f"README.md:{line}", problems)
    for line, span in spans:
        for kind, name, rest in _commands_in(span, bare=True):
            _check_command(kind, name, rest, f"README.md:{line}", problems)
    for line, cells in rows:
        row_command: list = []
        for ci, cell in enumerate(cells):
            for si, span in enumerate(cell):
                before = list(row_command)
                for kind, name, rest in _commands_in(span, bare=True):
                    _check_command(kind, name, rest, f"README.md:{line}", problems,
                                   row_command if (ci, si) == (0, 0) else None)
                if (ci, si) != (0, 0) and before and span.startswith("--"):
                    for path in before:
                        for opt in _bad_options(_until_stop(_tokens(span)), _cli_options(path)):
                            problems.append(f"README.md:{line}: `emma-mamba {_cli_name(path)}` has no option {opt} "
                                            f"(named in its table row)")
    shipped = shipped_recipes()
    for line, p in repo_paths(text) + layout_paths(text):
        for q in _expand_braces(p):
            if any(c in q for c in "*?["):
                ok = bool(glob.glob(str(root / q), recursive=True))
            else:
                ok = (root / q).exists()
            if not ok:
                problems.append(f"README.md:{line}: {q}: no such file or folder in the repository")
            m = re.fullmatch(r"configs/([^/*?]+)\.yaml", q)
            if m and m.group(1) not in shipped:
                problems.append(f"README.md:{line}: {q}: not a shipped recipe (`emma-mamba configs` does not list "
                                f"{m.group(1)})")
    return problems


# ---------------------------------------------------------------- tests

def test_readme_commands_options_and_paths_exist():
    problems = readme_problems(README.read_text(encoding="utf-8"))
    assert not problems, "README.md does not match the code:\n" + "\n".join(problems)


def test_readme_checks_something():
    """The extraction finds what the README is known to hold, so an empty problem list means something."""
    text = README.read_text(encoding="utf-8")
    block_lines, rows, spans = _split_markdown(text)
    named = set()
    for _, code in block_lines:
        named |= {(k, n, r[0] if r else None) for k, n, r in _commands_in(code)}
    for _, span in spans:
        named |= {(k, n, r[0] if r else None) for k, n, r in _commands_in(span, bare=True)}
    for _, cells in rows:
        for cell in cells:
            for span in cell:
                named |= {(k, n, r[0] if r else None) for k, n, r in _commands_in(span, bare=True)}
    cli = {r for k, _, r in named if k == "cli"}
    assert {"pretrain", "finetune", "eval", "serve", "data", "bench", "quickstart"} <= cli
    assert ("module", "emma_mamba.bench.kernels", None) in named
    assert any(k == "script" for k, _, _ in named)
    paths = {p for _, p in repo_paths(text)}
    assert "configs/train_tiny_stage1.yaml" in paths and ".ci/run" in paths
    assert len(paths) > 50
    assert "train_tiny_stage1" in shipped_recipes()


def test_not_in_checkout_paths_are_what_setup_installs():
    setup = (ROOT / "setup.py").read_text()
    assert '"emma_mamba.configs": "configs"' in setup  # NOT_IN_CHECKOUT's one entry


def _table(cmd_cell: str, text_cell: str = "what it does") -> str:
    return f"| command | what |\n| --- | --- |\n| {cmd_cell} | {text_cell} |\n"


CHECKER_CASES = [
    # (README text, substrings the problems must hold: [] = no problem)
    ("Run `emma-mamba generate --lm DIR --max-new-tokens 8`.", []),
    ("Run `emma-mamba generate --lm DIR --max-new-token 8`.", ["`emma-mamba generate` has no option --max-new-token"]),
    ("```bash\nemma-mamba serve --checkpoint c \\\n    --bogus-flag 1\n```\n", ["serve` has no option --bogus-flag"]),
    ("```bash\nemma-mamba info --preset tiny | head --bogus\n```\n", []),  # after a pipe: head's
    ("```bash\nemma-mamba info --preset tiny   # --bogus in a comment\n```\n", []),
    ("```bash\npip install x && emma-mamba quickstart --fast && ls --bogus\n```\n", []),
    ("```bash\ntime emma-mamba quickstart --fastest\n```\n", ["`emma-mamba quickstart` has no option --fastest"]),
    ("The option `--bogus` of another tool, and `lm_eval --model x --tasks y`.", []),
    ("`emma-mamba frobnicate --x`", ["`emma-mamba frobnicate`: no such command"]),
    ("`emma-mamba data frob`", ["`emma-mamba data frob`: no such command"]),
    ("`emma-mamba <command> --help` lists every option.", []),
    ("`emma-mamba bench kernels|lm`", []),
    ("`emma-mamba pretrain --config c.yaml --train.lr 1e-4 --model.lm.d_model 64 --model.* --SECTION.KEY V`", []),
    ("`emma-mamba pretrain --train.lrr 1`", ["`emma-mamba pretrain` has no option --train.lrr"]),
    ("`emma-mamba finetune --model.lm.d_modell 1`", ["has no option --model.lm.d_modell"]),
    ("`emma-mamba data check --config c --train.lr 1 --strict`", []),
    ("`emma-mamba eval --task pope\\|gqa --batching continuous\\|static`", []),
    ("`bench latency --compile` and `info --config` and `data check`", []),
    ("`bench latency --compyle`", ["`emma-mamba bench latency` has no option --compyle"]),
    ("`generate(..., GenerationConfig(n=2))` and `serve` and `data.packing: true`", []),
    ("```bash\ntorchrun --nproc_per_node=8 -m emma_mamba.cli finetune --config x --resume auto\n```\n", []),
    ("```bash\ntorchrun --nproc_per_node=8 -m emma_mamba.cli finetune --resumee auto\n```\n",
     ["`emma-mamba finetune` has no option --resumee"]),
    ("```bash\npython -m emma_mamba.cli info --preset tiny && python -m emma_mamba.cli info --prezet tiny\n```\n",
     ["`emma-mamba info` has no option --prezet"]),
    ("(also `python -m emma_mamba.bench.kernels --device cpu`)", []),
    ("`python -m emma_mamba.bench.kernelz`", ["`python -m emma_mamba.bench.kernelz`: no such module"]),
    ("`python benchmarks/mixer_copies.py --repeats 5 --decode-steps 100`", []),
    ("`python benchmarks/mixer_copies.py --repeats 5 --decode-stepz 100`",
     ["`python benchmarks/mixer_copies.py` has no option --decode-stepz"]),
    ("`python benchmarks/existence_probe.py features --clip f`", []),
    ("`python benchmarks/no_such_bench.py`", ["benchmarks/no_such_bench.py: no such file"]),
    (_table("`emma-mamba serve --checkpoint DIR [--port 8000]` (or `--lm DIR`)", "`--no-web-ui`: off; `--allow-local-images`"), []),
    (_table("`emma-mamba serve --checkpoint DIR` (or `--lmm DIR`)"), ["`emma-mamba serve` has no option --lmm"]),
    (_table("`emma-mamba serve --checkpoint DIR`", "`--no-webui`: off"), ["has no option --no-webui (named in its table row)"]),
    (_table("`emma-mamba serve [--prot 1]`"), ["`emma-mamba serve` has no option --prot"]),
    (_table("`EMMA_CUDA_ARCHS`", "`--bogus`"), []),  # not a command row
    ("See `configs/train_tiny_stage1.yaml` and benchmarks/results/ablation.{json,png}.", []),
    ("See `configs/train_tiny_stage9.yaml`.", ["configs/train_tiny_stage9.yaml: no such file",
                                               "not a shipped recipe"]),
    ("benchmarks/results/ablation.{json,svg}", ["benchmarks/results/ablation.svg: no such file"]),
    ("`benchmarks/results/prefill_batching_cpu*.json` and `configs/train_*.yaml` and `tests/ops/`", []),
    ("`benchmarks/results/nope_*.json`", ["benchmarks/results/nope_*.json: no such file"]),
    ("`configs/NAME.yaml`, `runs/<run>/stage2`, `checkpoints/x`, `playground/eval`, `emma_mamba/configs`", []),
    ("`emma_mamba/eval/suite.py` and `csrc/nope/x.cu`", ["csrc/nope/x.cu: no such file"]),
    ("`bash .ci/run` and `.ci/nothing`", [".ci/nothing: no such file"]),
    ("`convert --config` and `info --config`", []),  # a group without its subcommand: any of its commands'
    ("`convert --konfig`", ["`emma-mamba convert cobra` has no option --konfig"]),
    ("```\nemma_mamba/   ops/ (dispatch), export.py (emma-mamba\n              export), cli.py\ncsrc/  cpu/\n```\n", []),
    ("```\nemma_mamba/   ops/ (dispatch), exports.py, `kernels` folder\n              nothing/\n```\n",
     ["emma_mamba/exports.py: no such file", "emma_mamba/nothing/: no such file"]),
]


@pytest.mark.parametrize("text,expected", CHECKER_CASES, ids=[str(i) for i in range(len(CHECKER_CASES))])
def test_checker_on_synthetic_readme(text, expected):
    problems = readme_problems(text)
    if not expected:
        assert problems == []
    else:
        joined = "\n".join(problems)
        for want in expected:
            assert want in joined, joined
        assert all(any(w in p for w in expected) for p in problems), joined  # nothing else found


def _mutate(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old,new,want", [
    ("--prefill-chunk N", "--prefill-chunks N", "`emma-mamba generate` has no option --prefill-chunks"),
    ("[--keep-align-head]", "[--keep-align-heads]", "`emma-mamba export` has no option --keep-align-heads"),
    ("--config configs/train_tiny_stage2.yaml", "--config configs/train_tiny_stage3.yaml",
     "configs/train_tiny_stage3.yaml: no such file"),
    ("--decode-steps 100", "--decode-step 100", "`python benchmarks/mixer_copies.py` has no option --decode-step"),
    ("`benchmarks/results/quickstart_lora.json`", "`benchmarks/results/quickstart_lora.jsonl`",
     "benchmarks/results/quickstart_lora.jsonl: no such file"),
])
def test_checker_fails_on_a_broken_copy_of_the_readme(old, new, want):
    problems = readme_problems(_mutate(README.read_text(encoding="utf-8"), old, new))
    assert any(want in p for p in problems), problems


def test_extraction_keeps_spans_and_continuations_apart():
    text = ("Prose with `emma-mamba\n  info --preset tiny` split over lines.\n\n"
            "```bash\nemma-mamba chat --checkpoint c \\\n  --image f\n# emma-mamba nope\n```\n"
            "| a | b |\n| --- | --- |\n| `x\\|y` | `z` |\n")
    blocks, rows, spans = _split_markdown(text)
    assert blocks == [(5, "emma-mamba chat --checkpoint c  --image f"), (7, "# emma-mamba nope")]
    assert spans == [(1, "emma-mamba   info --preset tiny")]
    assert rows[-1] == (11, [["x|y"], ["z"]])
    assert list(itertools.chain(*[_commands_in(c) for _, c in blocks])) == [
        ("cli", None, ["chat", "--checkpoint", "c", "--image", "f"])]
