"""Per-turn latency of a conversation through `emma-mamba serve`: with the state cache vs without it.

    python benchmarks/serve_turns.py --checkpoint runs/quickstart/stage2 --image IMG [--turns 24] [--threads 1]

A stateless client sends the whole conversation with every request (the OpenAI API has no session). Without the
server's state cache each request prefills that whole history; with it a follow-up request prefills only its new
turn on top of the state kept after the previous answer. Two servers on the same checkpoint run side by side
(in-process, over HTTP on localhost), turn by turn, interleaved; each client keeps its own history of the
answers it got; greedy answers must be equal (checked). Printed and written as JSON: per-turn request seconds of
each, the positions each prefilled, whether the cache hit, and the ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402

QUESTIONS = ["What shapes are in the image?", "How many shapes are there?", "Is there a red circle?",
             "What color is the square?", "Is there a star in the image?", "Describe the image."]


def main(argv=None) -> int:
    import emma_mamba
    from emma_mamba.inference.generate import GenerationConfig
    from emma_mamba.inference.server import ChatService, make_server

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--turns", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=positive_int, default=1)
    add_out(p, 'serve_turns_cpu.json')
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    model = emma_mamba.load(args.checkpoint)
    defaults = GenerationConfig(max_new_tokens=args.new_tokens)
    servers, urls = [], {}
    for name, n in (("cache", 16), ("no_cache", 0)):
        srv = make_server(ChatService(model, defaults=defaults, state_cache=n), port=0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        urls[name] = f"http://127.0.0.1:{srv.server_port}/v1/chat/completions"
    image = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()

    def post(url, messages):
        req = urllib.request.Request(url, data=json.dumps({"messages": messages}).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        return out, time.perf_counter() - t0

    history = {k: [] for k in urls}
    for name in urls:  # untimed warm-up of both servers
        post(urls[name], [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                       {"type": "text", "text": "Hello?"}]}])
    rows = []
    for k in range(args.turns):
        q = QUESTIONS[k % len(QUESTIONS)]
        row = {"turn": k + 1}
        for name, url in (urls.items() if k % 2 == 0 else reversed(list(urls.items()))):
            content = [{"type": "image_url", "image_url": {"url": image}}] if k == 0 else []
            msgs = history[name] + [{"role": "user", "content": content + [{"type": "text", "text": q}]}]
            out, dt = post(url, msgs)
            answer = out["choices"][0]["message"]["content"]
            history[name] = msgs + [{"role": "assistant", "content": answer}]
            row[name] = {"seconds": dt, "prefilled": out["emma_mamba"]["prefilled_positions"],
                         "state_cache": out["emma_mamba"]["state_cache"], "answer": answer,
                         "context_positions": out["usage"]["prompt_tokens"]}
        if row["cache"]["answer"] != row["no_cache"]["answer"]:
            raise SystemExit(f"turn {k + 1}: the servers answered differently: {row['cache']['answer']!r} vs "
                             f"{row['no_cache']['answer']!r}")
        row["ratio"] = row["no_cache"]["seconds"] / row["cache"]["seconds"]
        rows.append(row)
        c, n = row["cache"], row["no_cache"]
        print(f"turn {k + 1:3d}  context {n['context_positions']:5d}  cache {c['seconds'] * 1e3:7.1f} ms "
              f"(prefilled {c['prefilled']:4d}, {c['state_cache']})  no cache {n['seconds'] * 1e3:7.1f} ms "
              f"(prefilled {n['prefilled']:4d})  ratio {row['ratio']:5.2f}", flush=True)
    for srv in servers:
        srv.shutdown()
        srv.server_close()
    res = {"benchmark": "serve_turns", "checkpoint": str(args.checkpoint), "model": model.config.name,
           "image": str(args.image), "turns": args.turns, "new_tokens": args.new_tokens,
           "dtype": "float32", **machine(torch.device("cpu"), args.threads), "transport": "HTTP on localhost, in-process servers",
           "rows": rows}
    write_result(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
