"""`emma-mamba bench lm`: MambaLM against transformers' MambaForCausalLM on the CPU, same weights, one run
(``--ssm-layer mamba2``: a Mamba-2 MambaLM against transformers' Mamba2ForCausalLM).

Both models hold the same random weights (ours, mamba init, copied into transformers' model through the
*-hf tensor names), the same dtype, and run under ``torch.inference_mode`` with the same thread count. The
run checks first that both give the same last-token logits, then measures:

* **prefill**: one forward over a ``--prompt-len`` (2048) token prompt that also fills the recurrent cache
  (ours: ``lm(ids, cache=..., num_last_tokens=1)``; transformers: ``model(ids, use_cache=True,
  logits_to_keep=1)``), median of ``--repeats`` after ``--warmup`` runs;
* **decode**: ``--new-tokens`` (256) greedy steps at batch 1 after a short prompt, each step one forward of
  one token with the cache and an argmax, the identical loop for both models (median over repeats); plus
  ours through the full :func:`emma_mamba.inference.generate.generate` path, for reference.

Without mamba-ssm (never on a CPU) transformers runs its pure-PyTorch path: a Python loop over time steps
after materialising ``exp(delta * A)`` for the whole sequence. Ours runs on whichever backend
:mod:`emma_mamba.ops` picks (the C++ ``cpu`` kernels when built). Shapes default to mamba-130m (d_model 768,
24 layers, vocab 50280; ``--quick``: d_model 256, 4 layers, prompt 256, 32 new tokens, each unless given).
Ratios (transformers time / ours) are printed and everything goes to ``--out`` (default
``bench_results/lm_cpu_<d_model>x<n_layer>.json``, ``lm_cpu_mamba2_...`` for Mamba-2) with machine, versions,
shapes, dtype and backend, after each section (Ctrl-C leaves the finished ones). Targets (Mamba-1 only, against
MambaForCausalLM's Python loop over time steps): prefill >= 3x, decode >= 1x. A Mamba-2 run states none:
transformers' Mamba-2 CPU path is chunked matmuls, not a per-step loop, so those numbers do not apply to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from emma_mamba.bench import record

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {"prefill_speedup": 3.0, "decode_speedup": 1.0}
"""Mamba-1 against MambaForCausalLM only (a Mamba-2 run states no target)."""
SHAPES = {"d_model": 768, "n_layer": 24, "prompt_len": 2048, "new_tokens": 256}
QUICK = {"d_model": 256, "n_layer": 4, "prompt_len": 256, "new_tokens": 32}
"""The defaults of the four options ``--quick`` sets (an option given explicitly wins over both)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    pos, nonneg = record.positive_int, record.non_negative_int
    p.add_argument("--d-model", type=pos, default=None, help="model width (default 768: mamba-130m; --quick 256)")
    p.add_argument("--n-layer", type=pos, default=None, help="layers (default 24; --quick 4)")
    p.add_argument("--vocab-size", type=pos, default=50280, help="vocabulary (default 50280)")
    p.add_argument("--ssm-layer", choices=("mamba1", "mamba2"), default="mamba1",
                   help="the mixer (default mamba1, against MambaForCausalLM; mamba2: against Mamba2ForCausalLM)")
    p.add_argument("--headdim", type=pos, default=64, help="Mamba-2 channels per head (default 64)")
    p.add_argument("--ngroups", type=pos, default=1, help="Mamba-2 B/C groups (default 1)")
    p.add_argument("--d-state", type=pos, default=None, help="SSM state size (default 16; 128 for mamba2)")
    p.add_argument("--d-conv", type=pos, default=4)
    p.add_argument("--expand", type=pos, default=2)
    p.add_argument("--prompt-len", type=pos, default=None, help="prefill length (default 2048; --quick 256)")
    p.add_argument("--new-tokens", type=pos, default=None, help="decode steps (default 256; --quick 32)")
    p.add_argument("--decode-prompt-len", type=pos, default=16, help="prompt before the decode loop")
    p.add_argument("--repeats", type=pos, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=nonneg, default=1, help="untimed runs first")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--threads", type=pos, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes for a smoke check: d_model 256, 4 layers, prompt 256, 32 new tokens (each "
                        "of these given explicitly wins)")
    p.add_argument("--out", type=record.out_path, default=None,
                   help="JSON path (default bench_results/lm_cpu_<d_model>x<n_layer>.json)")


def resolve_shapes(args) -> dict:
    """Fill ``--d-model``, ``--n-layer``, ``--prompt-len``, ``--new-tokens`` left out with the defaults (``--quick``:
    its small ones); returns which were given explicitly."""
    given = {k: getattr(args, k) for k in SHAPES if getattr(args, k) is not None}
    for k in SHAPES:
        if getattr(args, k) is None:
            setattr(args, k, (QUICK if args.quick else SHAPES)[k])
    return given


def default_out(args) -> str:
    tag = "mamba2_" if args.ssm_layer == "mamba2" else ""
    return record.default_out(f"lm_cpu_{tag}{args.d_model}x{args.n_layer}.json")


def _median_time(fn, repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _hf_twin(lm, dtype):
    """transformers' MambaForCausalLM (Mamba2ForCausalLM for a Mamba-2 LM) with exactly ``lm``'s weights."""
    import transformers

    c = lm.config
    common = dict(vocab_size=c.padded_vocab_size, hidden_size=c.d_model, state_size=c.d_state,
                  num_hidden_layers=c.n_layer, conv_kernel=c.d_conv, expand=c.expand, use_bias=c.bias,
                  use_conv_bias=c.conv_bias, layer_norm_epsilon=c.rms_norm_eps, residual_in_fp32=c.residual_in_fp32,
                  tie_word_embeddings=c.tie_embeddings)
    if c.ssm_layer == "mamba2":
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            **common, num_heads=c.nheads, head_dim=c.headdim, n_groups=c.ngroups, chunk_size=256))
    else:
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(**common, time_step_rank=c.resolved_dt_rank))
    hf = hf.to(dtype).eval()
    sd = {("backbone." + k if not k.startswith("lm_head.") else k): v for k, v in lm.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto transformers' model: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        if c.tie_embeddings and hf.lm_head.weight.data_ptr() != hf.backbone.embeddings.weight.data_ptr():
            hf.lm_head.weight.copy_(hf.backbone.embeddings.weight)
    return hf


def hf_cache_keyword(hf) -> str:
    """transformers' keyword for a Mamba model's recurrent state, in its forward and in its output: `cache` where
    the forward takes it (Mamba2ForCausalLM, and MambaForCausalLM from transformers 5.2x, where `cache_params`
    is deprecated), else `cache_params` (older releases)."""
    from emma_mamba.models.baseline import cache_keyword

    return cache_keyword(hf, "cache_params")


def _hide_cuda_only_packages() -> None:
    """Make transformers take its pure-PyTorch Mamba path on the CPU.

    transformers binds mamba-ssm / causal-conv1d at import time whenever they are importable, whatever the
    device, and their CUDA kernels reject CPU tensors. The benchmark runs on the CPU, so it hides them (in this
    process only) before transformers' Mamba module is first imported.
    """
    for name in ("transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2"):
        if name in sys.modules:
            mod = sys.modules[name]
            if any(getattr(sys.modules.get(p), "__file__", None) for p in ("mamba_ssm", "causal_conv1d")):
                raise SystemExit(f"emma-mamba bench lm: transformers' Mamba ({mod.__file__}) was imported with "
                                 f"mamba-ssm/causal-conv1d bound; run the benchmark in a fresh process")
            return
    for name in ("mamba_ssm", "causal_conv1d"):
        sys.modules.setdefault(name, None)  # None in sys.modules makes `import name` raise ImportError


def run(args) -> int:
    start = record.run_start()
    explicit = resolve_shapes(args)
    out = args.out or default_out(args)
    problem = record.out_problem(out)
    if problem:
        raise SystemExit(f"emma-mamba bench lm: --out: {problem}")
    _hide_cuda_only_packages()
    import transformers

    from emma_mamba import ops
    from emma_mamba.inference.generate import GenerationConfig, generate
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(0)
    mamba2 = args.ssm_layer == "mamba2"
    d_state = args.d_state or (128 if mamba2 else 16)
    try:
        cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab_size, d_state=d_state,
                          d_conv=args.d_conv, expand=args.expand, ssm_layer=args.ssm_layer, headdim=args.headdim,
                          ngroups=args.ngroups)
    except ValueError as e:
        raise SystemExit(f"emma-mamba bench lm: {e}") from None
    targets = {} if mamba2 else TARGETS
    res: dict = {}
    results: dict = {}
    try:
        lm = MambaLM(cfg, dtype=dtype).eval()
        hf = _hf_twin(lm, dtype)
        backend = ops.get_backend("cpu")
        V = cfg.padded_vocab_size
        peer = type(hf).__name__
        cache_kw = hf_cache_keyword(hf)
        print(f"MambaLM vs transformers {transformers.__version__} {peer}: d_model {cfg.d_model}, "
              f"{cfg.n_layer} layers, vocab {V}, d_state {cfg.d_state}, {args.dtype}, backend {backend!r}, "
              f"{torch.get_num_threads()} threads", flush=True)
        res.update({
            "benchmark": "lm_cpu", "machine": record.machine_info("cpu", args.threads, start), "backend": backend,
            "dtype": args.dtype, "inference_mode": True, "peer": peer, "ssm_layer": cfg.ssm_layer,
            "shapes": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": V, "d_state": cfg.d_state,
                       **({"headdim": cfg.headdim, "ngroups": cfg.ngroups, "nheads": cfg.nheads} if mamba2
                          else {"dt_rank": cfg.resolved_dt_rank}),
                       "d_conv": cfg.d_conv, "expand": cfg.expand, "d_inner": cfg.d_inner,
                       "batch": 1, "prompt_len": args.prompt_len,
                       "new_tokens": args.new_tokens, "decode_prompt_len": args.decode_prompt_len},
            "quick": args.quick, "explicit_over_quick": explicit if args.quick else {},
            "repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
            "transformers_path": ("pure PyTorch (mamba-ssm/causal-conv1d not installed): chunked SSD matmuls"
                                  if mamba2 else
                                  "pure PyTorch (mamba-ssm/causal-conv1d not installed), use_mambapy=False"),
            "results": results, "complete": False,
        })
        save = record.saver(out, "cpu", args.threads, start)

        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g)
        short = torch.randint(0, cfg.vocab_size, (1, args.decode_prompt_len), generator=g)

        with torch.inference_mode():
            # the same weights give the same predictions (a short prompt keeps transformers' slow path cheap)
            ours_l = lm(short).logits[0, -1].float()
            hf_l = hf(short).logits[0, -1].float()
            max_diff = (ours_l - hf_l).abs().max().item()
            res["last_token_logits_max_abs_diff"] = max_diff
            print(f"last-token logits, max |ours - transformers| = {max_diff:.2e}", flush=True)

            def prefill_ours():
                return lm(prompt, cache=lm.allocate_cache(1), num_last_tokens=1).logits

            def prefill_hf():
                return hf(prompt, use_cache=True, logits_to_keep=1).logits

            def decode_ours():
                cache = lm.allocate_cache(1)
                tok = lm(short, cache=cache, num_last_tokens=1).logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                out = []
                for _ in range(args.new_tokens):
                    tok = lm(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
                    out.append(tok.item())
                return time.perf_counter() - t, out

            def decode_hf():
                r = hf(short, use_cache=True, logits_to_keep=1)
                cache = getattr(r, cache_kw)
                tok = r.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                out = []
                for _ in range(args.new_tokens):
                    r = hf(tok, use_cache=True, **{cache_kw: cache})
                    cache = getattr(r, cache_kw)
                    tok = r.logits[:, -1].argmax(-1, keepdim=True)
                    out.append(tok.item())
                return time.perf_counter() - t, out

            for name, fn in (("ours", prefill_ours), ("transformers", prefill_hf)):
                med, times = _median_time(fn, args.repeats, args.warmup)
                results[f"prefill_s_{name}"] = med
                results[f"prefill_runs_s_{name}"] = times
                print(f"prefill {args.prompt_len} tokens  {name:<12} {med * 1e3:10.1f} ms  "
                      f"({args.prompt_len / med:8.1f} tokens/s)", flush=True)
            save(res)
            toks = {}
            for name, fn in (("ours", decode_ours), ("transformers", decode_hf)):
                for _ in range(args.warmup):
                    fn()
                runs = [fn() for _ in range(args.repeats)]
                med = statistics.median(r[0] for r in runs)
                toks[name] = runs[0][1]
                results[f"decode_s_{name}"] = med
                results[f"decode_runs_s_{name}"] = [r[0] for r in runs]
                results[f"decode_tokens_per_s_{name}"] = args.new_tokens / med
                print(f"decode {args.new_tokens} tokens     {name:<12} {med * 1e3:10.1f} ms  "
                      f"({args.new_tokens / med:8.1f} tokens/s)", flush=True)
            agree = next((i for i, (a, b) in enumerate(zip(toks["ours"], toks["transformers"])) if a != b),
                         args.new_tokens)
            res["greedy_tokens_agree_for"] = agree
            save(res)

        gcfg = GenerationConfig(max_new_tokens=args.new_tokens + 1, eos_token_id=None)
        gen_runs = []
        for i in range(args.warmup + args.repeats):
            r = generate(lm, input_ids=short, config=gcfg)
            if i >= args.warmup:
                gen_runs.append(r.decode_steps / r.decode_seconds)
        results["generate_decode_tokens_per_s_ours"] = statistics.median(gen_runs)
    except KeyboardInterrupt:
        if res:
            res["machine"] = record.machine_info("cpu", args.threads, start)
        return record.interrupted(res or None, out)

    ratios = {"prefill_speedup": results["prefill_s_transformers"] / results["prefill_s_ours"],
              "decode_speedup": results["decode_s_transformers"] / results["decode_s_ours"]}
    met = {k: ratios[k] >= v for k, v in targets.items()}
    print(f"ours through generate(): {results['generate_decode_tokens_per_s_ours']:.1f} tokens/s")
    print(f"greedy tokens identical for the first {agree} of {args.new_tokens} steps")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x" + (f" (target >= {targets[k]:.0f}x: {'met' if met[k] else 'NOT met'})"
                                  if k in targets else ""))
    res.update({"ratios": ratios, "targets": targets or None, "targets_met": met or None, "complete": True})
    if not targets:
        res["targets_note"] = ("none for Mamba-2: the prefill >= 3x / decode >= 1x targets are Mamba-1's against "
                               "MambaForCausalLM's per-step Python loop")
    save(res)
    print(f"wrote {out}")
    return 0
