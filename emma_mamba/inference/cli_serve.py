"""`emma-mamba serve`: an OpenAI-compatible chat-completions HTTP API (see :mod:`emma_mamba.inference.server`).

    emma-mamba serve --checkpoint runs/finetune --port 8000 [--device cuda --cuda-graphs]
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the picture?"}]}]}'

Any OpenAI client works against ``http://HOST:PORT/v1`` (``stream: true`` included; HTTP/1.1 keep-alive); a
web page of another origin, once named with ``--cors-origin``, too (CORS). The sampling options
below are the defaults a request's own fields override; ``--max-new-tokens`` is also the default answer length.
"""

from __future__ import annotations

import argparse
import sys

from emma_mamba.inference.cli_generate import (UsageError, _err, add_model_arguments, add_sampling_arguments,
                                               load_lm, load_vlm, setup)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, image=False)  # each request brings its own images
    add_sampling_arguments(p, max_new_tokens=256)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require 'Authorization: Bearer <key>' with the key read from this environment variable "
                        "(advised with --host 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--model-name", nargs="+", default=None, metavar="NAME",
                   help="the model id the API reports (default: the checkpoint's name); more names are aliases a "
                        "request may also send as its \"model\" (as vLLM's --served-model-name): a request naming "
                        "any other model is refused (404 model_not_found), as OpenAI's API and vLLM refuse it")
    p.add_argument("--allow-local-images", action="store_true",
                   help="also accept image_url values that are paths on this machine (off: data: URLs only)")
    p.add_argument("--max-prompt-positions", type=int, default=32768,
                   help="refuse conversations longer than this, visual tokens included (default %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the most new tokens a request may ask for (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together (continuous batching: a request joins the running batch after "
                        "its prefill, leaves it when done; 1 = one at a time; with --cuda-graphs one graph per "
                        "batch size up to this; default %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="while answers are being decoded, prefill at most this many prompt positions between two "
                        "decode steps: a long prompt is prefilled in chunks, so the streams already running are "
                        "not stalled by it (0 = whole prompts; default %(default)s)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages of ORIGIN (scheme://host[:port], e.g. https://example.com; '*': any) call the "
                        "API from the browser (CORS; preflights need no API key, the requests still do); repeatable "
                        "(default: none, no CORS headers)")
    p.add_argument("--no-web-ui", action="store_true",
                   help="do not answer GET / with the chat page (a browser client of /v1/chat/completions)")
    p.add_argument("--max-concurrent-requests", type=int, default=128, metavar="N",
                   help="chat / text completion requests answered at once, queued ones included; one more gets a "
                        "429 with Retry-After instead of waiting behind them (0 = no limit; default %(default)s)")
    p.add_argument("--state-cache", type=int, default=16,
                   help="conversation states kept so that a follow-up request prefills only its new turn "
                        "(0 = off; each is the model's recurrent state, ~25 MB at 2.8B; default %(default)s)")


def _listen_error(host: str, port: int, err: OSError) -> UsageError:
    """A socket error from listening on host:port as a message naming both and the option to change."""
    import errno

    where = f"cannot listen on {host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return UsageError(f"{where}: the port is already in use (another server?); choose another --port "
                          f"(0: any free port)")
    if err.errno == errno.EACCES:
        return UsageError(f"{where}: permission denied (ports below 1024 need privileges); choose a --port "
                          f"above 1023")
    if err.errno == errno.EADDRNOTAVAIL:
        return UsageError(f"{where}: this machine has no such address; check --host (127.0.0.1: this machine "
                          f"only, 0.0.0.0: every interface)")
    return UsageError(f"{where}: {err.strerror or err}; check --host and --port")


def _check_listen(host: str, port: int) -> None:
    """Bind host:port once before the model loads (which can take minutes), so a port in use or a bad host is
    reported at once; the server binds again after the load (a port taken in between is reported then)."""
    import socket

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {port}")
    if port == 0:  # any free port: nothing to check
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host}:{port}: --host {host!r} is not an address of this machine "
                         f"({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            raise _listen_error(host, port, e) from None


def run(args) -> int:
    from pathlib import Path

    from emma_mamba.inference.server import ChatService, cors_origin, make_server

    try:
        if args.image is not None:
            raise UsageError("--image does not apply: each request brings its own images")
        # every option checked before the model loads (which can take minutes)
        for flag, v in (("--max-batch", args.max_batch), ("--max-prompt-positions", args.max_prompt_positions),
                        ("--max-tokens-limit", args.max_tokens_limit)):
            if v < 1:  # every request would be refused
                raise UsageError(f"{flag} must be >= 1, got {v}")
        if args.prefill_chunk < 0:
            raise UsageError(f"--prefill-chunk must be >= 0 (0: whole prompts), got {args.prefill_chunk}")
        if args.state_cache < 0:
            raise UsageError(f"--state-cache must be >= 0, got {args.state_cache}")
        if args.max_new_tokens < 1:  # the default of every request that sends no max_tokens
            raise UsageError(f"--max-new-tokens must be >= 1 (the reply length of a request without max_tokens), "
                             f"got {args.max_new_tokens}")
        if args.max_new_tokens > args.max_tokens_limit:
            raise UsageError(f"--max-new-tokens {args.max_new_tokens} exceeds --max-tokens-limit "
                             f"{args.max_tokens_limit}")
        cors = []
        for origin in args.cors_origin or []:
            try:
                cors.append(cors_origin(origin))
            except ValueError as e:
                raise UsageError(f"--cors-origin: {e}") from None
        api_key = None
        if args.api_key_env:
            import os

            api_key = os.environ.get(args.api_key_env)
            if not api_key:
                raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
        if args.max_concurrent_requests < 0:
            raise UsageError(f"--max-concurrent-requests must be >= 0 (0: no limit), got "
                             f"{args.max_concurrent_requests}")
        _check_listen(args.host, args.port)
        device, dtype, gcfg = setup(args)
        if args.checkpoint is not None:
            model, tok = load_vlm(args, device, dtype), None
            name = Path(args.checkpoint).resolve().name
        else:
            model, tok = load_lm(args, device, dtype)
            name = Path(args.lm).resolve().name if args.lm else args.random_init
        service = ChatService(model, tokenizer=tok, defaults=gcfg, model_name=args.model_name or name,
                              allow_local_images=args.allow_local_images,
                              max_prompt_positions=args.max_prompt_positions,
                              max_new_tokens_limit=args.max_tokens_limit, state_cache=args.state_cache,
                              max_batch=args.max_batch, prefill_chunk=args.prefill_chunk)
        try:
            server = make_server(service, args.host, args.port, api_key=api_key, web_ui=not args.no_web_ui,
                                 cors_origins=cors, max_concurrent_requests=args.max_concurrent_requests or None)
        except OSError as e:
            service.close()
            raise _listen_error(args.host, args.port, e) from None
    except (UsageError, ValueError, OSError) as e:
        return _err(str(e), "serve")
    host, port = server.server_address[:2]
    page = "" if args.no_web_ui else f"; chat in a browser at http://{host}:{port}/"
    if cors:
        page += f"; CORS for {', '.join(cors)}"
    print(f"emma-mamba serve: {name} on http://{host}:{port}/v1 (POST /v1/chat/completions, /v1/completions, "
          f"GET /v1/models, GET /health){page}; Ctrl-C stops", file=sys.stderr, flush=True)
    import signal

    def stop(signum, frame):  # SIGTERM (docker stop, systemd, kill) stops as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        busy = server.unanswered_requests()  # (an answer completely sent is not cut off, its handler running)
        print("emma-mamba serve: stopping" + (f"; {busy} request(s) in progress are cut off (streams end with an "
                                               f"error event and [DONE])" if busy else ""), file=sys.stderr,
              flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()  # no new connections
        service.close()  # the requests decoding fail (DecoderClosed): their handlers end their responses
        left = server.wait_for_requests(timeout=5.0)
        if left:
            print(f"emma-mamba serve: {left} request(s) still being handled after 5 s; exiting", file=sys.stderr)
    return 0
