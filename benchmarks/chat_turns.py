"""Per-turn latency of a long chat: the state carried between turns (ChatSession) vs re-reading the history.

    python benchmarks/chat_turns.py [--preset mamba-130m] [--turns 24] [--new-tokens 16] [--threads 2]

A stateless chat front end (or a recurrent model served without its state) answers turn k by prefilling the
whole conversation so far; :class:`emma_mamba.inference.chat.ChatSession` prefills only turn k's own tokens on
top of the carried state. Both run here on the same random-weight Mamba LM with the same questions, turn by
turn, interleaved (session turn k, then the re-prefill of turn k), and must produce the same answers (greedy;
checked). Printed and written as JSON: per-turn seconds of each, the context length, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (add_out, machine, parse_args, positive_int, random_lm, run_script,  # noqa: E402
                                write_result)

QUESTIONS = ["Tell me about the weather today.", "What should I wear?", "And if it rains later?",
             "Which shoes are best for that?", "Where can I buy them?", "How much do they cost?"]


def main(argv=None) -> int:
    from emma_mamba.inference.chat import ChatSession
    from emma_mamba.inference.generate import GenerationConfig, generate
    from emma_mamba.models.vlm import CHAT_TEMPLATE, TURN_END, TURN_SEP

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mamba-130m")
    p.add_argument("--turns", type=positive_int, default=24)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument("--threads", type=positive_int, default=2)
    add_out(p, 'chat_turns_cpu.json')
    args = parse_args(p, argv)
    lm, tok = random_lm(args.preset, args.threads)
    # eos None: every answer has exactly new_tokens tokens, so both paths do the same amount of decoding
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    session = ChatSession(lm, tokenizer=tok, config=cfg)
    session.config.eos_token_id = None
    plain = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=None)

    history: list[int] = []
    rows = []
    with torch.inference_mode():
        warm = ChatSession(lm, tokenizer=tok, config=cfg)  # untimed: first-call costs of both paths
        for q in QUESTIONS[:2]:
            warm.ask(q)
            generate(lm, input_ids=tok.encode(CHAT_TEMPLATE.format(prompt=q)), config=plain)
        for k in range(args.turns):
            q = QUESTIONS[k % len(QUESTIONS)]
            t0 = time.perf_counter()
            a = session.ask(q)
            t_session = time.perf_counter() - t0
            # the same token stream, re-prefilled from scratch
            turn = (tok.encode(TURN_SEP) if history else []) + tok.encode(CHAT_TEMPLATE.format(prompt=q))
            prompt = history + turn
            t0 = time.perf_counter()
            res = generate(lm, input_ids=prompt, config=plain, tokenizer=tok)
            t_full = time.perf_counter() - t0
            if res.texts[0] != a:
                raise SystemExit(f"turn {k + 1}: the two paths answered differently ({a!r} vs {res.texts[0]!r})")
            history = prompt + res.sequences[0] + tok.encode(TURN_END)
            rows.append({"turn": k + 1, "context_tokens": len(prompt), "session_s": t_session,
                         "reprefill_s": t_full, "ratio": t_full / t_session,
                         "session_prompt_tokens": session.stats[-1].prompt_tokens})
            print(f"turn {k + 1:3d}  context {len(prompt):5d} tokens  session {t_session * 1e3:8.1f} ms "
                  f"(prefilled {session.stats[-1].prompt_tokens:3d})  re-prefill {t_full * 1e3:8.1f} ms  "
                  f"ratio {t_full / t_session:5.2f}", flush=True)
    res = {"benchmark": "chat_turns", "preset": args.preset, "turns": args.turns, "new_tokens": args.new_tokens,
           "dtype": "float32", **machine(torch.device("cpu"), args.threads), "state_bytes": session.state_bytes, "rows": rows}
    print(f"state {session.state_bytes / 2**20:.2f} MiB at every turn")
    write_result(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
