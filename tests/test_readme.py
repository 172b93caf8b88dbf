"""README.md and the pages of docs/ stay true to the code: the commands, options and repository paths they name
exist, and their relative links lead somewhere.

The pages checked: README.md and every docs/*.md (``DOC_PAGES``); each problem names its page and line
(``docs/cli.md:42: ...``). What is read from a page: fenced code blocks (line by line, a line ending in ``\\``
joined to the next) and inline code spans (a span may run over the lines of one paragraph; in a table, each cell's
spans, ``\\|`` read as ``|``). Prose outside code is read for repository paths and links only.

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
   the description's ``--no-web-ui``) is checked against that row's command. Likewise in a section whose heading's
   first code span is an ``emma-mamba`` command (docs/cli.md's ``## `emma-mamba serve` ``, docs/inference.md's
   ``## Serving (`emma-mamba serve`)``; the section runs to the next heading of its level or a higher one), a prose
   span that starts with ``--`` is checked against that command.
   ``python -m emma_mamba.X --opts``: the module exists; with options, they belong to its ``add_arguments`` parser.
   ``python benchmarks/X.py [sub] --opts``: the script exists; with options, its argparse parser is taken by
   running the script as ``__main__`` with ``ArgumentParser.parse_args`` replaced by a function that stops it
   there (every script builds its parser before any work), and the options belong to it (or to the named
   subcommand's parser).
2. Paths. Every ``configs/``, ``benchmarks/``, ``tests/``, ``csrc/``, ``emma_mamba/``, ``docs/`` or ``.ci/`` path
   anywhere in the text (but a link's target, which item 4 checks) exists in the checkout: ``{a,b}`` braces
   expanded, ``*`` globs must match at least one file. In a tree listing in a code block (the Layout section:
   ``emma_mamba/   ops/ (...), export.py, ...``), each ``name/`` and ``name.py`` of a folder's description exists
   inside that folder.
3. Every concrete ``configs/NAME.yaml`` named is listed by ``emma-mamba configs`` (a shipped recipe).
4. Links. Every relative link target (``[text](target)`` outside code: ``docs/cli.md``, ``../README.md#set-up``,
   ``#mamba-2``), taken relative to the page's folder, exists in the checkout; with a ``#anchor``, the target page
   (or the page itself) has a heading whose GitHub anchor is that: the heading's text without its markup,
   lowercased, every character but letters, digits, spaces, hyphens and underscores dropped, spaces made hyphens,
   a repeated anchor suffixed ``-1``, ``-2``, ... (an ``<a id=...>`` / ``name=`` counts too). Links with a scheme
   (``https://``) are not followed.

Deliberately skipped: a ``--option`` in a span or line without a command before it (``--split`` in a sentence:
which command it belongs to is prose), other tools' options (``pytest -n 2``, ``lm_eval --model``, ``pip``);
placeholder options (``--SECTION.KEY``: capitals); option *values* (``--task pope``, ``--preset cobra-3b``);
paths with placeholders (``<run>``, a capitalised component such as
``configs/NAME.yaml``, ``...``); paths that do not start at the repository's top (``runs/``, ``checkpoints/``,
``playground/``, ``heldout/captions.json``: user data; the bare ``existence_probe.py``); ``emma_mamba/configs``,
where setup.py installs configs/ (checked in setup.py instead); recipe names given without ``configs/``; the
module names in a tree listing's parentheses (``models/ (mamba (Mamba-1 ...), vision, ...)``); dotted names
(``emma_mamba.load``, ``emma_mamba.batch_rows``: several are response fields or op names, not attributes).

``test_checker_*`` run the same checker on synthetic page text: each kind of mistake is found, each kind of
prose above is left alone, and a copy of a real page (the README or a docs page) with one option misspelled, one
recipe path or one link broken fails, naming that page and line.
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
DOC_PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))  # every page the checker reads

# paths the README names that are not in the checkout, each with where it comes from (verified below)
NOT_IN_CHECKOUT = {"emma_mamba/configs": "setup.py installs configs/ as the package emma_mamba.configs"}

_PATH_RE = re.compile(r"(?<![\w./-])(?:configs|benchmarks|tests|csrc|emma_mamba|docs|\.ci)/(?:\{[^}\s]*\}|[^\s`'\"(),;:{}<>\[\]|])*")
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
        if text[max(0, m.start() - 2):m.start()] == "](":
            continue  # a link's target: link_problems checks it, relative to the page
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

def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lowercased, every character but letters, digits,
    spaces, hyphens and underscores dropped, each space made a hyphen."""
    t = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    t = t.replace("\\|", "|").strip().lower()
    t = "".join(c for c in t if c.isalnum() or c in " -_")
    return t.replace(" ", "-")


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(line, level, heading text) of the ATX headings outside fenced code."""
    out, in_fence = [], False
    for i, line in enumerate(text.split("\n"), 1):
        if _FENCE_RE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else re.match(r"^(#{1,6})\s+(.*?)(?:\s+#+)?\s*$", line)
        if m:
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def anchors(text: str) -> set[str]:
    """Every anchor a page's headings (and <a id/name> tags) give, repeated ones suffixed -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, _, h in _headings(text):
        a = github_anchor(h)
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    out |= set(re.findall(r"<a\s+(?:id|name)=[\"']([^\"']+)[\"']", text))
    return out


def _outside_code(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked (newlines kept, so offsets keep their line)."""
    lines, in_fence = [], False
    for line in text.split("\n"):
        if _FENCE_RE.match(line) or in_fence:
            in_fence = in_fence != bool(_FENCE_RE.match(line))
            lines.append(" " * len(line))
        else:
            lines.append(line)
    out = "\n".join(lines)
    return re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), out)


_LINK_RE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def link_problems(text: str, name: str = "README.md", root: Path = ROOT) -> list[str]:
    """Every relative link of a page (``name``, relative to ``root``) whose file or heading anchor does not exist."""
    problems = []
    page = root / name
    plain = _outside_code(text)
    for m in _LINK_RE.finditer(plain):
        target = m.group(1)
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # https:, mailto: ...: not followed
        line = plain.count("\n", 0, m.start()) + 1
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if path and not dest.exists():
            problems.append(f"{name}:{line}: link {target}: {path}: no such file or folder in the repository")
            continue
        if anchor:
            if dest == page:
                dest_text = text
            elif dest.is_file() and dest.suffix == ".md":
                dest_text = dest.read_text(encoding="utf-8")
            else:
                problems.append(f"{name}:{line}: link {target}: #{anchor} into {path}, which is not a Markdown page")
                continue
            if anchor not in anchors(dest_text):
                problems.append(f"{name}:{line}: link {target}: {path or name} has no heading with the anchor "
                                f"#{anchor}")
    return problems


def _section_commands(text: str) -> list[tuple[int, list]]:
    """(first line, command paths or []) of each stretch of the page under a heading: a heading whose first code
    span is an ``emma-mamba`` command gives its section (to the next heading of its level or a higher one) that
    command; a subheading without one keeps its parent's."""
    stack: list[tuple[int, list]] = []  # (level, paths)
    out = [(1, [])]
    for line, level, h in _headings(text):
        while stack and stack[-1][0] >= level:
            stack.pop()
        paths: list = []
        first = re.search(r"`([^`]+)`", h)
        if first:
            for kind, _, rest in _commands_in(first.group(1).replace("\\|", "|")):
                if kind == "cli":
                    paths = _resolve_cli(rest)[0]
                break
        stack.append((level, paths))
        out.append((line, next((p for _, p in reversed(stack) if p), [])))
    return out


def readme_problems(text: str, root: Path = ROOT, name: str = "README.md") -> list[str]:
    """Every mismatch between a page's text and the code, one line each naming the page (``name``, its path from
    the repository's top: ``README.md``, ``docs/cli.md``) and the line."""
    problems: list[str] = []
    block_lines, rows, spans = _split_markdown(text)
    for line, code in block_lines:
        for kind, cname, rest in _commands_in(code):
            _check_command(kind, cname, rest, f"{name}:{line}", problems)
    sections = _section_commands(text)
    for line, span in spans:
        for kind, cname, rest in _commands_in(span, bare=True):
            _check_command(kind, cname, rest, f"{name}:{line}", problems)
        if span.startswith("--"):
            section = [p for start, p in sections if start <= line][-1]
            for path in section:
                for opt in _bad_options(_until_stop(_tokens(span)), _cli_options(path)):
                    problems.append(f"{name}:{line}: `emma-mamba {_cli_name(path)}` has no option {opt} "
                                    f"(named in its section)")
    for line, cells in rows:
        row_command: list = []
        for ci, cell in enumerate(cells):
            for si, span in enumerate(cell):
                before = list(row_command)
                for kind, cname, rest in _commands_in(span, bare=True):
                    _check_command(kind, cname, rest, f"{name}:{line}", problems,
                                   row_command if (ci, si) == (0, 0) else None)
                if (ci, si) != (0, 0) and before and span.startswith("--"):
                    for path in before:
                        for opt in _bad_options(_until_stop(_tokens(span)), _cli_options(path)):
                            problems.append(f"{name}:{line}: `emma-mamba {_cli_name(path)}` has no option {opt} "
                                            f"(named in its table row)")
    shipped = shipped_recipes()
    for line, p in repo_paths(text) + layout_paths(text):
        for q in _expand_braces(p):
            if any(c in q for c in "*?["):
                ok = bool(glob.glob(str(root / q), recursive=True))
            else:
                ok = (root / q).exists()
            if not ok:
                problems.append(f"{name}:{line}: {q}: no such file or folder in the repository")
            m = re.fullmatch(r"configs/([^/*?]+)\.yaml", q)
            if m and m.group(1) not in shipped:
                problems.append(f"{name}:{line}: {q}: not a shipped recipe (`emma-mamba configs` does not list "
                                f"{m.group(1)})")
    problems += link_problems(text, name, root)
    return problems


def _page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("page", DOC_PAGES, ids=_page_name)
def test_page_commands_options_paths_and_links_exist(page):
    problems = readme_problems(page.read_text(encoding="utf-8"), name=_page_name(page))
    assert not problems, f"{_page_name(page)} does not match the code:\n" + "\n".join(problems)


def test_readme_checks_something():
    """The extraction finds what the pages are known to hold, so an empty problem list means something."""
    assert {"README.md", "docs/cli.md", "docs/training.md", "docs/results.md"} <= {_page_name(p) for p in DOC_PAGES}
    named, paths, links = set(), set(), 0
    for page in DOC_PAGES:
        text = page.read_text(encoding="utf-8")
        block_lines, rows, spans = _split_markdown(text)
        for _, code in block_lines:
            named |= {(k, n, r[0] if r else None) for k, n, r in _commands_in(code)}
        for _, span in spans:
            named |= {(k, n, r[0] if r else None) for k, n, r in _commands_in(span, bare=True)}
        for _, cells in rows:
            for cell in cells:
                for span in cell:
                    named |= {(k, n, r[0] if r else None) for k, n, r in _commands_in(span, bare=True)}
        paths |= {p for _, p in repo_paths(text)}
        links += len(_LINK_RE.findall(_outside_code(text)))
    cli = {r for k, _, r in named if k == "cli"}
    assert {"pretrain", "finetune", "eval", "serve", "data", "bench", "quickstart"} <= cli
    assert ("module", "emma_mamba.bench.kernels", None) in named
    assert any(k == "script" for k, _, _ in named)
    assert "configs/train_tiny_stage1.yaml" in paths and ".ci/run" in paths
    assert len(paths) > 50
    assert links > 100
    assert "train_tiny_stage1" in shipped_recipes()
    # the README links every docs page, and the section commands of docs/cli.md are found
    readme = README.read_text(encoding="utf-8")
    for page in DOC_PAGES[1:]:
        assert f"]({_page_name(page)})" in readme, f"the README does not link {_page_name(page)}"
    cli_sections = {tuple(map(tuple, p)) for _, p in _section_commands((ROOT / "docs" / "cli.md").read_text()) if p}
    assert ((("serve",),) in cli_sections and (("eval",),) in cli_sections
            and (("data", "check"),) in cli_sections), cli_sections


def test_github_anchors():
    assert github_anchor("Status: what has and has not run where") == "status-what-has-and-has-not-run-where"
    assert github_anchor("Training the 2.8B model on a GPU machine (the recipes, end to end)") == \
        "training-the-28b-model-on-a-gpu-machine-the-recipes-end-to-end"
    assert github_anchor("`emma-mamba eval`") == "emma-mamba-eval"
    assert github_anchor("Several benchmarks from one YAML (`--suite`)") == "several-benchmarks-from-one-yaml---suite"
    assert github_anchor("Running Cobra's released weights") == "running-cobras-released-weights"
    assert github_anchor("A [link](x.md) and `emma_mamba.ops` × 3") == "a-link-and-emma_mambaops--3"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n<a id=\"here\"></a>\n") == {"a", "a-1", "a-2", "here"}


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
    # a section whose heading names a command: its `--option` spans are that command's
    ("## `emma-mamba serve`\n\nSee `--no-web-ui` and `--cors-origin ORIGIN`.\n\n### More\n\n`--max-batch N`\n", []),
    ("## `emma-mamba serve`\n\nSee `--no-webui`.\n",
     ["`emma-mamba serve` has no option --no-webui (named in its section)"]),
    ("## `emma-mamba serve`\n\n### HTTP\n\n`--max-batches N`\n",
     ["serve` has no option --max-batches (named in its section)"]),
    ("## `emma-mamba serve`\n\ntext\n\n## Chat\n\n`--anything` of another command\n", []),  # the section ended
    ("## Serving (`emma-mamba serve`)\n\n`--state-cache N`, `--state-cach N`\n",
     ["`emma-mamba serve` has no option --state-cach (named in its section)"]),
    ("## lmms-eval: `python -m lmms_eval --model emma_mamba`\n\n`--tasks` and `--batch_size`\n", []),  # not ours
    # links
    ("See [the CLI](docs/cli.md), [serve](docs/cli.md#emma-mamba-serve), [top](#a-heading), [gpu](benchmarks/gpu/)"
     " and [lmms-eval](https://github.com/EvolvingLMMs-Lab/lmms-eval).\n\n## A heading\n", []),
    ("See [the CLI](docs/nope.md).", ["link docs/nope.md: docs/nope.md: no such file or folder"]),
    ("See [serve](docs/cli.md#emma-mamba-serving).",
     ["link docs/cli.md#emma-mamba-serving: docs/cli.md has no heading with the anchor #emma-mamba-serving"]),
    ("See [below](#set-up).\n\n## Setup\n", ["link #set-up: README.md has no heading with the anchor #set-up"]),
    ("`[not a link](nowhere.md)` and\n```\n[nor this](nowhere.md)\n```\n", []),  # code, not links
]


@pytest.mark.parametrize("text,expected", CHECKER_CASES, ids=[str(i) for i in range(len(CHECKER_CASES))])
def test_checker_on_synthetic_readme(text, expected):
    problems = readme_problems(text)
    assert all(p.startswith("README.md:") for p in problems), problems
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


@pytest.mark.parametrize("page,old,new,want", [
    ("README.md", "--prefill-chunk N", "--prefill-chunks N", "`emma-mamba generate` has no option --prefill-chunks"),
    ("README.md", "[--keep-align-head]", "[--keep-align-heads]",
     "`emma-mamba export` has no option --keep-align-heads"),
    ("README.md", "--config configs/train_tiny_stage2.yaml", "--config configs/train_tiny_stage3.yaml",
     "configs/train_tiny_stage3.yaml: no such file"),
    ("README.md", "(docs/cli.md#emma-mamba-serve)", "(docs/cli.md#emma-mamba-serves)",
     "link docs/cli.md#emma-mamba-serves: docs/cli.md has no heading with the anchor #emma-mamba-serves"),
    ("docs/inference.md", "--decode-steps 100", "--decode-step 100",
     "`python benchmarks/mixer_copies.py` has no option --decode-step"),
    ("docs/results.md", "`benchmarks/results/quickstart_lora.json`", "`benchmarks/results/quickstart_lora.jsonl`",
     "benchmarks/results/quickstart_lora.jsonl: no such file"),
    ("docs/cli.md", "- `--api-key-env VAR` requires", "- `--api-key-envv VAR` requires",
     "`emma-mamba serve` has no option --api-key-envv (named in its section)"),
    ("docs/cli.md", "(model.md#running-cobras-released-weights)", "(model.md#running-cobras-weights)",
     "link model.md#running-cobras-weights: model.md has no heading with the anchor #running-cobras-weights"),
    ("docs/training.md", "(../README.md#status-what-has-and-has-not-run-where)", "(../README.md#status)",
     "README.md has no heading with the anchor #status"),
    ("docs/kernels.md", "(training.md#torchcompile)", "(trainig.md#torchcompile)", "trainig.md: no such file"),
])
def test_checker_fails_on_a_broken_copy_of_a_page(page, old, new, want):
    """A real page with one mistake put in: the problem is found and names that page and the mistake's line."""
    text = (ROOT / page).read_text(encoding="utf-8")
    broken = _mutate(text, old, new)
    line = text.count("\n", 0, text.index(old)) + 1
    problems = readme_problems(broken, name=page)
    assert any(want in p for p in problems), problems
    mine = [p for p in problems if want in p]
    # the line named is the mistake's (or, for a code span or continued block line, the line it starts on)
    assert all(p.startswith(f"{page}:") for p in problems), problems
    assert any(line - 2 <= int(p.split(":")[1]) <= line for p in mine), (line, mine)
    assert not readme_problems(text, name=page)  # the unbroken page is clean


def test_a_problem_in_a_docs_page_names_the_page_and_line():
    """The checker run over a docs page (not the README) names ``docs/<page>.md:<line>``, the line of the mistake."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    line = next(i for i, ln in enumerate(text.split("\n"), 1) if "emma-mamba export --checkpoint DIR" in ln)
    broken = _mutate(text, "emma-mamba export --checkpoint DIR --out OUT [--dtype bf16] [--keep-align-head]",
                     "emma-mamba export --checkpoint DIR --out OUT [--dtype bf16] [--keep-align-hed]")
    assert readme_problems(broken, name="docs/cli.md") == [
        f"docs/cli.md:{line}: `emma-mamba export` has no option --keep-align-hed"]


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


def test_every_option_of_every_command_is_in_its_cli_md_section():
    """docs/cli.md is "every command, one section each, with everything it does" (README): each option a
    command's parser takes (its --help) is named in that command's section, but the --SECTION.KEY config
    overrides of the training commands, which docs/training.md documents as config keys. The reverse (each
    option the pages name exists) is test_page_commands_options_paths_and_links_exist's."""
    from emma_mamba.cli import COMMANDS

    text = (ROOT / "docs" / "cli.md").read_text()
    sections = {}
    for part in re.split(r"\n## ", text):
        m = re.match(r"`emma-mamba ([a-z ]+)`", part.split("\n", 1)[0])
        if m:
            sections[m.group(1).strip()] = part
    missing = {}
    for path, (module, _) in COMMANDS.items():
        name = " ".join(path)
        assert name in sections, f"docs/cli.md has no section `emma-mamba {name}`"
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        for action in parser._actions:
            flags = [o for o in action.option_strings if o.startswith("--")]
            if not flags or flags[0] == "--help" or "." in flags[0] or action.help == argparse.SUPPRESS:
                continue
            if not any(re.search(re.escape(f) + r"(?![\w-])", sections[name]) for f in flags):
                missing.setdefault(name, []).append(flags[0])
    assert not missing, f"options not in their docs/cli.md section: {missing}"
