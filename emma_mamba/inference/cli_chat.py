"""`emma-mamba chat`: a multi-turn conversation about an image (or text only), the Mamba state carried between turns.

    emma-mamba chat --checkpoint runs/finetune --image cat.jpg
    emma-mamba chat --lm path/to/mamba-2.8b-zephyr
    printf 'What colour is the circle?\nAnd the square?\n' | emma-mamba chat --checkpoint DIR --image shapes.png

One question per line on stdin; each answer streams to stdout on its own line. Each turn prefills only the new
tokens on top of the carried state (see :mod:`emma_mamba.inference.chat`): its cost does not grow with the
conversation. Per-turn statistics go to stderr. Commands: ``/reset`` (new conversation, same image),
``/image FILE`` (new conversation about another image), ``/save FILE`` (the conversation, i.e. its state: a
few MB at any length; an existing FILE is kept unless ``/save! FILE``), ``/load FILE`` (continue a saved
conversation), ``/quit``. Ctrl-C during an answer abandons that turn (the conversation stays as it was before
it); Ctrl-C or EOF at the prompt ends the chat. A command that fails (a missing image, a path that cannot be
written, a file that is not a chat state) and a question the model refuses print an error and leave the
conversation as it was: a mistake never ends the chat.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from emma_mamba.inference.cli_generate import (
    UsageError, _err, _stream, add_model_arguments, add_sampling_arguments, load_lm, load_vlm, setup)

HELP = ("commands: /reset (new conversation), /image FILE (new conversation about FILE), /save FILE (/save! FILE "
        "replaces an existing file), /load FILE (the conversation's state), /quit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=256)


def _check_image(model, path) -> None:
    """Decode ``path`` once now, so a missing or corrupt image is reported before the first question."""
    if Path(path).is_dir():
        raise UsageError(f"image {path}: is a directory, not an image file")
    if not Path(path).is_file():
        raise UsageError(f"image {path}: no such file")
    try:
        model.image_processor([path])
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None


def run(args) -> int:
    from emma_mamba.inference.chat import ChatSession

    try:
        device, dtype, gcfg = setup(args)
        if args.checkpoint is not None:
            model = load_vlm(args, device, dtype)
            if args.image is not None:
                _check_image(model, args.image)
            session = ChatSession(model, args.image, config=gcfg)
        else:
            lm, tok = load_lm(args, device, dtype)
            session = ChatSession(lm, tokenizer=tok, config=gcfg)
    except (UsageError, ValueError) as e:
        return _err(str(e), "chat")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            importlib.import_module("readline")  # importing it gives input() line editing and history
        except ImportError:
            pass
        what = f"about {args.image}" if args.image else "(text only)"
        print(f"[chat {what}; {HELP}]", file=sys.stderr)
    n_line = 0
    while True:
        try:
            line = input("you> ") + "\n" if interactive else sys.stdin.readline()
        except (KeyboardInterrupt, EOFError):
            print(file=sys.stderr)
            break
        except UnicodeDecodeError as e:  # a stdin that decodes strictly: the line is lost, the chat goes on
            n_line += 1
            _err(f"line {n_line} is not UTF-8 text ({e.reason}); it was skipped, the conversation is as it was",
                 "chat")
            continue
        if not line:  # EOF
            break
        n_line += 1
        line = line.strip()
        if not line:
            continue
        try:  # Python decodes a non-UTF-8 byte of stdin as a lone surrogate, which no tokenizer takes
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = line[e.start].encode("utf-8", "surrogateescape")
            _err(f"line {n_line} is not UTF-8 text (byte {bad!r} at character {e.start}); it was skipped, the "
                 f"conversation is as it was", "chat")
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            try:
                session = _command(session, cmd, rest.strip())
            except (UsageError, ValueError, OSError) as e:  # the session is kept as it was
                _err(str(e), "chat")
            except KeyboardInterrupt:  # mid /load or /save (a save leaves no partial file behind)
                print(f"\n[{cmd} interrupted; the conversation is as it was]", file=sys.stderr)
            continue
        try:
            session.ask(line, streamer=_stream)
        except KeyboardInterrupt:
            print("\n[answer interrupted; the conversation is as it was before this question]", file=sys.stderr)
            continue
        except (ValueError, OSError) as e:  # e.g. the image file went away before the first question
            _err(str(e), "chat")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        st = session.stats[-1]
        rate = (f", decode {st.decode_steps / st.decode_seconds:.1f} tokens/s"
                if st.decode_steps and st.decode_seconds > 0 else "")
        print(f"[turn {len(session.turns)}: {st.prompt_tokens} tokens prefilled in {st.prefill_seconds:.3f} s, "
              f"{st.new_tokens} new ({st.finish_reason}{rate}); context {st.context_tokens} tokens, "
              f"state {session.state_bytes / 2**20:.2f} MiB]", file=sys.stderr)
    return 0


def _command(session, cmd: str, arg: str):
    """Run one ``/command`` (not /quit); returns the session to go on with (another one after /load). Raises
    UsageError, ValueError or OSError for a command that fails, leaving ``session`` as it was."""
    if cmd == "/reset":
        session.reset()
        print("[new conversation]", file=sys.stderr)
        return session
    if cmd not in ("/image", "/save", "/save!", "/load"):
        raise UsageError(f"unknown command {(cmd + ' ' + arg).strip()!r}; {HELP}")
    if not arg:
        raise UsageError(f"{cmd} needs a FILE; {HELP}")
    path = Path(arg).expanduser()
    if cmd == "/image":
        if session.vlm is None:
            raise UsageError("/image needs an EMMA-Mamba --checkpoint (a text-only --lm cannot see images)")
        _check_image(session.vlm, path)
        session.reset(image=str(path))
        print(f"[new conversation about {path}]", file=sys.stderr)
        return session
    if cmd in ("/save", "/save!"):
        # an existing file (another conversation, or a checkpoint given by mistake) is replaced only on request
        if cmd == "/save" and path.is_file():
            raise UsageError(f"/save {path}: the file exists; '/save! {path}' replaces it")
        session.save(path, overwrite=cmd == "/save!")  # to a temporary file, then renamed: never half-written
        print(f"[conversation saved to {path}: {len(session.turns)} turns, {session.context_tokens} tokens of "
              f"context]", file=sys.stderr)
        return session
    loaded = type(session).load(path, session.vlm or session.lm, tokenizer=None if session.vlm else session.tokenizer,
                                config=session.config)
    print(f"[conversation loaded from {path}: {len(loaded.turns)} turns, {loaded.context_tokens} tokens of "
          f"context]", file=sys.stderr)
    return loaded
