"""Model configuration: dataclasses, named presets, strict YAML overrides.

One dataclass per component, one docstring line per field (the torchtitan convention), all plain data so a
resolved config can be written next to every checkpoint and read back bit-for-bit.

Presets (``get_preset(name)``):

- ``tiny``: a 3-block 32-px open_clip ViT and a 2-layer, 64-wide Mamba LM. Builds and runs a forward/backward
  on a CPU in well under a second; used by the tests.
- ``emma-mamba-2.8b``: the ``mamba-2.8b-zephyr`` LM dimensions (d_model 2560, 64 layers, vocab 50280) with the
  OpenAI CLIP ``ViT-L-14-336`` encoder (QuickGELU, as the OpenAI weights were trained), four taps at 1/4, 1/2,
  3/4 depth and the penultimate block, cross-attention MFF, instruction fusion and the pixel alignment head.
  CLIP rather than SigLIP because instruction fusion needs the encoder's own text tower and tokenizer, and
  CLIP's BPE tokenizer ships inside open_clip (SigLIP's is an HF hub download).
- ``emma-mamba-2.8b-dinosiglip``: the same LM, MFF, instruction fusion and alignment head over the vision front
  of Cobra and the EMMA-Mamba paper: SigLIP so400m/14-384 and DINOv2 ViT-L/14 (4 registers) at 384 px, their
  patch tokens concatenated channel-wise at four taps each (``vision.second_encoder``). Instruction fusion uses
  SigLIP's text tower, whose HF tokenizer must be a local directory (``instruction.tokenizer``).
- ``cobra-like``: the same encoder and LM with no MFF (penultimate layer only), no instruction fusion and no
  alignment head: the Cobra / LLaVA baseline.

YAML files are *overrides*: an optional top-level ``preset: NAME`` picks the starting point (default ``tiny``),
every other key must name an existing field. Loading is strict: an unknown key is an error naming the key,
its dotted path, the file and the valid keys; a value of the wrong type is an error naming the field, the
expected type and what was given; a float that is not finite (``.nan``, ``.inf``) is an error naming the field.
A model config inside another (a run config's ``model:`` section, ``--model.*`` options) names its fields by
their full path there (``model.lm.d_model``). Nothing here imports torch, so configs load instantly.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

__all__ = [
    "VisionConfig", "SecondEncoderConfig", "MFFConfig", "InstructionConfig", "ProjectorConfig", "LMConfig",
    "AlignConfig", "ModelConfig", "ConfigError", "PRESETS", "get_preset", "load_config", "apply_overrides",
    "apply_dotted_overrides", "parse_cli_value",
    "config_to_dict", "config_from_dict", "save_config", "shipped_config_dir", "shipped_configs",
    "resolve_config_path", "yaml_float",
]


class ConfigError(ValueError):
    """A user-facing configuration error (bad key, bad type, bad value); the message names the field."""


@dataclass
class SecondEncoderConfig:
    timm_model: str | None = None
    """timm ViT whose patch tokens are concatenated channel-wise with the open_clip tower's at every tap (the
    dual encoder of Prismatic / Cobra / the EMMA-Mamba paper: DINOv2 'vit_large_patch14_reg4_dinov2' beside
    SigLIP); None = the open_clip tower alone. Built by timm.create_model without a download."""
    pretrained: str | None = None
    """Local timm checkpoint file (.safetensors, .bin, .pth) loaded at build time, position embeddings resampled
    by timm when its resolution differs (DINOv2's 518 px weights at 384 px); None = random init."""
    timm_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of timm.create_model (e.g. img_size: 384; a tiny depth/embed_dim for tests). The image
    size and patch grid must equal the open_clip tower's."""
    taps: list[int] = field(default_factory=lambda: [-2])
    """Block indices of this encoder (negative counts from the end), one per vision.taps entry: the k-th
    smallest of each list are concatenated."""
    mean: list[float] | None = None
    """Per-channel normalisation mean of this encoder's input; None = timm's pretrained config of the model
    (ImageNet's for DINOv2). The image is resized once, by the open_clip tower's transform, and re-normalised."""
    std: list[float] | None = None
    """Per-channel normalisation std; None = timm's pretrained config of the model."""


@dataclass
class VisionConfig:
    model_name: str = "ViT-L-14-336-quickgelu"
    """open_clip model name (a built-in architecture: ViT-L-14-336-quickgelu, ViT-SO400M-14-SigLIP-384, ...)."""
    pretrained: str | None = None
    """Local open_clip checkpoint file loaded at build time; None = random init. Never a download tag."""
    preprocess_tag: str | None = None
    """open_clip pretrained tag whose preprocessing (mean/std/interpolation/resize) to use, e.g. 'openai' or
    'webli'; read from open_clip's registry, nothing is downloaded. None = open_clip's defaults for the model."""
    open_clip_overrides: dict = field(default_factory=dict)
    """Deep-merged into open_clip's model config before building (e.g. a tiny vision_cfg/text_cfg)."""
    image_resize: Literal["default", "crop", "squash", "letterbox"] = "default"
    """How an image becomes the encoder's square input: 'default' = the encoder's own preprocessing (the
    preprocess_tag's, e.g. CLIP's resize + center crop, SigLIP's squash); 'crop' = resize the shorter side, crop
    the center; 'squash' = resize both sides (Prismatic/Cobra's resize-naive); 'letterbox' = pad to a square with
    the mean colour first, keeping the whole image undistorted (LLaVA-1.5's image_aspect_ratio 'pad')."""
    image_position: Literal["in_turn", "before_turn"] = "in_turn"
    """Where an image's visual tokens sit in the chat prompt, in training and at inference alike. in_turn: at its
    placeholder inside the user turn (LLaVA's ``<|user|>\n<image>\n{question}``); before_turn: before the turn's
    user marker (``<image><|user|>\n{question}``: Cobra's and the EMMA-Mamba authors' layout, the visual tokens
    ahead of the whole prompt)."""
    taps: list[int] = field(default_factory=lambda: [-2])
    """ViT block indices whose patch tokens feed MFF (negative counts from the end); the last is the main tap."""
    freeze: bool = True
    """Keep the ViT frozen (no grad, eval mode even under model.train()); also the second encoder."""
    second_encoder: SecondEncoderConfig = field(default_factory=SecondEncoderConfig)
    """An optional second (timm) ViT fused channel-wise with this one at every tap (dual encoder)."""


@dataclass
class MFFConfig:
    mode: Literal["none", "weighted", "concat", "cross_attn"] = "weighted"
    """Multi-scale feature fusion over the taps: none (last tap only), softmax-weighted sum, channel concat +
    linear, or cross-attention from the last tap to the others."""
    num_heads: int = 8
    """Attention heads of the cross_attn mode (must divide the ViT width)."""


@dataclass
class InstructionConfig:
    enabled: bool = False
    """Instruction-aware fusion: mix the encoder's text-tower features of the instruction into the visual tokens."""
    tokenizer: str | None = None
    """Local directory of the text tower's HF tokenizer (needed by SigLIP towers offline); None = open_clip's
    own (bundled with open_clip for the CLIP ViTs; the HF cache for SigLIP). Never downloaded."""
    text_layer: int = -1
    """Text-tower block whose token features are used (-1 = last); the tower's final LayerNorm is applied.
    Instructions are cut to the tower's own context length (open_clip's text_cfg.context_length, 77 for CLIP)."""


@dataclass
class ProjectorConfig:
    depth: int = 2
    """Linear layers of the GELU MLP from the ViT width to the LM width (2 or 3)."""
    hidden_dim: int | None = None
    """Hidden width of the MLP; None = the LM width (kind fused: 4 x the vision width)."""
    kind: Literal["mlp", "fused"] = "mlp"
    """mlp: Linear, GELU[, Linear, GELU], Linear, every hidden layer hidden_dim wide (LLaVA-1.5's for depth 2).
    fused: Prismatic's fused-GELU MLP, the projector of Cobra and of the EMMA-Mamba authors' code: Linear
    (vision width -> hidden_dim, default 4 x vision width), GELU, Linear (-> LM width), GELU, Linear (LM width ->
    LM width); depth must be 3."""


@dataclass
class LMConfig:
    d_model: int = 2560
    """Residual width of the Mamba LM."""
    n_layer: int = 64
    """Number of Mamba blocks."""
    vocab_size: int = 50280
    """Vocabulary size before padding (GPT-NeoX-20B tokenizer: 50277 tokens + room for added ones)."""
    d_state: int = 16
    """SSM state size N."""
    d_conv: int = 4
    """Causal depthwise conv width."""
    expand: int = 2
    """d_inner = expand * d_model."""
    dt_rank: int | Literal["auto"] = "auto"
    """Rank of the delta projection; 'auto' = ceil(d_model / 16)."""
    conv_bias: bool = True
    """Bias in the causal conv1d."""
    bias: bool = False
    """Bias in in_proj/out_proj."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    residual_in_fp32: bool = True
    """Keep the residual stream in fp32 under low-precision weights."""
    pad_vocab_size_multiple: int = 8
    """Embedding rows are padded to a multiple of this."""
    tie_embeddings: bool = True
    """LM head shares the embedding matrix."""
    initializer_range: float = 0.02
    """Std of the token-embedding init of a from-scratch LM (mamba-ssm's 0.02; transformers' MambaConfig uses
    0.1). Small LMs need the larger value: at d_model 64 with 0.02 the embeddings are drowned by the blocks'
    outputs in the residual stream, and a 2-block LM stayed at chance (50 %) on a symbolic "is X among these
    tokens?" task after 2000 AdamW steps, where 0.1 reached 93 % at 1000 and 98 % at 2000
    (benchmarks/recall_probe.py; tests/models/test_mamba_lm.py keeps this check)."""
    ssm_layer: Literal["mamba1", "mamba2"] = "mamba1"
    """The mixer: "mamba1" (mamba-*, mamba-2.8b-zephyr) or "mamba2" (the state-spaces/mamba2-* models: per-head
    scalar A and dt, B/C in groups, a gated RMSNorm; run on the same selective-scan kernels). A Mamba-2 LM
    uses d_state 128, headdim 64, ngroups 1 and pad_vocab_size_multiple 16 in the public checkpoints."""
    headdim: int = 64
    """Mamba-2 only: channels per head (d_inner must be a multiple)."""
    ngroups: int = 1
    """Mamba-2 only: groups of heads sharing B and C."""
    pretrained: str | None = None
    """Local Mamba checkpoint directory (state-spaces or *-hf layout) loaded at build time; None = random init."""
    tokenizer: str | None = None
    """Tokenizer file/directory; None = the GPT-NeoX-20B tokenizer shipped with the package."""


@dataclass
class AlignConfig:
    enabled: bool = False
    """Build the pixel-wise autoregressive alignment head (training only; dropped at inference load)."""
    loss_weight: float = 0.1
    """Weight of the pixel loss in total = lm + loss_weight * align."""
    lm_layers: list[int] = field(default_factory=lambda: [-1])
    """LM hidden-state indices fused as the head's input (0 = embeddings, -1 = after the last block)."""
    d_model: int = 512
    """Width of the small causal decoder."""
    n_layer: int = 2
    """Causal transformer blocks in the decoder."""
    num_heads: int = 8
    """Attention heads of the decoder."""
    norm_pix: bool = True
    """MAE-style per-patch mean/variance normalisation of the pixel targets."""


CHAT_TEMPLATE = "<|user|>\n{prompt}<|endoftext|>\n<|assistant|>\n"
"""mamba-2.8b-zephyr's chat format (Zephyr's, with GPT-NeoX's end-of-text token)."""

TURN_END = "<|endoftext|>"
"""Ends every assistant answer (the model learns to emit it: generation's EOS)."""

TURN_SEP = "\n"
"""Between an answer's TURN_END and the next user turn."""


@dataclass
class ChatConfig:
    """The chat format the model was trained with, which inference (generate, chat, serve, eval) prompts it with.
    Training takes it from ``data.prompt_template`` / ``turn_end`` / ``turn_sep`` and writes it into the model it
    saves."""

    prompt_template: str = CHAT_TEMPLATE
    """One user turn; ``{prompt}`` is the user's text (the image placeholders included)."""
    turn_end: str = TURN_END
    """Ends every answer; generation stops at it (the EOS token by default, a stop string otherwise)."""
    turn_sep: str = TURN_SEP
    """Between an answer's turn_end and the next user turn."""


def check_prompt_template(template: str, where: str) -> None:
    """A chat template holds ``{prompt}`` and no other format field; ConfigError naming ``where`` otherwise."""
    if "{prompt}" not in template:
        raise ConfigError(f"{where} must contain '{{prompt}}', got {template!r}")
    sentinel = "\x00prompt\x00"
    try:
        filled = template.format(prompt=sentinel)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where} may hold only the field {{prompt}} (write other braces as {{{{ and }}}}), got "
                          f"{template!r}: {type(e).__name__} {e}") from None
    if sentinel not in filled:  # "{{prompt}}": an escaped brace pair, the literal text {prompt}, not the field
        raise ConfigError(f"{where} must contain the field '{{prompt}}' (its braces not doubled), got {template!r}")


@dataclass
class ModelConfig:
    name: str = "custom"
    """Preset this config started from (informational)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """open_clip vision encoder and its taps."""
    mff: MFFConfig = field(default_factory=MFFConfig)
    """Multi-scale feature fusion."""
    instruction: InstructionConfig = field(default_factory=InstructionConfig)
    """Instruction-aware fusion."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Vision-to-LM projector."""
    lm: LMConfig = field(default_factory=LMConfig)
    """Mamba language model."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """Pixel-wise autoregressive alignment head."""
    image_token: str = "<image>"
    """Placeholder string in the text, replaced by one image's visual tokens."""
    chat: ChatConfig = field(default_factory=ChatConfig)
    """The chat format it was trained with (written by training from data.prompt_template / turn_end / turn_sep)."""

    def validate(self, path: str = "") -> "ModelConfig":
        """Checks every float is finite and the cross-field constraints; returns self. Raises ConfigError naming
        the field by its full dotted path: ``path`` is where this config sits in what the user wrote (``model``
        for a run config's model section or the command line's ``--model.*`` keys), '' for a model file."""
        def k(key: str) -> str:  # a field as the user wrote it
            return f"{path}.{key}" if path else key

        check_field_types(self, path)
        check_prompt_template(self.chat.prompt_template, k("chat.prompt_template"))
        if not self.chat.turn_end:
            raise ConfigError(f"{k('chat.turn_end')} must not be empty: generation stops at it")
        for key, v in float_fields(self):  # NaN passes every comparison below (nan < 0 is False): refuse it first
            if not math.isfinite(v):
                raise ConfigError(f"{k(key)} must be a finite number, got {v}")
        if not self.vision.taps:
            raise ConfigError(f"{k('vision.taps')}: at least one ViT block index is needed")
        if len(set(self.vision.taps)) != len(self.vision.taps):
            raise ConfigError(f"{k('vision.taps')}: duplicate block indices in {self.vision.taps}")
        if self.mff.mode == "none" and len(self.vision.taps) != 1:
            raise ConfigError(f"{k('mff.mode')} 'none' uses a single tap, but {k('vision.taps')} has "
                              f"{len(self.vision.taps)}: {self.vision.taps} (use e.g. [-2], or pick an MFF mode)")
        self._validate_second_encoder(k)
        if self.mff.num_heads < 1:
            raise ConfigError(f"{k('mff.num_heads')} must be >= 1, got {self.mff.num_heads}")
        if self.projector.depth not in (2, 3):
            raise ConfigError(f"{k('projector.depth')} must be 2 or 3, got {self.projector.depth}")
        if self.projector.kind == "fused" and self.projector.depth != 3:
            raise ConfigError(f"{k('projector.kind')} fused has 3 layers: set {k('projector.depth')} 3, got "
                              f"{self.projector.depth}")
        if self.align.loss_weight < 0:
            raise ConfigError(f"{k('align.loss_weight')} must be >= 0, got {self.align.loss_weight}")
        if self.align.enabled and not self.align.lm_layers:
            raise ConfigError(f"{k('align.lm_layers')}: at least one LM layer index is needed when "
                              f"{k('align.enabled')}")
        for name, low in (("num_heads", 1), ("d_model", 1), ("n_layer", 0)):
            if getattr(self.align, name) < low:
                raise ConfigError(f"{k('align.' + name)} must be >= {low}, got {getattr(self.align, name)}")
        if self.projector.hidden_dim is not None and self.projector.hidden_dim < 1:
            raise ConfigError(f"{k('projector.hidden_dim')} must be >= 1 (or null), got {self.projector.hidden_dim}")
        if self.align.d_model % self.align.num_heads:
            raise ConfigError(f"{k('align.d_model')} ({self.align.d_model}) must be divisible by "
                              f"{k('align.num_heads')} ({self.align.num_heads})")
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"):
            if getattr(self.lm, name) < 1:
                raise ConfigError(f"{k('lm.' + name)} must be >= 1, got {getattr(self.lm, name)}")
        if not self.image_token:
            raise ConfigError(f"{k('image_token')} must be a non-empty string")
        return self

    def _validate_second_encoder(self, k) -> None:
        se = self.vision.second_encoder
        where = k("vision.second_encoder")
        if se.timm_model is None:
            set_fields = [f for f in ("pretrained", "mean", "std") if getattr(se, f) is not None]
            set_fields += ["timm_kwargs"] if se.timm_kwargs else []
            set_fields += ["taps"] if se.taps != SecondEncoderConfig().taps else []
            if set_fields:
                raise ConfigError(f"{where}: {', '.join(set_fields)} set but timm_model is null (name "
                                  f"the timm ViT, e.g. vit_large_patch14_reg4_dinov2, or remove them)")
            return
        if len(se.taps) != len(self.vision.taps):
            raise ConfigError(f"{where}.taps: {se.taps} has {len(se.taps)} block indices but "
                              f"{k('vision.taps')} {self.vision.taps} has {len(self.vision.taps)}; the taps are fused "
                              f"pairwise, one of each encoder")
        if len(set(se.taps)) != len(se.taps):
            raise ConfigError(f"{where}.taps: duplicate block indices in {se.taps}")
        for name in ("mean", "std"):
            v = getattr(se, name)
            if v is not None and len(v) != 3:
                raise ConfigError(f"{where}.{name}: expected 3 values (R, G, B), got {v}")
        if se.std is not None and min(se.std) <= 0:
            raise ConfigError(f"{where}.std: every value must be > 0, got {se.std}")
        for key in ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
            if key in se.timm_kwargs:
                raise ConfigError(f"{where}.timm_kwargs: {key!r} is not allowed (weights come only "
                                  f"from {where}.pretrained, a local file)")


def float_fields(obj, prefix: str = ""):
    """(dotted key, value) of every float in a config dataclass: nested sections, lists (``key[i]``) and dicts
    (free-form mappings such as ``vision.open_clip_overrides``) included."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from float_fields(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, dict):
        for key, v in obj.items():
            yield from float_fields(v, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from float_fields(v, f"{prefix}[{i}]")
    elif isinstance(obj, float):
        yield prefix, obj


# --------------------------------------------------------------------------------------------------- presets

def _tiny() -> ModelConfig:
    # A custom open_clip CLIP: 32x32 images, 8x8 patches (a 4x4 grid = 16 visual tokens), 3 blocks of width 32,
    # a 2-block text tower of width 32. Built from open_clip's ViT-B-16 config with the sizes overridden.
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(
            model_name="ViT-B-16",
            open_clip_overrides={
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
                "text_cfg": {"context_length": 24, "width": 32, "heads": 2, "layers": 2},
            },
            taps=[0, 1],
        ),
        mff=MFFConfig(mode="weighted", num_heads=2),
        instruction=InstructionConfig(enabled=True),
        projector=ProjectorConfig(depth=2),
        lm=LMConfig(d_model=64, n_layer=2, vocab_size=50280, d_state=8, initializer_range=0.1),
        align=AlignConfig(enabled=True, loss_weight=1.0, lm_layers=[-1, -2], d_model=32, n_layer=1, num_heads=2),
    )


def _emma_mamba_2p8b() -> ModelConfig:
    # ViT-L/14-336 has 24 blocks: taps at 1/4, 1/2, 3/4 depth (outputs of blocks 6, 12, 18, 1-based) and the
    # penultimate block (-2, the LLaVA/Cobra feature layer).
    return ModelConfig(
        name="emma-mamba-2.8b",
        vision=VisionConfig(model_name="ViT-L-14-336-quickgelu", preprocess_tag="openai", taps=[5, 11, 17, -2]),
        mff=MFFConfig(mode="cross_attn", num_heads=8),
        instruction=InstructionConfig(enabled=True),
        projector=ProjectorConfig(depth=2),
        lm=LMConfig(d_model=2560, n_layer=64, vocab_size=50280),
        align=AlignConfig(enabled=True, loss_weight=0.1, lm_layers=[-1], d_model=512, n_layer=2, num_heads=8),
    )


def _emma_mamba_2p8b_dinosiglip() -> ModelConfig:
    # The paper's (and Cobra's / Prismatic's) vision front: SigLIP so400m/14 at 384 px (27 blocks, width 1152)
    # with DINOv2 ViT-L/14 + 4 registers (24 blocks, width 1024) at the same 384 px, 27 x 27 = 729 patches each,
    # concatenated channel-wise (2176) at every tap: 1/4, 1/2, 3/4 depth and the penultimate block of each.
    # SigLIP's text tower feeds instruction fusion; its tokenizer must be a local directory (instruction.tokenizer).
    cfg = _emma_mamba_2p8b()
    cfg.name = "emma-mamba-2.8b-dinosiglip"
    cfg.vision = VisionConfig(
        model_name="ViT-SO400M-14-SigLIP-384", preprocess_tag="webli", taps=[6, 13, 19, -2],
        second_encoder=SecondEncoderConfig(timm_model="vit_large_patch14_reg4_dinov2",
                                           timm_kwargs={"img_size": 384}, taps=[5, 11, 17, -2]))
    return cfg


def _cobra_like() -> ModelConfig:
    cfg = _emma_mamba_2p8b()
    cfg.name = "cobra-like"
    cfg.vision.taps = [-2]
    cfg.mff = MFFConfig(mode="none")
    cfg.instruction = InstructionConfig(enabled=False)
    cfg.align = AlignConfig(enabled=False)
    return cfg


def _cobra_3b() -> ModelConfig:
    # Cobra (Zhao et al. 2024) as released (han1997/cobra, cobra+3b): Prismatic's dinosiglip-vit-so-384px front
    # (the penultimate block of each tower), its fused-GELU projector, mamba-2.8b-zephyr, the image before the
    # whole Zephyr prompt, images squashed to 384 px (resize-naive). `emma-mamba convert cobra` writes its weights.
    cfg = _emma_mamba_2p8b_dinosiglip()
    cfg.name = "cobra-3b"
    cfg.vision.taps, cfg.vision.second_encoder.taps = [-2], [-2]
    cfg.vision.image_resize, cfg.vision.image_position = "squash", "before_turn"
    cfg.mff = MFFConfig(mode="none")
    cfg.instruction = InstructionConfig(enabled=False)
    cfg.align = AlignConfig(enabled=False)
    cfg.projector = ProjectorConfig(kind="fused", depth=3)
    return cfg


def _emma_mamba2_2p7b() -> ModelConfig:
    # the EMMA front (ViT-L/14-336 taps, MFF, instruction fusion, alignment head) on a Mamba-2 LM of the
    # state-spaces/mamba2-2.7b shape (lm.pretrained: a local copy of it; d_state 128, 80 heads of 64 channels)
    cfg = _emma_mamba_2p8b()
    cfg.name = "emma-mamba2-2.7b"
    cfg.lm = LMConfig(d_model=2560, n_layer=64, vocab_size=50280, ssm_layer="mamba2", d_state=128, headdim=64,
                      ngroups=1, pad_vocab_size_multiple=16)
    return cfg


PRESETS = {"tiny": _tiny, "emma-mamba-2.8b": _emma_mamba_2p8b,
           "emma-mamba-2.8b-dinosiglip": _emma_mamba_2p8b_dinosiglip, "cobra-like": _cobra_like, "cobra-3b": _cobra_3b,
           "emma-mamba2-2.7b": _emma_mamba2_2p7b}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


# ------------------------------------------------------------------------------------- strict (de)serialising

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(arg)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """Returns ``value`` checked against (and minimally converted to) type ``tp``; raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
    elif origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        value = yaml_float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    hint = ""
    if value is None:  # `key:` with nothing after it, or `key: null`, in YAML
        hint = " (the value is empty: YAML reads an empty value as null)"
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and takes_text(tp):
        hint = f" (YAML read it as a number: write it in quotes, '{value}', to mean the text)"
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


_EXPONENT_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+")


def yaml_float(value):
    """``value`` as a float when it is text in exponent notation (``1e-3``, ``1.0e3``), which YAML 1.2, JSON,
    Python and the command line read as a number but PyYAML's YAML 1.1 keeps as text (its floats need a dot
    and a signed exponent); anything else is returned unchanged."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def apply_overrides(cfg, overrides: dict, *, path: str = "", source: str = "<dict>"):
    """Applies a nested dict of overrides to dataclass ``cfg`` in place and returns it.

    Every key must be a field of the dataclass at that level; nested dataclasses take nested dicts.
    ``source`` (a file name) and ``path`` (the dotted prefix) only shape error messages.
    """
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: {path or '<top level>'} must be a mapping, got {type(overrides).__name__}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r} at {where!r}{hint}; valid keys"
                              f"{' of ' + repr(path) if path else ''}: {', '.join(fields)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            apply_overrides(current, value, path=where, source=source)
        else:
            try:
                setattr(cfg, key, _coerce(value, hints[key], where))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def check_field_types(cfg, path: str = "") -> None:
    """Checks every field of dataclass ``cfg`` (nested ones too) against its annotation, as :func:`apply_overrides`
    checks a value from a file, so a config built or edited in code meets the same rules (a Literal field set to
    another word trained with the default, or was refused only when the saved model was loaded); raises
    ConfigError naming the field by its dotted path (``path`` its prefix)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, where = getattr(cfg, f.name), f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            check_field_types(value, where)
        else:
            setattr(cfg, f.name, _coerce(value, hints[f.name], where))


def field_type(cls, dotted: str):
    """The annotated type of a dotted field of config dataclass ``cls`` (``lm.pretrained``); None if unknown."""
    tp = None
    for part in dotted.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        tp = hints[part]
        cls = tp if dataclasses.is_dataclass(tp) else None
    return tp


def takes_text(tp) -> bool:
    """Whether type ``tp`` accepts any string (str, str | None): not a Literal choice, a number or a list."""
    if tp is str:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)


def parse_cli_value(text: str, field=None, *, strict: bool = False):
    """A command-line value: a YAML scalar or flow collection, '2e-5' (a string to YAML 1.1) a float. A value for
    a field of type ``field`` that takes text (a path, a name: :func:`takes_text`) stays the text typed
    (``--output_dir 2024`` is the folder '2024'; null / ~ still mean None). Text YAML cannot parse stays text, or
    with ``strict`` is a ConfigError."""
    import yaml

    if takes_text(field):
        # the text as typed: YAML would fold its newlines into spaces, strip the spaces around it and cut it at
        # ' #' (a comment); only null / ~ (None) and a quoted string (the text inside the quotes) are read
        word = text.strip()
        if word in ("", "~", "null", "Null", "NULL"):
            # '' stays '' for a field that must hold text (its own check names it); it clears an optional one
            return text if field is str and not word else None
        if word[:1] in ("'", '"'):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            return value if isinstance(value, str) else text
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if strict:
            raise ConfigError(f"the value {text!r} is not a YAML scalar or collection ({e})") from None
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_dotted_overrides(cfg, items, *, flag: str = "--override"):
    """Applies command-line ``KEY=VALUE`` items (dotted key, value as :func:`parse_cli_value` reads it, e.g.
    ``lm.n_layer=12``) to ``cfg`` in place, strictly (see :func:`apply_overrides`); returns it. A key given
    twice is an error naming both values (applied in turn, the last one would win silently)."""
    seen: dict[str, str] = {}
    for item in items:  # the form and repeats of every item checked before any applies
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE with a dotted key, e.g. lm.n_layer=12")
        if key in seen:
            raise ConfigError(f"{flag}: {key} is given twice, {seen[key]!r} and {value!r}; give it once")
        seen[key] = value
    for item in items:
        key, _, value = item.partition("=")
        nested: dict = {}
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        try:
            cur[parts[-1]] = parse_cli_value(value, field_type(type(cfg), key), strict=True)
        except ConfigError as e:
            raise ConfigError(f"{flag} {item!r}: {e}") from None
        apply_overrides(cfg, nested, source=f"{flag} {item}")
    return cfg


def config_to_dict(cfg) -> dict:
    """Plain nested dict (YAML-safe) of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict, *, source: str = "<dict>", path: str = "", validate: bool = True) -> ModelConfig:
    """Builds a ModelConfig from a dict: ``preset`` (optional, default 'tiny') then strict overrides. ``path``
    is where the dict sits in ``source`` (``model`` for a run config's model section): errors name every key
    by its full dotted path there (``model.lm.d_model``). ``validate=False`` checks keys and types only (for a
    caller that applies more overrides and validates the result)."""
    d = dict(d or {})
    preset = d.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{source}: {path + '.' if path else ''}preset must be a string, got {preset!r}")
    try:
        cfg = get_preset(preset or "tiny")
    except ConfigError as e:  # named by its key in its file
        close = difflib.get_close_matches(str(preset), list(PRESETS), n=1, cutoff=0.6)
        raise ConfigError(f"{source}: {path + '.' if path else ''}preset: {e}"
                          + (f" (did you mean {close[0]!r}?)" if close else "")) from None
    apply_overrides(cfg, d, path=path, source=source)
    if not validate:
        return cfg
    try:
        return cfg.validate(path)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def shipped_config_dir() -> Path | None:
    """The recipes that ship with the package: ``emma_mamba/configs`` of an installed wheel (setup.py installs
    the top-level ``configs/`` there), else ``configs/`` of the source checkout the package runs from."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent / "configs"):
        if (d / "quickstart.yaml").is_file():
            return d
    return None


def shipped_configs() -> dict[str, Path]:
    """Shipped recipe name (file stem, e.g. ``train_tiny_stage1``) -> its file."""
    d = shipped_config_dir()
    return {} if d is None else {p.stem: p for p in sorted(d.glob("*.yaml"))}


def resolve_config_path(path: str | Path, what: str = "config file") -> Path:
    """``path`` when it is a file; otherwise the shipped recipe it names (``configs/NAME.yaml``, ``NAME.yaml`` or
    ``NAME``), so the README's commands also work from any directory with a non-editable install. Anything else
    is a ConfigError naming the path and listing the shipped recipes."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if not p.is_absolute() and p.parent in (Path("."), Path("configs")) and name in shipped:
        import logging

        logging.getLogger("emma_mamba").info("%s: no such file here; using the shipped recipe %s", path, shipped[name])
        return shipped[name]
    listed = ", ".join(shipped) if shipped else "none found"
    raise ConfigError(f"{what} not found: {path} (shipped recipes, usable by name: {listed}; "
                      f"`emma-mamba configs --copy DIR` copies them for editing)")


@functools.lru_cache(maxsize=1)
def _unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently, so
    `lr: 1e-3` further down a file would quietly replace an earlier `lr`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"the key {key!r} is given twice (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (``yaml.safe_load``; an empty file is ``{}``), or a ConfigError
    naming the file: missing, not YAML, or not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the YAML as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).replace('<unicode string>', str(path))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path, validate: bool = True) -> ModelConfig:
    """Reads a model config YAML (``yaml.safe_load``) strictly; see the module docstring."""
    return config_from_dict(read_yaml_mapping(path), source=str(path), validate=validate)


def save_config(cfg: ModelConfig, path: str | Path) -> None:
    """Writes the fully resolved config as YAML (loadable by load_config: every field is spelled out)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
