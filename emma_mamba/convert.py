"""`emma-mamba convert cobra`: a released Cobra model (Zhao et al. 2024, ``han1997/cobra``) as an EmmaMamba
checkpoint, so our kernels, ``generate``, ``chat``, ``serve``, ``eval`` and ``bench latency`` run it.

    emma-mamba convert cobra --checkpoint cobra+3b/ --out cobra-3b/ \\
        --vision-weights ViT-SO400M-14-SigLIP-384/open_clip_pytorch_model.bin \\
        --dino-weights vit_large_patch14_reg4_dinov2.lvd142m/model.safetensors

Cobra is a Prismatic VLM: a frozen vision backbone from timm (its checkpoint holds no vision weights), a
projector and a Mamba LM. A run directory holds ``config.json`` (``{"model": {"vision_backbone_id",
"image_resize_strategy", "arch_specifier", "llm_backbone_id", ...}}``) and ``checkpoints/latest-checkpoint.pt``
(``{"model": {"projector": ..., "llm_backbone": ...}}``). The conversion:

* LM: ``llm_backbone``'s ``llm.backbone.*`` / ``llm.lm_head.weight`` are mamba-ssm's names; the shapes give the
  config (width, depth, vocabulary rows, d_state, d_conv, expand, dt_rank, biases); the tied head's copy must
  equal the embedding.
* Projector: ``projector.projector.{0,2,4}`` (``fused-gelu-mlp``: in -> 4 x in -> LM -> LM, ``projector.kind:
  fused``) or ``{0,2}`` (``gelu-mlp``: ``kind: mlp``, depth 2). Prismatic's fused backbones concatenate
  ``[DINOv2, SigLIP]`` features, ours ``[open_clip tower, second encoder]``: the first layer's input columns are
  rotated to match.
* Vision (``vision_backbone_id``): ``dinosiglip-vit-so-384px`` = the ``cobra-3b`` preset (open_clip's
  ViT-SO400M-14-SigLIP-384 with timm's vit_large_patch14_reg4_dinov2 at 384 px, the penultimate block's patch
  tokens of each, as Prismatic's ``get_intermediate_layers(n={depth - 2})``); ``siglip-vit-so400m-384px`` and
  ``clip-vit-l-336px`` (one tower). ``image_resize_strategy`` resize-naive / resize-crop / letterbox ->
  ``vision.image_resize`` squash / crop / letterbox. The towers' weights come from local files
  (``--vision-weights``: open_clip's file of the SigLIP/CLIP model; ``--dino-weights``: timm's DINOv2 file);
  ``--random-vision`` leaves them random (for smoke tests and latency benchmarks only: such a model sees noise).
* Prompt: Cobra puts the image's tokens before the whole Zephyr prompt, ``<|user|>\\n{question}<|endoftext|>
  \\n<|assistant|>\\n``: ``vision.image_position: before_turn`` with our chat template (the same string).

MFF, instruction fusion and the alignment head are off (Cobra has none). A checkpoint that also holds vision
weights (a ``full-finetune`` run) is refused; other extra modules are named and left out. The file is read with
``torch.load(weights_only=True)`` (no code runs from it) and memory-mapped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from emma_mamba.config import (ConfigError, ModelConfig, SecondEncoderConfig, VisionConfig,
                               apply_dotted_overrides, get_preset, load_config)

log = logging.getLogger(__name__)

#: Prismatic's vision_backbone_id -> (open_clip model, preprocess tag, timm second encoder or None, its kwargs)
VISION_BACKBONES = {
    "dinosiglip-vit-so-384px": ("ViT-SO400M-14-SigLIP-384", "webli", "vit_large_patch14_reg4_dinov2",
                                {"img_size": 384}),
    "siglip-vit-so400m-384px": ("ViT-SO400M-14-SigLIP-384", "webli", None, None),
    "clip-vit-l-336px": ("ViT-L-14-336-quickgelu", "openai", None, None),
}
RESIZE = {"resize-naive": "squash", "resize-crop": "crop", "letterbox": "letterbox"}
PROJECTORS = {"fused-gelu-mlp": ("fused", 3), "gelu-mlp": ("mlp", 2)}
CHECKPOINT_IN_RUN = Path("checkpoints") / "latest-checkpoint.pt"
OWN_KEYS = ("vision.pretrained", "vision.second_encoder.pretrained", "vision.image_resize", "vision.image_position")
"""Vision keys --override may not set: the weight flags and Cobra's run config decide them."""


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and what is wrong."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a Cobra run directory (config.json + checkpoints/latest-checkpoint.pt, as han1997/cobra's "
                        "cobra+3b/) or its .pt file alone")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not hold files)")
    p.add_argument("--vision-weights", metavar="FILE",
                   help="open_clip weights of the SigLIP (or CLIP) tower, e.g. timm/ViT-SO400M-14-SigLIP-384's "
                        "open_clip_pytorch_model.bin")
    p.add_argument("--dino-weights", metavar="FILE",
                   help="timm weights of DINOv2 (vit_large_patch14_reg4_dinov2.lvd142m's model.safetensors); "
                        "dinosiglip models only")
    p.add_argument("--random-vision", action="store_true",
                   help="no vision weights: random towers (smoke tests, latency benchmarks; the model sees noise)")
    p.add_argument("--config", metavar="FILE",
                   help="model config YAML to start from instead of the vision_backbone_id's preset (its vision "
                        "section is used; the LM, projector and prompt layout come from the checkpoint)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override (dotted key, YAML value) of the vision side, applied before the "
                        "checkpoint's LM, projector and prompt settings; repeatable")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="weights' storage dtype (default %(default)s; A_log, D, dt bias stay fp32)")


# ------------------------------------------------------------------------------------------ reading Cobra

@dataclass
class CobraRun:
    """What :func:`read_cobra` read: the run config's ``model`` section ({} without a config.json), the
    checkpoint's ``model`` modules, the .pt file and the config file's name (for messages)."""

    config: dict
    modules: dict
    checkpoint: Path
    config_file: str = "config.json"

    def field(self, key: str, default: str) -> str:
        """A string field of the run config (``default`` when absent)."""
        v = self.config.get(key, default)
        if not isinstance(v, str):
            raise ConversionError(f"{self.config_file}: model.{key} must be a string, got {v!r}")
        return v


def read_cobra(path: str | Path) -> CobraRun:
    """A Cobra run directory (config.json + checkpoints/latest-checkpoint.pt) or a .pt file, checked."""
    p = Path(path)
    run_cfg: dict = {}
    cfg_file = "config.json"
    if p.is_dir():
        ckpt = p / CHECKPOINT_IN_RUN
        if not ckpt.is_file():
            pts = sorted(str(x.relative_to(p)) for x in p.rglob("*.pt"))[:6]
            raise ConversionError(f"{p}: no {CHECKPOINT_IN_RUN} (a Cobra run directory holds config.json and "
                                  f"{CHECKPOINT_IN_RUN}){'; .pt files found: ' + ', '.join(pts) if pts else ''}")
        if (p / "config.json").is_file():
            cfg_file = str(p / "config.json")
            try:
                raw = json.loads(Path(cfg_file).read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ConversionError(f"{cfg_file}: not valid JSON ({e})") from None
            if not isinstance(raw, dict) or not isinstance(raw.get("model", {}), dict):
                raise ConversionError(f"{cfg_file}: expected a JSON object with a 'model' object (Prismatic's run "
                                      f"config)")
            run_cfg = dict(raw.get("model") or {})
    elif p.is_file():
        ckpt = p
    else:
        raise ConversionError(f"--checkpoint {p} does not exist")
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an old (non-zip) torch file cannot be memory-mapped: read it whole
        try:
            obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated / non-torch file: name it and the reason
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ConversionError(f"{ckpt}: not a readable torch checkpoint of tensors ({type(e).__name__}: "
                                  f"{first})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(f"{ckpt}: expected Prismatic's {{'model': {{'projector': ..., 'llm_backbone': ...}}}}, "
                              f"found {keys}")
    model = obj["model"]
    for key in ("projector", "llm_backbone"):
        if not isinstance(model.get(key), dict) or not model[key]:
            raise ConversionError(f"{ckpt}: model[{key!r}] is missing or empty (found modules: "
                                  f"{', '.join(sorted(map(str, model))) or 'none'})")
    if "vision_backbone" in model:
        raise ConversionError(f"{ckpt}: holds vision_backbone weights (a full-finetune run); converting a "
                              f"fine-tuned vision tower is not supported")
    extra = sorted(map(str, set(model) - {"projector", "llm_backbone"}))
    if extra:
        log.warning("%s: leaving out module(s) %s (not part of Cobra's inference model)", ckpt, ", ".join(extra))
    return CobraRun(run_cfg, model, ckpt, cfg_file)


def _tensors(sd: dict, what: str, ckpt: Path) -> None:
    """Every entry of a source state dict a floating-point tensor (named otherwise)."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            kind = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
            raise ConversionError(f"{ckpt}: {what} entry {k!r} is {kind}, not a floating-point tensor")


def _finite(sd: dict, what: str, ckpt: Path) -> None:
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise ConversionError(f"{ckpt}: {what} tensor {k!r} holds NaN or infinite values")


def _index(k: str, part: str, what: str, ckpt: Path) -> int:
    try:
        return int(part)
    except ValueError:
        raise ConversionError(f"{ckpt}: {what} tensor {k!r}: {part!r} is not a layer index") from None


def lm_state_and_config(llm: dict, ckpt: Path) -> tuple[dict, dict]:
    """The LM's state dict under MambaLM's names and the LMConfig fields its shapes imply."""
    from emma_mamba.models.mamba import _rename_key

    sd = {}
    for k, v in llm.items():
        if not isinstance(k, str) or not k.startswith("llm."):
            raise ConversionError(f"{ckpt}: llm_backbone tensor {k!r} is not under 'llm.' (Cobra's "
                                  f"MambaLLMBackbone)")
        sd[_rename_key(k[len("llm."):])] = v
    _tensors(llm, "llm_backbone", ckpt)
    emb = sd.get("embeddings.weight")
    if emb is None or emb.dim() != 2:
        raise ConversionError(f"{ckpt}: llm_backbone has no 2-D llm.backbone.embedding.weight")
    if "norm_f.bias" in sd:
        raise ConversionError(f"{ckpt}: the LM's norms have biases (LayerNorm blocks); only RMSNorm Mamba LMs "
                              f"are supported")
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, emb):
        raise ConversionError(f"{ckpt}: llm.lm_head.weight differs from the embedding; Cobra's Mamba LMs tie them")
    layers = sorted({_index(k, k.split(".")[1], "llm_backbone", ckpt) for k in sd if k.startswith("layers.")})
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"{ckpt}: the LM's block indices are not 0..n-1 (found {layers[:4]}...)")
    need = ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.dt_proj.weight", "mixer.A_log")
    for name in need:
        if f"layers.0.{name}" not in sd:
            raise ConversionError(f"{ckpt}: llm.backbone.layers.0.{name} is missing (not a Mamba-1 LM)")
    d_model = emb.shape[1]
    d_inner = sd["layers.0.mixer.in_proj.weight"].shape[0] // 2
    if d_inner % d_model:
        raise ConversionError(f"{ckpt}: in_proj gives d_inner {d_inner}, not a multiple of d_model {d_model}")
    fields = dict(d_model=d_model, n_layer=len(layers), vocab_size=emb.shape[0],
                  d_state=sd["layers.0.mixer.A_log"].shape[1], d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
                  expand=d_inner // d_model, dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1],
                  conv_bias="layers.0.mixer.conv1d.bias" in sd, bias="layers.0.mixer.in_proj.bias" in sd,
                  tie_embeddings=True, pad_vocab_size_multiple=8 if emb.shape[0] % 8 == 0 else 1,
                  ssm_layer="mamba1", residual_in_fp32=True, pretrained=None)
    return sd, fields


def projector_state(proj: dict, arch: str | None, ckpt: Path, cfg_file="config.json") -> tuple[dict, str, int]:
    """The projector's state dict under Projector's names, its kind and depth."""
    sd = {}
    for k, v in proj.items():
        parts = k.split(".") if isinstance(k, str) else []
        if k in ("projector.weight", "projector.bias"):  # Prismatic's LinearProjector: one nn.Linear
            raise ConversionError(f"{ckpt}: projector tensor {k!r} is a linear projector's (one layer): only the "
                                  f"gelu-mlp and fused-gelu-mlp projectors are supported")
        if len(parts) != 3 or parts[0] != "projector" or parts[2] not in ("weight", "bias"):
            raise ConversionError(f"{ckpt}: projector tensor {k!r} is not projector.<i>.weight|bias (the "
                                  f"gelu-mlp and fused-gelu-mlp projectors; linear and LDP are not supported)")
        sd[f"mlp.{_index(k, parts[1], 'projector', ckpt)}.{parts[2]}"] = v
    _tensors(proj, "projector", ckpt)
    idx = sorted({int(k.split(".")[1]) for k in sd})
    found = {(0, 2): "gelu-mlp", (0, 2, 4): "fused-gelu-mlp"}.get(tuple(idx))
    if found is None:
        raise ConversionError(f"{ckpt}: projector layers {idx}: only gelu-mlp (0, 2) and fused-gelu-mlp (0, 2, 4) "
                              f"are supported")
    if arch is not None:
        base = arch.split("+")[-1]
        if base not in PROJECTORS:
            raise ConversionError(f"{cfg_file}: arch_specifier {arch!r}: supported are {', '.join(PROJECTORS)} "
                                  f"(optionally after 'no-align+')")
        if base != found:
            raise ConversionError(f"{ckpt}: {cfg_file} says {arch!r} but the projector's layers are {found}'s")
    kind, depth = PROJECTORS[found]
    return sd, kind, depth


# ------------------------------------------------------------------------------------------- converting

def cobra_config(run: CobraRun, base: ModelConfig | None, lm_fields: dict, kind: str, depth: int,
                 vision_weights: str | None, dino_weights: str | None, overrides=()) -> ModelConfig:
    """The EmmaMamba config of a Cobra model: ``base``'s vision section (else the vision_backbone_id's) with
    ``overrides`` (KEY=VALUE items), the checkpoint's LM and projector, Cobra's prompt layout and resize, no MFF /
    instruction fusion / alignment."""
    cfg_file = run.config_file
    backbone = run.field("vision_backbone_id", "dinosiglip-vit-so-384px")
    strategy = run.field("image_resize_strategy", "resize-naive")
    llm_id = run.field("llm_backbone_id", "mamba-2.8b-zephyr")
    if not llm_id.endswith("zephyr"):
        raise ConversionError(f"{cfg_file}: llm_backbone_id {llm_id!r}: Cobra prompts LMs other than the Zephyr "
                              f"chat models with its plain 'In: ... Out:' format, which this package does not "
                              f"build; the Zephyr-based models (mamba-2.8b-zephyr: the released cobra+3b) convert")
    if strategy not in RESIZE:
        raise ConversionError(f"{cfg_file}: image_resize_strategy {strategy!r}; supported: {', '.join(RESIZE)}")
    if base is None:
        if backbone not in VISION_BACKBONES:
            raise ConversionError(f"{cfg_file}: vision_backbone_id {backbone!r}; supported: "
                                  f"{', '.join(VISION_BACKBONES)} (or give --config with a vision section)")
        cfg = get_preset("cobra-3b")
        model_name, tag, timm_model, timm_kwargs = VISION_BACKBONES[backbone]
        second = (SecondEncoderConfig(timm_model=timm_model, timm_kwargs=dict(timm_kwargs), taps=[-2])
                  if timm_model else SecondEncoderConfig())
        cfg.vision = VisionConfig(model_name=model_name, preprocess_tag=tag, taps=[-2], second_encoder=second)
    else:
        cfg = base
        if len(cfg.vision.taps) != 1:
            log.warning("--config: vision.taps %s -> [%d] (Cobra reads one layer)", cfg.vision.taps,
                        cfg.vision.taps[-1])
            cfg.vision.taps = cfg.vision.taps[-1:]
            if cfg.vision.second_encoder.timm_model:
                cfg.vision.second_encoder.taps = cfg.vision.second_encoder.taps[-1:]
    for item in overrides:  # the rest of the config is the checkpoint's; these come from flags or Cobra
        key = item.partition("=")[0]
        if not key.startswith("vision.") or key in OWN_KEYS:
            raise ConversionError(f"--override {item!r}: only vision settings may be overridden (the LM, projector, "
                                  f"fusion and alignment come from the checkpoint; {', '.join(OWN_KEYS)} from "
                                  f"Cobra's run and the weight flags)")
    apply_dotted_overrides(cfg, overrides)
    dual = cfg.vision.second_encoder.timm_model is not None
    if dino_weights and not dual:
        raise ConversionError(f"--dino-weights given but {backbone} has no DINOv2 tower")
    cfg.name = f"cobra ({run.config.get('model_id', run.checkpoint.name)})"
    cfg.vision.pretrained = str(Path(vision_weights).resolve()) if vision_weights else None
    if dual:
        cfg.vision.second_encoder.pretrained = str(Path(dino_weights).resolve()) if dino_weights else None
    cfg.vision.image_resize = RESIZE[strategy]
    cfg.vision.image_position = "before_turn"
    cfg.mff.mode = "none"
    cfg.instruction.enabled = False
    cfg.align.enabled = False
    cfg.projector.kind, cfg.projector.depth, cfg.projector.hidden_dim = kind, depth, None
    for k, v in lm_fields.items():
        setattr(cfg.lm, k, v)
    cfg.lm.tokenizer = None  # the shipped GPT-NeoX-20B tokenizer (mamba-2.8b-zephyr's)
    return cfg.validate()


def convert_cobra(checkpoint: str | Path, out: str | Path, *, vision_weights: str | None = None,
                  dino_weights: str | None = None, random_vision: bool = False, base: ModelConfig | None = None,
                  overrides=(), dtype: str = "fp32") -> Path:
    """Convert a Cobra run directory (or .pt file) into an EmmaMamba checkpoint directory ``out``."""
    from emma_mamba.export import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory; give a new one")
    for flag, f in (("--vision-weights", vision_weights), ("--dino-weights", dino_weights)):
        if f is not None and Path(f).is_dir():
            raise FileNotFoundError(f"{flag} {f} is a directory; give the weight file in it")
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"{flag} {f}: no such file")
    if random_vision and (vision_weights or dino_weights):
        raise ValueError("--random-vision and --vision-weights / --dino-weights exclude each other")
    staging = out.with_name(out.name + ".converting")
    try:  # before minutes of reading: the output location must be writable
        out.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as e:
        raise OSError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        _convert_into(staging, checkpoint, vision_weights, dino_weights, random_vision, base, overrides, dtype)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    finally:
        if staging.exists():  # a failure: nothing half-written is left behind
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _convert_into(out: Path, checkpoint, vision_weights, dino_weights, random_vision, base, overrides,
                  dtype: str) -> None:
    from emma_mamba.export import write_model_dir
    from emma_mamba.models.mamba import _check_state_dict
    from emma_mamba.models.vlm import EmmaMamba

    run = read_cobra(checkpoint)
    ckpt, model_sd = run.checkpoint, run.modules
    arch = run.config.get("arch_specifier")
    if arch is not None and not isinstance(arch, str):
        raise ConversionError(f"{run.config_file}: model.arch_specifier must be a string, got {arch!r}")
    lm_sd, lm_fields = lm_state_and_config(model_sd["llm_backbone"], ckpt)
    proj_sd, kind, depth = projector_state(model_sd["projector"], arch, ckpt, run.config_file)
    cfg = cobra_config(run, base, lm_fields, kind, depth, vision_weights, dino_weights, overrides)
    dual = cfg.vision.second_encoder.timm_model is not None
    if not random_vision and (cfg.vision.pretrained is None or (dual and cfg.vision.second_encoder.pretrained is None)):
        need = "--vision-weights and --dino-weights" if dual else "--vision-weights"
        raise ConversionError(f"{ckpt}: a Cobra checkpoint holds no vision weights (its towers are frozen timm "
                              f"models); give {need} (local files), or --random-vision for a model that sees "
                              f"noise (smoke tests, latency benchmarks)")

    _finite(model_sd["projector"], "projector", ckpt)  # after the cheap checks: this reads every weight
    _finite(model_sd["llm_backbone"], "llm_backbone", ckpt)
    model = EmmaMamba(cfg, for_training=False, load_pretrained=True, _lm_device="meta")
    width, width2 = model.vision.width, (model.vision.second.embed_dim if dual else 0)
    w0 = proj_sd["mlp.0.weight"]
    if w0.shape[1] != width:
        split = f" ({width - width2} + {width2})" if dual else ""
        raise ConversionError(f"{ckpt}: projector.projector.0.weight takes {w0.shape[1]} features but the vision "
                              f"towers of {cfg.name} give {width}{split}")
    if dual:  # Prismatic: cat([dino, siglip]); ours: cat([open_clip tower, second encoder])
        proj_sd["mlp.0.weight"] = torch.cat([w0[:, width2:], w0[:, :width2]], dim=1)
    _check_state_dict(lm_sd, model.lm.state_dict(), ckpt, "Cobra llm_backbone", {})
    pexp = model.projector.state_dict()
    if set(proj_sd) != set(pexp) or any(tuple(proj_sd[k].shape) != tuple(pexp[k].shape) for k in pexp):
        got = {k: tuple(v.shape) for k, v in proj_sd.items()}
        raise ConversionError(f"{ckpt}: projector shapes {got} do not fit the LM width {cfg.lm.d_model} "
                              f"(expected {({k: tuple(v.shape) for k, v in pexp.items()})})")
    model.lm.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in lm_sd.items()}, strict=False,
                             assign=True)
    model.projector.load_state_dict({k: v.float() for k, v in proj_sd.items()})
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise ConversionError(f"{ckpt}: {len(meta)} LM tensors are not in the checkpoint: {meta[:8]}")

    try:
        write_model_dir(model, out, model.state_dict(), dtype, {"converted_from": str(ckpt.resolve()),
                                                                "source": "cobra"})
    except ValueError as e:  # a weight the storage dtype cannot hold
        raise ConversionError(f"{ckpt}: {e}") from None


def run(args: argparse.Namespace) -> int:
    try:
        out = convert_cobra(args.checkpoint, args.out, vision_weights=args.vision_weights,
                            dino_weights=args.dino_weights, random_vision=args.random_vision,
                            base=load_config(args.config) if args.config else None, overrides=args.override,
                            dtype=args.dtype)
    except (ConversionError, ConfigError, OSError, ValueError) as e:
        print(f"emma-mamba convert cobra: {e}", file=sys.stderr)
        return 2
    from emma_mamba.config import load_config as _load

    cfg = _load(out / "config.yaml")
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.dtype}): LM {cfg.lm.d_model} x {cfg.lm.n_layer}, projector "
          f"{cfg.projector.kind}, vision {cfg.vision.model_name}"
          f"{' + ' + cfg.vision.second_encoder.timm_model if cfg.vision.second_encoder.timm_model else ''}"
          f"{' (random weights)' if args.random_vision else ''}; prompts put the image before the user turn")
    return 0
