"""EmmaMamba: the assembled multimodal model (see DESIGN.md, "What the model is").

    pixel_values ─► VisionEncoder (K taps) ─► MultiScaleFusion ─► [InstructionFusion] ─► Projector ─┐
    input_ids ─► embeddings ─► each <image> placeholder replaced by that image's N visual tokens ◄────┘
               ─► MambaLM ─► logits, CE loss
                      └─► hidden states at the visual positions ─► [PixelAlignHead] ─► pixel loss (training)

Conventions:

* One ``<image>`` placeholder token per image, images in order of appearance (row-major over the batch). The
  placeholder is a special token added to the LM tokenizer; its embedding row is never read. A sample whose
  placeholder count differs from its image count is an error naming the sample.
* ``labels`` are aligned with ``input_ids`` (the transformers convention: the model shifts them), -100 is
  ignored; visual positions and right padding get -100. ``seq_idx`` (packed rows) is expanded the same way,
  each visual token taking its placeholder's sequence index.
* The loss dict holds ``lm`` (token cross-entropy), ``align`` (the *unweighted* pixel MSE; 0 when the head is
  absent) and ``total = lm + align.loss_weight * align``.
* ``for_training=False`` builds no alignment head (:func:`load` defaults to it), so an inference model neither
  holds its weights nor runs it.
* A checkpoint directory (:meth:`EmmaMamba.save`) is self-describing: ``config.yaml`` (the fully resolved
  config), ``model.safetensors`` (every weight, frozen towers included, so loading needs no other file) and
  ``tokenizer.json`` (the LM tokenizer with ``<image>`` added). Loading runs no code from the files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence, overload

import torch
import torch.nn.functional as F
from torch import nn

from emma_mamba.config import (CHAT_TEMPLATE, TURN_END, TURN_SEP, ConfigError, ModelConfig, check_prompt_template,
                               load_config, save_config)
from emma_mamba.models.align_head import PixelAlignHead
from emma_mamba.models.fusion import InstructionFusion, MultiScaleFusion, Projector
from emma_mamba.models.vision import ImageProcessor, VisionEncoder, _trains, build_open_clip, build_second_encoder

if TYPE_CHECKING:
    from emma_mamba.inference.generate import GenerationResult

__all__ = ["EmmaMamba", "EmmaOutput", "STAGES", "TRAINABLE_MODULES", "load", "answer", "CHAT_TEMPLATE", "TURN_END",
           "TURN_SEP", "build_chat_prompt"]

log = logging.getLogger(__name__)

STAGES: dict[str, tuple[str, ...]] = {
    # stage 1 (alignment): the vision-to-LM bridge only
    "pretrain": ("mff", "instruction", "projector"),
    # stage 2 (instruction tuning): also the LM and the alignment head (the EMMA-Mamba paper's single stage)
    "finetune": ("mff", "instruction", "projector", "lm", "align_head"),
}
"""Submodules trained in each stage by default (a run's train.trainable overrides them); the ViT also trains in
finetune when vision.freeze is false; the CLIP text tower of instruction fusion never does."""

TRAINABLE_MODULES = ("vision", "mff", "instruction", "projector", "lm", "align_head")
"""The names train.trainable may list."""

# CHAT_TEMPLATE, TURN_END, TURN_SEP (emma_mamba.config, exported here too): the default chat format,
# mamba-2.8b-zephyr's; a model's own is its config.chat (emma_mamba.config.ChatConfig)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


@dataclass
class EmmaOutput:
    logits: torch.Tensor
    """(b, L, padded_vocab): L is the sequence length after the placeholders were expanded. With
    ``labelled_logits_only``: (n, padded_vocab), the n positions of ``logits_mask`` only."""
    loss: dict[str, torch.Tensor] | None = None
    """{'lm', 'align', 'total'} when labels were given."""
    labels: torch.Tensor | None = None
    """(b, L) the labels aligned with ``logits`` (expanded; -100 at visual and padding positions)."""
    image_positions: tuple[torch.Tensor, torch.Tensor] | None = None
    """(rows (n_img,), starts (n_img,)): where each image's N visual tokens sit in the expanded sequence."""
    logits_mask: torch.Tensor | None = None
    """With ``labelled_logits_only``: (b, L) bool, the positions ``logits`` holds (those with a next-token label);
    the row of ``logits`` for position t predicts ``labels[t + 1]``."""


torch.export.register_dataclass(EmmaOutput, serialized_type_name="emma_mamba.models.vlm.EmmaOutput")  # as MambaLMOutput


class EmmaMamba(nn.Module):
    """The EMMA-Mamba VLM. ``EmmaMamba(cfg)`` builds it (random init, or the local files named in cfg).

    ``for_training=False`` leaves out the alignment head. ``device='meta'`` builds shapes only (parameter
    reports). ``tokenizer``: the LM tokenizer to use (default: ``lm.tokenizer`` or the shipped one); the
    ``<image>`` placeholder is added to it, so a data pipeline sharing it sees the same id. ``load_pretrained``
    False skips the local weight files named in the config (``load`` fills every weight from its own file).
    """

    def __init__(self, config: ModelConfig, *, for_training: bool = True, device=None, dtype=None,
                 tokenizer=None, load_pretrained: bool = True, _lm_device=None):
        super().__init__()
        from emma_mamba.models.mamba import MambaConfig, MambaLM, resolve_dtype
        from emma_mamba.models.tokenizer import load_tokenizer

        if not isinstance(config, ModelConfig):
            raise TypeError(f"EmmaMamba expects a ModelConfig, got {type(config).__name__}")
        dtype = resolve_dtype(dtype, "EmmaMamba")
        config.validate()
        self.config = config
        self.for_training = for_training
        fk = dict(device=device, dtype=dtype)

        clip, preprocess_cfg = build_open_clip(config.vision, device=device, load_weights=load_pretrained)
        second, second_mean, second_std = None, (), ()
        if config.vision.second_encoder.timm_model is not None:
            second, second_mean, second_std = build_second_encoder(config.vision.second_encoder, device=device,
                                                                   load_weights=load_pretrained)
        if dtype is not None:
            clip.to(dtype)
            if second is not None:
                second.to(dtype)
        self.vision = VisionEncoder(clip.visual, config.vision, preprocess_cfg, second, second_mean, second_std)
        width, n_tok = self.vision.width, self.vision.num_tokens
        self.mff = MultiScaleFusion(width, len(self.vision.taps), config.mff.mode, config.mff.num_heads, **fk)
        if config.instruction.enabled:
            clip.visual = None  # the ViT lives in self.vision; keep only the text tower here
            # a meta build (a parameter report) never tokenizes: it needs no tokenizer files
            meta = device is not None and torch.device(device).type == "meta"
            clip_tok = None if meta else _text_tokenizer(config, clip.context_length)
            self.instruction = InstructionFusion(clip, clip_tok, width, n_tok, config.instruction.text_layer, **fk)
        else:
            self.instruction = None
        del clip

        lm_cfg = _mamba_config(config, MambaConfig)
        self.projector = Projector(width, lm_cfg.d_model, config.projector.depth, config.projector.hidden_dim, **fk,
                                   kind=config.projector.kind)
        lm_device = _lm_device if _lm_device is not None else device
        if config.lm.pretrained and load_pretrained and torch.device(lm_device or "cpu").type != "meta":
            self.lm = MambaLM.from_pretrained(config.lm.pretrained, device=lm_device, dtype=dtype)
            _check_lm_matches(self.lm.config, lm_cfg, config.lm.pretrained)
        else:
            self.lm = MambaLM(lm_cfg, device=lm_device, dtype=dtype)

        if config.align.enabled and for_training:
            n = lm_cfg.n_layer + 1
            for i in config.align.lm_layers:
                if not -n <= i < n:
                    raise ConfigError(f"align.lm_layers: index {i} out of range for {n} LM hidden states "
                                      f"(embeddings + {lm_cfg.n_layer} blocks; valid {-n}..{n - 1})")
            a = config.align
            self.align_head = PixelAlignHead(lm_cfg.d_model, len(a.lm_layers), self.vision.grid,
                                             self.vision.patch_size, a.d_model, a.n_layer, a.num_heads,
                                             a.norm_pix, **fk)
        else:
            self.align_head = None
        self.align_loss_on = self.align_head is not None
        """Whether a forward with labels adds the alignment head's loss: with the head, unless :meth:`set_stage`
        left it out of training (stage 1 of a model built for training: a frozen random head's loss would still
        reach the bridge through the frozen LM)."""

        meta_build = device is not None and torch.device(device).type == "meta"
        tok_path = config.lm.tokenizer
        if tokenizer is None and meta_build and tok_path is not None and not os.path.exists(tok_path):
            # a parameter report of a recipe whose local files are not there yet: the shipped tokenizer only
            # stands in for the placeholder id (the parameter counts come from the config)
            tok_path = None
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tok_path)
        _check_tokenizer_fits(self.tokenizer, config.image_token, self.lm.config)
        # The placeholder id may lie beyond the LM's embedding rows: it is swapped out before the embedding
        # lookup (see _splice) and the LM head never produces it, so no row is needed for it.
        (self.image_token_id,) = self.tokenizer.add_tokens([config.image_token], input_only=True)
        self.image_processor = ImageProcessor(preprocess_cfg)

    # ------------------------------------------------------------------------------------------- training

    def set_stage(self, stage: str, trainable: Sequence[str] | None = None) -> "EmmaMamba":
        """requires_grad for a training stage: the modules of ``STAGES[stage]`` (plus the ViT in finetune when
        ``vision.freeze`` is false), or exactly ``trainable`` when given (names from TRAINABLE_MODULES). The
        alignment loss is added where the head trains only (``align_loss_on``)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
        if trainable is None:
            names = stage_modules(stage, self.vision.frozen)
        else:
            names = set(trainable)
            unknown = names - set(TRAINABLE_MODULES)
            if unknown:
                raise ValueError(f"train.trainable: unknown module(s) {sorted(unknown)}; valid: "
                                 f"{', '.join(TRAINABLE_MODULES)}")
            if "vision" in names and self.vision.frozen:
                raise ValueError("train.trainable lists 'vision' but the model's vision.freeze is true "
                                 "(set model.vision.freeze: false to train the ViT)")
            for name in ("instruction", "align_head"):
                if name in names and getattr(self, name) is None:
                    why = ("instruction.enabled is false" if name == "instruction" else
                           "align.enabled is false, or the model was built without its training-only head")
                    raise ValueError(f"train.trainable lists {name!r} but this model has none ({why})")
        for name in TRAINABLE_MODULES:
            module = getattr(self, name)
            if module is not None:
                module.requires_grad_(name in names)
        self.align_loss_on = self.align_head is not None and "align_head" in names
        if self.instruction is not None:
            self.instruction.text_model.requires_grad_(False)
        return self

    def tokenize_instructions(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, T) text-tower ids for instruction fusion (truncation counted and logged)."""
        if self.instruction is None:
            raise RuntimeError("instruction fusion is disabled in this model's config (instruction.enabled)")
        return self.instruction.tokenize(list(texts))

    # ------------------------------------------------------------------------------------------- forward

    def encode_images(self, pixel_values: torch.Tensor, instruction_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 3, H, W) preprocessed images -> (n, N, d_model) visual tokens in the LM's input space."""
        taps = self.vision(pixel_values)  # K x (n, N, C)
        mff_dtype = _param_dtype(self.mff, taps[0].dtype)
        x = self.mff([t.to(mff_dtype) for t in taps])
        if self.instruction is not None:
            if instruction_ids is None:
                raise ValueError("instruction fusion is enabled: pass instruction_ids, one row per image "
                                 "(model.tokenize_instructions(texts))")
            x = self.instruction(x, instruction_ids)
        return self.projector(x.to(_param_dtype(self.projector, x.dtype)))

    #: Set by the trainer under FSDP: a training micro-batch without images still runs the image branch (vision
    #: tower, MFF, instruction fusion, projector; the alignment head) on one blank image, its result multiplied
    #: by 0 where real images' results go (the LM input; the alignment loss). FSDP2 reduce-scatters only the
    #: parameters that have a gradient, so every process must give the same ones one; a process whose step was
    #: text-only would otherwise reduce fewer than the others, and the job fail ("collective mismatch") or hang.
    modality_lockstep: bool = False

    def _blank_image(self, device) -> torch.Tensor:
        H, W = self.vision.image_size
        return torch.zeros(1, 3, H, W, device=device)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, instruction_ids: torch.Tensor | None = None,
                image_counts: Sequence[int] | None = None, seq_idx: torch.Tensor | None = None,
                sample_ids: Sequence | None = None, labelled_logits_only: bool = False) -> EmmaOutput:
        """input_ids (b, l) with one ``<image>`` id per image; pixel_values (n_img, 3, H, W) in order of
        appearance; labels (b, l) aligned with input_ids; image_counts: images per row (checked against the
        placeholders; default: inferred); sample_ids: names used in error messages (default: row index).
        ``labelled_logits_only`` (with labels; training does this): the LM head runs at the positions with a
        next-token label only (``EmmaOutput.logits_mask``): the same loss and gradients without the (b, L, vocab)
        logits of the others and their backward (the tiny preset's stage-2 step on a CPU: 2.9 s -> 0.31 s, see
        docs/training.md; at 2.8B a 16 x 2048 micro-batch's bf16 logits are 3.3 GB)."""
        if labelled_logits_only and labels is None:
            raise ValueError("labelled_logits_only needs labels (the positions it keeps are the labelled ones)")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got {tuple(input_ids.shape)}")
        visual = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            visual = self.encode_images(pixel_values, instruction_ids)
        # modality_lockstep, a text-only training micro-batch: the image branch runs on one blank image and its
        # output enters the LM input x 0, so forward and backward run the same modules in the same order as with
        # images (the alignment head likewise below)
        ghost = visual is None and labels is not None and self.modality_lockstep
        if ghost:
            inst = self.tokenize_instructions([""]).to(input_ids.device) if self.instruction is not None else None
            blank = self.encode_images(self._blank_image(input_ids.device), inst)
        inputs_embeds, new_labels, new_seq_idx, positions = self._splice(
            input_ids, visual, labels, seq_idx, image_counts, sample_ids)
        if ghost:
            inputs_embeds = inputs_embeds + blank.sum().to(inputs_embeds.dtype) * 0.0
        need_hidden = self.align_loss_on and labels is not None and (visual is not None or ghost)
        sel = None
        if labels is not None:
            # shift the labels, not the logits, and take only the labelled positions: no (b, L, vocab) fp32 copy
            target = F.pad(new_labels[:, 1:], (0, 1), value=-100)  # (b, L): the next token at each position
            sel = target != -100
        out = self.lm(inputs_embeds=inputs_embeds, seq_idx=new_seq_idx, output_hidden_states=need_hidden,
                      logits_mask=sel if labelled_logits_only else None)
        loss = None
        if labels is not None:
            picked = out.logits if labelled_logits_only else out.logits[sel]  # (n, vocab), n labelled positions
            if picked.shape[0]:
                lm_loss = F.cross_entropy(picked.float(), target[sel])
            else:  # keeps the graph (every parameter a gradient, as DDP wants); nothing to predict adds nothing
                lm_loss = out.logits.sum() * 0.0
            align_loss = torch.zeros((), device=lm_loss.device, dtype=torch.float32)
            if need_hidden and ghost:
                n = self.vision.num_tokens
                hidden = [(out.hidden_states[i][:1, :1] * 0.0).expand(1, n, -1) for i in self.config.align.lm_layers]
                align_loss = self.align_head(hidden, self.image_processor.unnormalize(
                    self._blank_image(input_ids.device))) * 0.0
            elif need_hidden:
                rows, starts = positions
                idx = starts[:, None] + torch.arange(self.vision.num_tokens, device=starts.device)  # (n_img, N)
                hidden = [out.hidden_states[i][rows[:, None], idx] for i in self.config.align.lm_layers]
                images = self.image_processor.unnormalize(pixel_values.float())
                align_loss = self.align_head(hidden, images)
            total = lm_loss + self.config.align.loss_weight * align_loss
            loss = {"lm": lm_loss, "align": align_loss, "total": total}
        return EmmaOutput(logits=out.logits, loss=loss, labels=new_labels if labels is not None else None,
                          image_positions=positions, logits_mask=sel if labelled_logits_only else None)

    def _splice(self, input_ids, visual, labels, seq_idx, image_counts, sample_ids):
        """Replaces each placeholder by its image's N visual tokens; returns embeds, labels, seq_idx,
        (rows, starts) of the images. Rows are right-padded to the longest expanded row."""
        b, l = input_ids.shape
        is_img = input_ids == self.image_token_id  # (b, l)
        per_row = is_img.sum(dim=1).tolist()
        n_img = 0 if visual is None else visual.shape[0]
        name = (lambda i: f"sample {sample_ids[i]!r} (row {i})") if sample_ids is not None else (lambda i: f"sample {i}")
        if image_counts is not None:
            if len(image_counts) != b:
                raise ValueError(f"image_counts has {len(image_counts)} entries for {b} rows")
            for i, (k, c) in enumerate(zip(per_row, image_counts)):
                if k != c:
                    raise ValueError(f"{name(i)}: {k} {self.config.image_token} placeholder(s) in the text but "
                                     f"{c} image(s); one placeholder per image is required")
            if sum(image_counts) != n_img:
                raise ValueError(f"image_counts sum to {sum(image_counts)} but {n_img} images were given")
        elif sum(per_row) != n_img:
            detail = ", ".join(f"{name(i)}: {k}" for i, k in enumerate(per_row) if k)
            raise ValueError(f"{sum(per_row)} {self.config.image_token} placeholder(s) in the batch "
                             f"({detail or 'none'}) but {n_img} image(s) given; one placeholder per image")

        embed = self.lm.get_input_embeddings()
        text_ids = input_ids.masked_fill(is_img, 0)  # the placeholder's own row is never read
        if text_ids.numel() and (int(text_ids.max()) >= embed.num_embeddings or int(text_ids.min()) < 0):
            bad = (text_ids >= embed.num_embeddings) | (text_ids < 0)
            r, c = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"{name(r)}: token id {int(text_ids[r, c])} at position {c} is outside the LM "
                             f"embedding [0, {embed.num_embeddings}) (tokenizer and LM vocabulary disagree)")
        text_embeds = embed(text_ids)  # (b, l, d)
        if n_img == 0:
            return text_embeds, labels, seq_idx, None

        N = visual.shape[1]
        width = torch.where(is_img, N, 1)  # tokens each input position expands to
        end = torch.cumsum(width, dim=1)
        start = end - width  # (b, l) position of each input token in the expanded row
        L = int(end[:, -1].max())
        d = text_embeds.shape[-1]
        out = text_embeds.new_zeros(b, L, d)
        rows_t, cols_t = torch.nonzero(~is_img, as_tuple=True)
        out[rows_t, start[rows_t, cols_t]] = text_embeds[rows_t, cols_t]
        rows_i, cols_i = torch.nonzero(is_img, as_tuple=True)  # row-major = order of appearance
        starts_i = start[rows_i, cols_i]
        idx = starts_i[:, None] + torch.arange(N, device=input_ids.device)  # (n_img, N)
        out[rows_i[:, None], idx] = visual.to(out.dtype)

        new_labels = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            new_labels = labels.new_full((b, L), -100)
            new_labels[rows_t, start[rows_t, cols_t]] = labels[rows_t, cols_t]
        new_seq_idx = None
        if seq_idx is not None:
            if seq_idx.shape != input_ids.shape:
                raise ValueError(f"seq_idx {tuple(seq_idx.shape)} must match input_ids {tuple(input_ids.shape)}")
            # every expanded position takes its source token's index; the padded tail repeats the last one
            src = torch.searchsorted(end, torch.arange(L, device=end.device).expand(b, L).contiguous(), right=True)
            new_seq_idx = torch.gather(seq_idx, 1, src.clamp(max=l - 1))
        return out, new_labels, new_seq_idx, (rows_i, starts_i)

    # ---------------------------------------------------------------------------------------- generation

    def build_prompt(self, prompt: str, num_images: int = 1, template: str | None = None) -> str:
        """The chat-formatted prompt with ``num_images`` placeholders before the user's text (or before the
        turn: ``vision.image_position``), in the model's chat format (``config.chat``) unless ``template``."""
        return build_chat_prompt(prompt, num_images, self.config.image_token,
                                 self.config.chat.prompt_template if template is None else template,
                                 self.config.vision.image_position)

    def stops(self, config):
        """``config`` (a GenerationConfig) ending where this model's answers end: at the tokenizer's EOS (beside
        the config's own EOS ids), and at ``config.chat.turn_end`` when that is another text (a stop string; a
        chat format other than the default's; beside the config's own stop strings)."""
        import dataclasses

        turn_end, stops = self.config.chat.turn_end, list(config.stop_strings or ())
        if self.tokenizer.encode(turn_end) != [self.tokenizer.eos_token_id] and turn_end not in stops:
            stops.append(turn_end)
        return dataclasses.replace(config.with_eos(self.tokenizer.eos_token_id), stop_strings=stops)

    @torch.no_grad()
    def prompt_embeds(self, prompt_text: str, images: Sequence = (), instructions: Sequence[str] | None = None):
        """(1, L, d_model) prompt embeddings for one prompt holding one placeholder per image."""
        return self.embeds_from_ids(self.tokenizer.encode(prompt_text), images, instructions)

    @torch.no_grad()
    def embeds_from_ids(self, token_ids: Sequence[int], images: Sequence = (),
                        instructions: Sequence[str] | None = None):
        """(1, L, d_model) embeddings of a tokenised prompt holding one placeholder id per image (a multi-turn
        conversation tokenised segment by segment, as training does)."""
        return self.batch_embeds([token_ids], [images], None if instructions is None else [instructions])[0][None]

    #: Images per vision-encoder forward when the prompts of a batch are embedded together (bounds the
    #: activation memory of a large batch of high-resolution images).
    ENCODE_BATCH = 32

    @torch.no_grad()
    def batch_embeds(self, token_ids: Sequence[Sequence[int]], images: Sequence[Sequence],
                     instructions: Sequence[Sequence[str]] | None = None) -> list[torch.Tensor]:
        """[(L_i, d_model)] embeddings of several tokenised prompts, each holding one placeholder id per image of
        its list in ``images`` (``instructions``: one list per prompt, one string per image). The images of all
        prompts go through the vision encoder, MFF, instruction fusion and projector together, ``ENCODE_BATCH``
        at a time, instead of prompt by prompt (the same tokens up to a batched GEMM's rounding)."""
        images = _image_lists(images, len(token_ids))
        if instructions is not None:  # a prompt's one instruction may come as the string itself
            instructions = [[ts] if isinstance(ts, str) else ts for ts in instructions]
        flat = [im for ims in images for im in ims]
        visual = None
        if flat:
            if self.instruction is not None:
                texts = []
                for i, (ims, ts) in enumerate(zip(images, instructions or [None] * len(images))):
                    if len(ims) and ts is None:
                        raise ValueError("instruction fusion is enabled: pass one instruction per image")
                    if len(ims) and len(ts) != len(ims):
                        raise ValueError(f"prompt {i}: {len(ims)} images but {len(ts)} instructions (one per image)")
                    texts += list(ts) if len(ims) else []
            parts = []
            for i in range(0, len(flat), self.ENCODE_BATCH):
                pixel_values = self.image_processor(flat[i:i + self.ENCODE_BATCH]).to(self.lm.device)
                instruction_ids = None
                if self.instruction is not None:
                    instruction_ids = self.tokenize_instructions(texts[i:i + self.ENCODE_BATCH]).to(self.lm.device)
                parts.append(self.encode_images(pixel_values, instruction_ids))
            visual = torch.cat(parts)  # (n_images, N, d_model) in prompt order
        out, k = [], 0
        for ids, ims in zip(token_ids, images):
            row = torch.tensor([list(ids)], dtype=torch.long, device=self.lm.device)
            mine = visual[k:k + len(ims)] if len(ims) else None
            k += len(ims)
            embeds, _, _, _ = self._splice(row, mine, None, None, None, None)
            out.append(embeds[0])
        return out

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], images: Sequence = (), instructions: Sequence | None = None,
                 config=None, streamer: Callable[[str], None] | None = None) -> GenerationResult:
        """Continue chat-formatted prompt(s) holding one placeholder per image (see :meth:`build_prompt`).

        One prompt: ``images`` its images, ``instructions`` one string per image (instruction fusion).
        Several prompts: ``images`` and ``instructions`` are lists with one list per prompt. Returns the
        :func:`emma_mamba.inference.generate.generate` result (``.texts``); ``streamer`` (one prompt only)
        receives the text as it is produced.
        """
        from emma_mamba.inference.generate import GenerationConfig, generate

        if config is None:
            config = self.stops(GenerationConfig())
        if isinstance(prompts, str):
            prompts, images = [prompts], [[images] if _is_one_image(images) else list(images)]
            instructions = (None if instructions is None else
                            [[instructions] if isinstance(instructions, str) else list(instructions)])
        else:
            prompts = list(prompts)
            images = _image_lists(images if _is_one_image(images) or len(images) else [[] for _ in prompts],
                                  len(prompts))
        if instructions is not None and len(instructions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(instructions)} instruction lists")
        embeds = self.batch_embeds([self.tokenizer.encode(p) for p in prompts], images,
                                   instructions)  # ragged list of (L_i, d_model)
        return generate(self.lm, inputs_embeds=embeds, config=config, tokenizer=self.tokenizer, streamer=streamer)

    @torch.no_grad()
    def option_probabilities(self, prompts: Sequence[str], images: Sequence, options: Sequence,
                             instructions: Sequence | None = None, prefill_chunk: int | None | str = "auto"):
        """How likely each of ``options`` is as the reply to each chat-formatted prompt, normalised over the
        options: ``(n_prompts, n_options)`` fp32 rows summing to 1 (closed-set benchmarks: "True"/"False", option
        letters). An option's probability is that of its whole token sequence, tokenised as a training reply is
        (the answer text on its own); for options of one token each this is Prismatic's measure, the next-token
        distribution restricted to the options. An option may be a tuple of spellings (``("Yes", "yes")``): its
        probability is the sum of theirs, over the spellings in the model's vocabulary (at least one must be).
        ``images`` / ``instructions``: one list per prompt, as :meth:`generate`. See
        :func:`emma_mamba.inference.generate.option_logprobs`."""
        from emma_mamba.inference.generate import option_logprobs

        spellings, owner = [], []  # every spelling's token ids, and the option it belongs to
        for j, opt in enumerate(options):
            alts = (opt,) if isinstance(opt, str) else tuple(opt)
            found = []
            for o in alts:
                t = tuple(self.tokenizer.encode(o))
                if t and self.tokenizer.decode(list(t), skip_special_tokens=False).strip() == o.strip():
                    found.append(t)
            if not found:
                got = self.tokenizer.decode(self.tokenizer.encode(alts[0]), skip_special_tokens=False)
                shown = " / ".join(repr(a) for a in alts)  # the spellings, not a tuple's repr
                raise ValueError(f"option {shown} is not in this model's vocabulary ({alts[0]!r} tokenises to "
                                 f"{got!r}): the model cannot give it as a reply")
            for t in found:
                if t in spellings:
                    raise ValueError(f"options {options[owner[spellings.index(t)]]!r} and {opt!r} tokenise the same")
                spellings.append(t)
                owner.append(j)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists (one list per prompt)")
        if instructions is not None and len(instructions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(instructions)} instruction lists")
        embeds = self.batch_embeds([self.tokenizer.encode(p) for p in prompts], images, instructions)
        logp = option_logprobs(self.lm, spellings, inputs_embeds=embeds, prefill_chunk=prefill_chunk).double()
        # each option: log of the summed probability of its spellings; then normalised over the options
        per_option = torch.stack([torch.logsumexp(logp[:, [k for k, o in enumerate(owner) if o == j]], dim=-1)
                                  for j in range(len(options))], dim=-1)
        return torch.softmax(per_option, -1).float()

    # --------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.yaml, model.safetensors and tokenizer.json into directory ``path``. A model with LoRA
        adapters (:func:`~emma_mamba.models.lora.apply_lora`) is written as a training run writes it: a plain
        model with every adapter merged into its weight, the adapters beside it in ``lora.safetensors``."""
        from safetensors.torch import save_model

        from emma_mamba import __version__
        from emma_mamba.fileio import save_safetensors, write_whole
        from emma_mamba.models.lora import LORA_FILE, export_state, has_lora, lora_metadata

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, out / CONFIG_NAME)
        meta = {"format": "pt", "emma_mamba": __version__}
        # whole or not at all (an interrupted save leaves no half model.safetensors), mode 0666 - umask
        if has_lora(self):
            sd, adapters = export_state(self, self.state_dict())
            save_safetensors({k: v.contiguous() for k, v in sd.items()}, out / WEIGHTS_NAME, metadata=meta)
            save_safetensors(adapters, out / LORA_FILE, metadata={**meta, **lora_metadata(self)})
        else:
            write_whole(out / WEIGHTS_NAME, lambda tmp: save_model(self, str(tmp), metadata=meta))
            (out / LORA_FILE).unlink(missing_ok=True)  # an earlier save's adapters are not this model's
        self.tokenizer.save(out)
        return out

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """{part: {'total', 'pretrain', 'finetune'}}: parameters per part, and those trained in each stage
        (STAGES; frozen towers never; an unfrozen ViT's blocks after the deepest tap and its heads never, as
        the taps never run them). Tied weights count once."""
        inst = self.instruction
        vision_trained = None if self.vision.frozen else "vision"
        parts = {  # part -> (module, the STAGES entry that trains it, or None for never)
            "vision": (self.vision.visual, vision_trained),
            "vision.second_encoder": (self.vision.second, vision_trained),
            "mff": (self.mff, "mff"),
            "instruction.text_tower": (inst.text_model if inst is not None else None, None),
            "instruction.fusion": (nn.ModuleList([inst.text_proj, inst.token_mixer]) if inst is not None else None,
                                   "instruction"),
            "projector": (self.projector, "projector"),
            "lm": (self.lm, "lm"),
            "align_head": (self.align_head, "align_head"),
        }
        rows: dict[str, dict[str, int]] = {}
        for name, (module, trained_as) in parts.items():
            if module is None:
                continue
            total = _numel(module)
            rows[name] = {"total": total}
            # an unfrozen ViT trains with the LM, in the finetune stage, all but what its taps never run
            n_trained = self.vision.trainable_numel(module) if trained_as == "vision" else total
            for stage, trained in STAGES.items():
                on = trained_as in trained or (trained_as == "vision" and stage == "finetune")
                rows[name][stage] = n_trained if on else 0
        return rows

    def set_gradient_checkpointing(self, enabled: bool = True) -> "EmmaMamba":
        """Recompute the LM's (and an unfrozen ViT's) activations in the backward pass."""
        self.lm.set_gradient_checkpointing(enabled)
        for tower in self.vision.towers():  # an unfrozen tower (vision.freeze false, or a user's requires_grad_)
            if not self.vision.frozen or _trains(tower):
                tower.set_grad_checkpointing(enabled)
        return self

    def extra_repr(self) -> str:
        return f"config={self.config.name!r}, for_training={self.for_training}"


def _text_tokenizer(config: ModelConfig, context_length: int):
    """open_clip's tokenizer for the text tower: its bundled BPE (CLIP) or an HF tokenizer (SigLIP) read from
    ``instruction.tokenizer`` or the local HF cache only; never downloaded."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    text_cfg = (open_clip.get_model_config(config.vision.model_name) or {}).get("text_cfg", {})
    text_cfg = {**text_cfg, **config.vision.open_clip_overrides.get("text_cfg", {})}
    hf_name = text_cfg.get("hf_tokenizer_name")
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    try:
        if config.instruction.tokenizer is not None:
            if not os.path.isdir(config.instruction.tokenizer):
                raise ConfigError(f"instruction.tokenizer: {config.instruction.tokenizer!r} is not a directory")
            return HFTokenizer(config.instruction.tokenizer, context_length=context_length, local_files_only=True,
                               **kwargs)
        if hf_name:
            return open_clip.get_tokenizer(config.vision.model_name, context_length=context_length,
                                           local_files_only=True)
        return open_clip.get_tokenizer(config.vision.model_name, context_length=context_length)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"instruction.enabled: cannot load the text-tower tokenizer of {config.vision.model_name} "
            f"({'HF tokenizer ' + repr(hf_name) if hf_name else 'open_clip bundled'}) from local files: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Set instruction.tokenizer to a local "
            f"tokenizer directory, use a CLIP ViT (tokenizer bundled with open_clip), or disable instruction "
            f"fusion") from None


def _check_tokenizer_fits(tokenizer, image_token: str, lm_config) -> None:
    """ConfigError when ``tokenizer`` has ids (its image placeholder aside) beyond the LM's embedding rows: such a
    token could not be embedded (an index error mid-training or mid-answer, or a row that is the padding's)."""
    n = len(tokenizer)
    if tokenizer.token_to_id(image_token) == n - 1:  # a saved model's tokenizer holds its placeholder last
        n -= 1
    rows = lm_config.padded_vocab_size
    if n > rows:
        raise ConfigError(f"lm.tokenizer: {tokenizer.source} has {n} token ids but the LM's embedding has {rows} rows "
                          f"(vocab_size {lm_config.vocab_size}, padded to a multiple of "
                          f"{lm_config.pad_vocab_size_multiple}); ids {rows}..{n - 1} could not be embedded: use the "
                          f"LM's own tokenizer (the shipped GPT-NeoX one for the public Mamba checkpoints)")


def _numel(module: nn.Module) -> int:
    # unique tensors: tied weights count once
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return default


# LMConfig fields that are not the model's shape or init (they say where weights and tokenizer come from)
LM_LOADING_FIELDS = ("pretrained", "tokenizer")


def _mamba_config(config: ModelConfig, MambaConfig):
    """The MambaConfig of ``config.lm``: every LMConfig field but the loading ones, copied by name (a field
    added to both dataclasses reaches the model without touching this function)."""
    from dataclasses import fields

    lm = config.lm
    shape = {f.name: getattr(lm, f.name) for f in fields(lm) if f.name not in LM_LOADING_FIELDS}
    try:
        return MambaConfig(**shape)
    except ValueError as e:
        raise ConfigError(f"lm: {e}") from None


def lm_match_fields(lm) -> tuple[str, ...]:
    """The fields of an LM config (``lm``: a MambaConfig) that a model config must state as the checkpoint has them
    for an EMMA-Mamba model to take it as ``lm.pretrained``: what a saved model is rebuilt from (``config.yaml``'s
    ``lm``), so every one that changes the network, its shape or its numbers. Mamba-1: dt_rank; Mamba-2: headdim
    and ngroups (a Mamba-1 checkpoint's headdim / ngroups are only defaults, a Mamba-2 mixer has no dt_rank)."""
    per_kind = ("headdim", "ngroups") if lm.ssm_layer == "mamba2" else ("dt_rank",)
    return (("ssm_layer", "d_model", "n_layer", "d_state", "d_conv", "expand") + per_kind
            + ("vocab_size", "pad_vocab_size_multiple", "tie_embeddings", "conv_bias", "bias", "rms_norm_eps",
               "residual_in_fp32"))


def stage_modules(stage: str, vision_frozen: bool) -> set[str]:
    """The modules ``stage`` trains by default (:data:`STAGES`; the ViT too in finetune when it is not frozen):
    what :meth:`EmmaMamba.set_stage` trains without a ``trainable`` list."""
    return set(STAGES[stage]) | ({"vision"} if stage == "finetune" and not vision_frozen else set())


def _is_one_image(x) -> bool:
    """A single image as the image processor takes it (a path, a PIL image, an array), not a list of them."""
    if isinstance(x, (str, os.PathLike)):
        return True
    if type(x).__module__.startswith("PIL.") or type(x).__module__ == "numpy" or isinstance(x, torch.Tensor):
        return True
    return False


def _image_lists(images, n_prompts: int) -> list[list]:
    """``images`` as one list per prompt: each entry a list of that prompt's images, or one image (a prompt with
    one image, as transformers' processors take a batch). A single image for several prompts is refused."""
    if _is_one_image(images):
        raise ValueError(f"{n_prompts} prompts but one image ({type(images).__name__}): pass one list of images per "
                         f"prompt, e.g. [[image_a], [image_b]]")
    images = list(images)
    if len(images) != n_prompts:
        raise ValueError(f"{n_prompts} prompts but {len(images)} image lists (one list per prompt)")
    return [[ims] if _is_one_image(ims) else list(ims) for ims in images]


def _check_lm_matches(got, want, path) -> None:
    """Every field of :func:`lm_match_fields` in which the checkpoint's LM (``got``) differs from the config's
    (``want``), named in one error by the config keys that set it (the vocabulary's rows are lm.vocab_size rounded
    up to a multiple of lm.pad_vocab_size_multiple, which are what a config can say; dt_rank compared resolved,
    "auto" being ceil(d_model / 16)). A difference the load let through was built from the checkpoint's own
    config.json but saved with the model config's, so the saved model failed to load or loaded as another
    network."""
    names = [n for n in lm_match_fields(got) if n not in ("vocab_size", "pad_vocab_size_multiple")]
    names.insert(names.index("tie_embeddings"), "padded_vocab_size")
    bad = []
    for name in names:
        if name == "dt_rank":
            if got.resolved_dt_rank != want.resolved_dt_rank:
                shown = f"{want.dt_rank} ({want.resolved_dt_rank})" if want.dt_rank == "auto" else want.dt_rank
                bad.append(f"the checkpoint has dt_rank={got.resolved_dt_rank} but the config says lm.dt_rank={shown}")
            continue
        if getattr(got, name) == getattr(want, name):
            continue
        if name == "padded_vocab_size":
            rows, v = got.padded_vocab_size, want.vocab_size
            fits = [m for m in (want.pad_vocab_size_multiple, 8, 16, 32, 64, 128) if -(-v // m) * m == rows]
            hint = (f" (lm.pad_vocab_size_multiple={fits[0]} gives {rows})" if fits else
                    f" (lm.vocab_size={rows} with lm.pad_vocab_size_multiple=1 gives {rows})" if v <= rows else "")
            bad.append(f"the checkpoint's embedding has {rows} rows but the config's lm.vocab_size={v} padded to a "
                       f"multiple of lm.pad_vocab_size_multiple={want.pad_vocab_size_multiple} gives "
                       f"{want.padded_vocab_size}{hint}")
        else:
            bad.append(f"the checkpoint has {name}={getattr(got, name)} but the config says "
                       f"lm.{name}={getattr(want, name)}")
    if bad:
        raise ConfigError(f"lm.pretrained {path}: " + "; ".join(bad) + "; make the config match the checkpoint")


def build_chat_prompt(prompt: str, num_images: int = 1, image_token: str = "<image>",
                      template: str = CHAT_TEMPLATE, image_position: str = "in_turn") -> str:
    """``template`` filled with ``num_images`` placeholders (one per line) followed by the user's prompt; with
    ``image_position`` before_turn the placeholders precede the template instead (as training lays them out:
    :func:`emma_mamba.data.llava.chat_segments`). With images the prompt is stripped, as training strips the turn
    that holds the image (LLaVA's preprocess_multimodal) and ``serve`` every message: a question read from a file
    with its trailing newline was asked otherwise than the model was trained. A template without ``{prompt}``
    (the question would be dropped) or with another field is a ConfigError."""
    if template is not CHAT_TEMPLATE:
        check_prompt_template(template, "template")
    if num_images:
        prompt = prompt.strip()
    if image_position == "before_turn":
        return image_token * num_images + template.format(prompt=prompt)
    if image_position != "in_turn":
        raise ValueError(f"image_position must be in_turn or before_turn, got {image_position!r}")
    body = "".join(f"{image_token}\n" for _ in range(num_images)) + prompt
    return template.format(prompt=body)


# ------------------------------------------------------------------------------------------ load / answer

def load(path: str | os.PathLike, *, for_training: bool = False, device=None, dtype=None) -> EmmaMamba:
    """Load a directory written by :meth:`EmmaMamba.save`. For inference (default) the alignment head is
    neither built nor read. ``dtype``: a torch dtype or its name (``"bf16"``); None keeps float32."""
    from emma_mamba.models.mamba import resolve_dtype

    dtype = resolve_dtype(dtype, "emma_mamba.load")
    d = Path(path)
    if d.is_file():  # a file of the checkpoint (model.safetensors, config.yaml): the directory is what loads
        raise FileNotFoundError(f"{d} is a file; load takes the checkpoint directory written by EmmaMamba.save "
                                f"(here perhaps {d.parent})")
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    from emma_mamba.training.checkpoint import SHARDED_DIR, is_sharded

    if (d / "config.json").is_file() and not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d} is a language-model folder (config.json: a Mamba LM in mamba-ssm's or "
                                f"transformers' layout), not an EMMA-Mamba checkpoint ({CONFIG_NAME}, written by "
                                f"EmmaMamba.save): load it with emma_mamba.models.mamba.MambaLM.from_pretrained, "
                                f"or the commands' --lm option (generate, chat, serve)")
    sharded = not (d / WEIGHTS_NAME).is_file() and is_sharded(d)
    for name in (CONFIG_NAME, "tokenizer.json") + (() if sharded else (WEIGHTS_NAME,)):
        if not (d / name).is_file():
            raise FileNotFoundError(f"checkpoint directory {d} has no {name} (expected {CONFIG_NAME}, "
                                    f"{WEIGHTS_NAME} (or a sharded training checkpoint's {SHARDED_DIR}/), "
                                    f"tokenizer.json written by EmmaMamba.save)")
    weights = d / (SHARDED_DIR if sharded else WEIGHTS_NAME)
    cfg = load_config(d / CONFIG_NAME)
    cfg.lm.tokenizer = str(d)
    # Every weight comes from the file: skip the configured pretrained files, and build the LM and the
    # adapters on the meta device (no random init) to be materialised by assign-loading. The open_clip model
    # is built for real because it keeps non-persistent buffers (the text causal mask) the file does not hold.
    model = EmmaMamba(cfg, for_training=for_training, device=device, dtype=dtype, load_pretrained=False,
                      _lm_device="meta")
    target = torch.device(device) if device is not None else torch.device("cpu")
    expected = model.state_dict()

    def skip(k: str) -> bool:  # inference load: the head's weights are not even read
        return k.startswith("align_head.") and model.align_head is None

    if sharded:
        sd = _read_sharded(d, skip)
    else:
        sd = {}
        with _open_weights(weights) as f:
            for k in f.keys():
                if not skip(k):
                    sd[k] = f.get_tensor(k)
    sd = _drop_tied_aliases(model, sd)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    # tied LM head: safetensors stores one copy of a shared tensor
    missing = [k for k in missing if not _is_tied_alias(model, k, sd)]
    if missing or unexpected:
        head_absent = not any(k.startswith("align_head.") for k in sd)  # an export without it: none at all
        if missing and all(k.startswith("align_head.") for k in missing) and not unexpected and head_absent:
            log.warning("%s holds no alignment-head weights; the head starts from its initialisation", d)
        else:  # (a head with some of its tensors would train half from the file, half from its initialisation)
            raise ConfigError(f"{weights} does not match {d / CONFIG_NAME}: missing "
                              f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                              f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConfigError(f"{weights}: {k} has shape {tuple(v.shape)}, the config builds "
                              f"{tuple(expected[k].shape)}")
        if v.is_floating_point() != expected[k].is_floating_point():  # an integer weight is not a cast away
            raise ConfigError(f"{weights}: {k} has dtype {v.dtype}, the model's is {expected[k].dtype}")
    # Read on the CPU, then one fresh allocation per tensor on the target device (no views into a shared
    # buffer; the file is never mapped onto the GPU as a whole).
    sd = {k: v.to(device=target, dtype=expected[k].dtype, copy=True) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)  # assign: the meta-built LM takes the file's tensors
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ConfigError(f"{weights} left {len(still_meta)} tensors unset: {still_meta[:8]}")
    model.set_stage("finetune") if for_training else model.requires_grad_(False)
    model.eval()
    return model


@contextlib.contextmanager
def _open_weights(path: Path):
    """``safe_open(path)``; a file safetensors cannot read (cut short, empty, not safetensors) is a ConfigError
    naming it, not the library's bare "invalid header length"."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e}); the checkpoint is incomplete or "
                          f"corrupt: copy or export it again") from None
    with f:
        try:
            yield f
        except SafetensorError as e:  # a header that parses over data cut short
            raise ConfigError(f"{path}: a tensor cannot be read ({e}); the checkpoint is incomplete or "
                              f"corrupt") from None


def weight_names(path: str | os.PathLike) -> list[str]:
    """The parameter names a checkpoint directory holds (model.safetensors, or a sharded training checkpoint's
    state), without reading any weight."""
    from emma_mamba.training.checkpoint import _sharded_model_meta, is_sharded

    d = Path(path)
    if (d / WEIGHTS_NAME).is_file():
        with _open_weights(d / WEIGHTS_NAME) as f:
            return list(f.keys())
    if is_sharded(d):
        return list(_sharded_model_meta(d))
    raise FileNotFoundError(f"checkpoint directory {d} has no {WEIGHTS_NAME} (nor a sharded training checkpoint's "
                            f"state/)")


def has_align_head_weights(path: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds the pixel-wise alignment head's weights (a training-time save)."""
    return any(k.startswith("align_head.") for k in weight_names(path))


def _read_sharded(d: Path, skip) -> dict:
    """The model state of a sharded training checkpoint (checkpoint.format: sharded), a LoRA run's adapters
    merged into their weights as a full checkpoint holds them."""
    from emma_mamba.models.lora import merge_adapters
    from emma_mamba.training.checkpoint import STATE_NAME, read_sharded_model

    sd = read_sharded_model(d, skip)
    adapted = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith((".lora_A", ".lora_B"))})
    if adapted:
        lora = (torch.load(d / STATE_NAME, map_location="cpu", weights_only=True).get("lora")
                if (d / STATE_NAME).is_file() else None)
        if not lora:
            raise ConfigError(f"{d}: its sharded state has LoRA adapters but {STATE_NAME} does not say their "
                              f"r and alpha (an incomplete checkpoint)")
        sd, _ = merge_adapters(sd, {name: float(lora["alpha"]) / int(lora["r"]) for name in adapted})
    return sd


def _drop_tied_aliases(model: nn.Module, sd: dict) -> dict:
    """One name per tied parameter (the LM head tied to the embedding): a file holding both names would untie
    them under assign-loading."""
    first: dict[int, str] = {}
    drop = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in sd:
            if id(p) in first:
                drop.add(name)
            else:
                first[id(p)] = name
    return {k: v for k, v in sd.items() if k not in drop}


def _is_tied_alias(model: nn.Module, key: str, sd: dict) -> bool:
    try:
        t = model.get_parameter(key)
    except AttributeError:
        return False
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is t and name in sd:
            return True
    return False


@overload
def answer(model: EmmaMamba, image, prompt: str, *, streamer: Callable[[str], None] | None = ...,
           max_new_tokens: int = ..., temperature: float = ..., template: str | None = ..., config=...,
           return_result: Literal[False] = ...) -> str: ...


@overload
def answer(model: EmmaMamba, image, prompt: str, *, streamer: Callable[[str], None] | None = ...,
           max_new_tokens: int = ..., temperature: float = ..., template: str | None = ..., config=...,
           return_result: Literal[True]) -> GenerationResult: ...


def answer(model: EmmaMamba, image, prompt: str, *, streamer: Callable[[str], None] | None = None,
           max_new_tokens: int = 256, temperature: float = 0.0, template: str | None = None,
           config=None, return_result: bool = False) -> str | GenerationResult:
    """One-image question answering: the function behind ``emma-mamba generate``. ``image`` is a path, a PIL
    image or an array; ``streamer`` receives the answer text as it is produced. Returns the answer (with
    ``return_result`` the whole :class:`~emma_mamba.inference.generate.GenerationResult`: token ids, finish
    reason, timings). ``config`` (a :class:`GenerationConfig`) overrides ``max_new_tokens``/``temperature`` with
    every sampling option; it ends where the model's answers end (:meth:`EmmaMamba.stops`). ``template``: another
    chat template than the model's (``config.chat``)."""
    from emma_mamba.inference.generate import GenerationConfig

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if model.config.image_token in prompt:  # as the chat and the CLI say it
        raise ValueError(f"answer: the prompt holds {model.config.image_token!r}, the model's image placeholder: that "
                         f"text is reserved; the image enters where the chat format puts it")
    text = model.build_prompt(prompt, 1, template)
    cfg = model.stops(GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature)
                      if config is None else config)
    instructions = [prompt] if model.instruction is not None else None
    result = model.generate(text, [image], instructions, config=cfg, streamer=streamer)
    return result if return_result else result.texts[0]
