"""`emma-mamba serve` under concurrent image requests: a round's images encoded together vs one request at a time.

    python benchmarks/serve_images.py --checkpoint runs/quickstart/stage2 [--requests 8] [--max-tokens 4]

One :class:`~emma_mamba.inference.server.ChatService` on the checkpoint; ``--requests`` chat requests, each with
its own image (ShapesWorld-free: scikit-image's photographs, cycled), are queued while the decoder is held and
admitted in one round. Two settings, alternating over ``--runs``: the service as it is (the round's images
through the vision side in one batch, ``BatchDecoder.embed_batch``) and the same service embedding each request
alone (what it did before). The answers must be the same request by request (checked: greedy, the same
prompts). Printed and written as JSON: the wall time from release to the last answer, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "horse.png", "moon.png",
          "page.png")


def _round(svc, bodies) -> tuple[float, list[str]]:
    out = [None] * len(bodies)
    submitted = []
    submit = svc.decoder.submit

    def counting_submit(job):  # (an idle decoder thread may already hold the first job: count, not qsize)
        submitted.append(job)
        return submit(job)

    def call(i):
        out[i] = svc.complete(bodies[i])["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    svc.decoder.submit = counting_submit
    try:
        with svc.decoder.hold():
            for t in threads:
                t.start()
            deadline = time.perf_counter() + 60
            while len(submitted) < len(bodies) and time.perf_counter() < deadline:
                time.sleep(0.002)
            t0 = time.perf_counter()
    finally:
        del svc.decoder.submit
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    import base64

    import skimage

    import emma_mamba
    from emma_mamba.inference.generate import GenerationConfig
    from emma_mamba.inference.server import ChatService

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=positive_int, default=2)
    add_out(p, 'serve_images_cpu.json')
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    model = emma_mamba.load(args.checkpoint)
    data = os.path.dirname(skimage.data.__file__)
    urls = []
    for name in PHOTOS:
        path = os.path.join(data, name)
        mime = "jpeg" if name.endswith(".jpg") else "png"
        with open(path, "rb") as f:
            urls.append(f"data:image/{mime};base64,{base64.b64encode(f.read()).decode()}")
    def content(i):
        return [{"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                {"type": "text", "text": "What is in the picture?"}]

    bodies = [{"messages": [{"role": "user", "content": content(i)}], "max_tokens": args.max_tokens}
              for i in range(args.requests)]
    svc = ChatService(model, defaults=GenerationConfig(max_new_tokens=args.max_tokens), max_batch=args.requests,
                      state_cache=0)
    batched = svc.decoder.embed_batch
    alone = lambda reqs: [batched([r])[0] for r in reqs]  # noqa: E731 - the behaviour before: one request at a time
    _round(svc, bodies)  # warm-up
    times = {"batched": [], "one_by_one": []}
    answers = {}
    for run in range(args.runs):
        for name in (("batched", "one_by_one") if run % 2 == 0 else ("one_by_one", "batched")):
            svc.decoder.embed_batch = batched if name == "batched" else alone
            t, ans = _round(svc, bodies)
            times[name].append(t)
            answers.setdefault(name, ans)
    svc.decoder.close()
    if answers["batched"] != answers["one_by_one"]:
        raise SystemExit(f"the answers differ: {answers}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.requests} image requests admitted together, {args.max_tokens} tokens each: "
          f"batched {med['batched'] * 1e3:.0f} ms, one by one {med['one_by_one'] * 1e3:.0f} ms "
          f"({med['one_by_one'] / med['batched']:.2f}x)")
    doc = {"benchmark": "serve_images", "checkpoint": args.checkpoint, "machine": machine(torch.device("cpu"),
                                                                                          args.threads),
           "requests": args.requests, "max_tokens": args.max_tokens, "runs": args.runs,
           "vision": model.config.vision.model_name, "image_tokens": model.vision.num_tokens,
           "seconds": times, "median_seconds": med, "speedup": med["one_by_one"] / med["batched"],
           "answers_equal": True}
    write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
