"""Throughput of `emma-mamba serve` under concurrent clients: continuous batching vs one request at a time.

    python benchmarks/serve_concurrency.py [--preset mamba-130m] [--clients 8] [--requests 3] [--new-tokens 48]

Two servers on the same random-weight text LM (in-process, HTTP on localhost), ``--max-batch 1`` and
``--max-batch N``; the same ``clients`` threads each send ``requests`` chat requests one after another (greedy,
each its own prompt), first to one server, then to the other (the order alternates per run: ``--runs``). The
answers must be equal request by request (checked: they are the same prompts, decoded alone or in a batch).
Printed and written as JSON: wall time, completion tokens per second, request latency percentiles, the largest
batch each request was decoded in, and the throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (add_out, machine, parse_args, positive_int, random_lm, run_script,  # noqa: E402
                                write_result)

WORDS = ("the model of a small red boat sails over a calm lake while birds circle above and children watch "
         "from the shore as the sun goes down behind the hills").split()


def _prompt(i: int) -> str:
    n = 8 + (7 * i) % 23
    return "Tell me about " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + "."


def _run(url: str, clients: int, requests: int, new_tokens: int) -> dict:
    out: dict[int, dict] = {}

    def client(c: int):
        for r in range(requests):
            i = c * requests + r
            body = {"messages": [{"role": "user", "content": _prompt(i)}], "max_tokens": new_tokens}
            req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type":
                                                                                      "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=3600) as resp:
                got = json.loads(resp.read())
            out[i] = {"seconds": time.perf_counter() - t0, "text": got["choices"][0]["message"]["content"],
                      "tokens": got["usage"]["completion_tokens"], "batch_rows": got["emma_mamba"]["batch_rows"]}

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(v["seconds"] for v in out.values())
    tokens = sum(v["tokens"] for v in out.values())
    return {"wall_seconds": wall, "completion_tokens": tokens, "tokens_per_second": tokens / wall,
            "latency_p50": statistics.median(lat), "latency_p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))],
            "max_batch_rows": max(v["batch_rows"] for v in out.values()),
            "answers": [out[i]["text"] for i in sorted(out)]}


def main(argv=None) -> int:
    from emma_mamba.inference.generate import GenerationConfig
    from emma_mamba.inference.server import ChatService, make_server

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mamba-130m", help="LM shapes (random weights)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=2, help="rounds over both servers (order alternating)")
    p.add_argument("--threads", type=positive_int, default=2)
    add_out(p, 'serve_concurrency_cpu.json')
    args = parse_args(p, argv)
    lm, tok = random_lm(args.preset, args.threads)
    # no EOS: every answer runs to max_tokens, so both servers decode the same token count
    defaults = GenerationConfig(max_new_tokens=args.new_tokens)
    urls, servers = {}, []
    for name, mb in (("one_at_a_time", 1), ("batched", args.max_batch)):
        svc = ChatService(lm, tokenizer=tok, defaults=defaults, max_batch=mb, state_cache=0)
        svc.tokenizer = _NoEos(tok)
        srv = make_server(svc, port=0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        urls[name] = f"http://127.0.0.1:{srv.server_port}/v1/chat/completions"
    for url in urls.values():  # untimed warm-up
        _run(url, 2, 1, 4)
    runs = []
    for k in range(args.runs):
        order = list(urls.items()) if k % 2 == 0 else list(reversed(urls.items()))
        row = {name: _run(url, args.clients, args.requests, args.new_tokens) for name, url in order}
        if row["batched"]["answers"] != row["one_at_a_time"]["answers"]:
            diff = next(i for i, (a, b) in enumerate(zip(row["batched"]["answers"], row["one_at_a_time"]["answers"]))
                        if a != b)
            raise SystemExit(f"run {k + 1}: request {diff} was answered differently in a batch")
        row["throughput_ratio"] = row["batched"]["tokens_per_second"] / row["one_at_a_time"]["tokens_per_second"]
        for name in urls:
            r = row[name]
            print(f"run {k + 1} {name:14s} {r['wall_seconds']:7.2f} s  {r['tokens_per_second']:8.1f} tokens/s  "
                  f"latency p50 {r['latency_p50']:6.2f} s p90 {r['latency_p90']:6.2f} s  "
                  f"largest batch {r['max_batch_rows']}", flush=True)
        print(f"run {k + 1} throughput ratio (batched / one at a time): {row['throughput_ratio']:.2f}x", flush=True)
        for name in urls:
            row[name].pop("answers")
        runs.append(row)
    for srv in servers:
        srv.shutdown()
        srv.server_close()
    res = {"benchmark": "serve_concurrency", "preset": args.preset, "weights": "random", "clients": args.clients,
           "requests_per_client": args.requests, "new_tokens": args.new_tokens, "max_batch": args.max_batch,
           "dtype": "float32", "transport": "HTTP on localhost, in-process servers, greedy decoding",
           **machine(torch.device("cpu"), args.threads), "runs": runs,
           "median_throughput_ratio": statistics.median(r["throughput_ratio"] for r in runs)}
    write_result(res, args.out, indent=1)
    return 0


class _NoEos:
    """The tokenizer with no end-of-sequence id, so that random weights answer max_tokens every time."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = None

    def __getattr__(self, name):
        return getattr(self._tok, name)


if __name__ == "__main__":
    sys.exit(run_script(main))
