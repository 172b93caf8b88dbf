"""`emma-mamba generate`: answer about an image with an EMMA-Mamba checkpoint, or continue a text prompt with a
Mamba LM checkpoint, streaming the new text.

    emma-mamba generate --checkpoint runs/finetune --image cat.jpg --prompt "What is in the picture?"
    emma-mamba generate --lm path/to/mamba-130m --prompt "The capital of France is"
    emma-mamba generate --random-init tiny --prompt "hello"     # no weights: random model, noise output

The checkpoint directory may be in either public layout (state-spaces ``mamba-*`` or transformers
``mamba-*-hf``). The tokenizer is ``--tokenizer DIR``, else the checkpoint's own ``tokenizer.json``, else the
GPT-NeoX-20B tokenizer shipped with the package (the one all public Mamba-1 checkpoints use). The text goes to
stdout as it is produced; timings go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def add_model_arguments(p: argparse.ArgumentParser, image: bool = True) -> None:
    """The model to run and where (shared by ``generate``, ``chat`` and, without ``--image``, ``serve``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR",
                     help="EMMA-Mamba checkpoint directory (written by model.save, pretrain or finetune)")
    src.add_argument("--lm", metavar="DIR", help="checkpoint directory (state-spaces or transformers *-hf layout)")
    src.add_argument("--random-init", metavar="PRESET",
                     help="no weights: a randomly initialised model of this preset (tiny, mamba-130m, ...); its "
                          "output is noise, for trying the pipeline only")
    # serve: not listed in --help, but read, so that it is refused with the reason rather than "unrecognized"
    p.add_argument("--image", metavar="FILE", default=None,
                   help="image to ask about (with --checkpoint; any format PIL reads)" if image else argparse.SUPPRESS)
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory (with tokenizer.json) or file; default: the checkpoint's, else the "
                        "shipped GPT-NeoX-20B tokenizer")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="weights dtype (default: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--backend", default=None, choices=["cuda", "triton", "cpu", "torch"],
                   help="force a kernel backend (default: the best available)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"upper bound on new tokens (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and the random-init seed)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each decode step from a CUDA graph captured once (CUDA devices only)")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step through torch.compile (Inductor; with --cuda-graphs, captured)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help='prompt text ("-" reads it from stdin)')
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill a long prompt N positions at a time (memory bounded by N; 0: whole; default: "
                        "1024 on the CPU, whole on a GPU)")
    add_sampling_arguments(p)


class UsageError(Exception):
    """A user input the command refuses, with the message to print."""


def _err(msg: str, prog: str = "generate") -> int:
    print(f"emma-mamba {prog}: error: {msg}", file=sys.stderr)
    return 2


def setup(args):
    """-> (device, dtype, GenerationConfig) from the shared options; the backend is set. Raises UsageError."""
    import torch

    from emma_mamba import ops
    from emma_mamba.inference.generate import GenerationConfig

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA --device, got {args.device}")
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else (
        torch.float32 if device.type == "cpu" else torch.bfloat16)
    if args.backend:
        try:
            ops.set_backend(args.backend)
        except ops.BackendUnavailableError as e:
            raise UsageError(str(e)) from None
    try:
        gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                stop_strings=tuple(args.stop), seed=args.seed, cuda_graphs=args.cuda_graphs,
                                compile=args.compile)
    except ValueError as e:  # named by the option the user typed: GenerationConfig.top_p -> --top-p
        from emma_mamba.cli import as_options

        raise UsageError(as_options(str(e), "GenerationConfig")) from None
    return device, dtype, gcfg


def load_vlm(args, device, dtype):
    """``--checkpoint DIR``: the EMMA-Mamba model (checks the image path when one is given). Raises UsageError."""
    from emma_mamba.config import ConfigError
    from emma_mamba.models.vlm import load

    if Path(args.checkpoint).is_file():  # model.safetensors, config.yaml: the folder is what loads
        raise UsageError(f"--checkpoint {args.checkpoint} is a file; give its directory: "
                         f"{Path(args.checkpoint).parent}")
    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such directory")
    d = Path(args.checkpoint)
    if (d / "config.json").is_file() and not (d / "config.yaml").is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: a language model directory (config.json), not an "
                         f"EMMA-Mamba checkpoint: use --lm {args.checkpoint} for text continuation")
    if args.image is not None and not Path(args.image).is_file():
        what = "is a directory, not an image file" if Path(args.image).is_dir() else "no such file"
        raise UsageError(f"--image {args.image}: {what}")
    if args.tokenizer is not None:
        raise UsageError("--tokenizer applies to --lm only: a --checkpoint directory carries its own tokenizer")
    try:
        return load(args.checkpoint, device=device, dtype=dtype)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def load_lm(args, device, dtype):
    """``--lm DIR`` or ``--random-init PRESET``: (MambaLM in eval mode, tokenizer). Raises UsageError."""
    import torch

    from emma_mamba.models.mamba import MAMBA_PRESETS, CheckpointError, MambaConfig, MambaLM, hub_id_hint
    from emma_mamba.models.tokenizer import load_tokenizer

    if args.image is not None:
        raise UsageError("--image needs an EMMA-Mamba --checkpoint (a text-only --lm cannot see images)")
    if args.lm is not None:
        lm_dir = Path(args.lm)
        if not lm_dir.exists():
            hint = (f" (to try the command without weights: --random-init {args.lm})"
                    if args.lm in MAMBA_PRESETS else hub_id_hint(args.lm))
            raise UsageError(f"--lm {args.lm}: no such directory{hint}")
        if (lm_dir / "config.yaml").is_file() and not (lm_dir / "config.json").is_file():
            raise UsageError(f"--lm {args.lm}: an EMMA-Mamba checkpoint (config.yaml), not a language model "
                             f"directory: use --checkpoint {args.lm} (and --image), or export its LM with "
                             f"`emma-mamba export --lm-only`")
        try:
            lm = MambaLM.from_pretrained(lm_dir, device=device, dtype=dtype)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        tok_src = args.tokenizer or (lm_dir if (lm_dir / "tokenizer.json").is_file() else None)
    else:
        if args.random_init not in MAMBA_PRESETS:
            raise UsageError(f"--random-init {args.random_init!r}: choose one of {', '.join(MAMBA_PRESETS)}")
        if args.seed is not None:
            torch.manual_seed(args.seed)
        lm = MambaLM(MambaConfig.from_preset(args.random_init), device=device, dtype=dtype)
        print(f"[random weights ({args.random_init}): the output is noise]", file=sys.stderr)
        tok_src = args.tokenizer
    lm.eval()
    try:
        tok = load_tokenizer(tok_src)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if tok_src is None and args.lm is not None:
        print("[tokenizer: the shipped GPT-NeoX-20B tokenizer]", file=sys.stderr)
    return lm, tok


def check_ids(ids, lm, what="the prompt"):
    if not ids:
        raise UsageError(f"{what} encodes to no tokens")
    bad = [i for i in ids if i >= lm.config.padded_vocab_size]
    if bad:
        raise UsageError(f"the tokenizer produced id {bad[0]}, beyond the model's embedding (ids 0.."
                         f"{lm.config.padded_vocab_size - 1}: vocab_size {lm.config.vocab_size}, padded); is "
                         f"--tokenizer the checkpoint's tokenizer?")


def run(args) -> int:
    try:
        return _run(args)
    except UsageError as e:
        return _err(str(e))


def _run(args) -> int:
    from emma_mamba import ops
    from emma_mamba.inference.generate import generate

    device, dtype, gcfg = setup(args)
    if args.prefill_chunk is not None:
        if args.prefill_chunk < 0:
            raise UsageError(f"--prefill-chunk must be >= 0 (0: whole), got {args.prefill_chunk}")
        gcfg.prefill_chunk = args.prefill_chunk or None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("the prompt is empty")
    if args.checkpoint is not None:
        return _run_vlm(args, gcfg, device, dtype, prompt)
    lm, tok = load_lm(args, device, dtype)
    gcfg.eos_token_id = tok.eos_token_id
    ids = tok.encode(prompt)
    check_ids(ids, lm)

    sys.stdout.write(prompt)
    sys.stdout.flush()
    res = generate(lm, input_ids=ids, config=gcfg, tokenizer=tok, streamer=_stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    n_new = len(res.sequences[0])
    rate = res.decode_steps / res.decode_seconds if res.decode_seconds > 0 else float("nan")
    print(f"[{len(ids)} prompt tokens, {n_new} new ({res.finish_reasons[0]}); prefill {res.prefill_seconds:.3f} s; "
          f"decode {rate:.1f} tokens/s; backend {ops.get_backend(device)}, {str(dtype).replace('torch.', '')}]",
          file=sys.stderr)
    return 0


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_vlm(args, gcfg, device, dtype, prompt) -> int:
    """`--checkpoint DIR --image FILE`: one streamed answer from the multimodal model."""
    import time

    from emma_mamba import ops
    from emma_mamba.models.vlm import answer

    if args.image is None:
        raise UsageError("--checkpoint needs --image FILE (the picture to ask about)")
    model = load_vlm(args, device, dtype)
    token = model.config.image_token
    if token in prompt:
        # the tokenizer would read it as a second image slot (training data uses the text that way), and the
        # count check would then report two placeholders for the one the user typed
        where = "the prompt (stdin)" if args.prompt == "-" else "--prompt"
        raise UsageError(f"{where} holds {token!r}, the model's image placeholder: that text is reserved (the "
                         f"--image is placed before the prompt by itself); remove it")
    t0 = time.perf_counter()
    try:
        res = answer(model, args.image, prompt, streamer=_stream, config=gcfg, return_result=True)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    # the tokens generated (an ending end-of-text not counted), not a re-encoding of the text
    print(f"[{len(res.sequences[0])} answer tokens ({res.finish_reasons[0]}) in {time.perf_counter() - t0:.2f} s; "
          f"backend {ops.get_backend(device)}, {str(dtype).replace('torch.', '')}]", file=sys.stderr)
    return 0
