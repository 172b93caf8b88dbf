"""Training configuration: one ``RunConfig`` per run, read strictly from YAML plus dotted command-line overrides.

A run YAML (``configs/train_*.yaml``) has the sections below; every key must name a field (an unknown key or a
value of the wrong type is an error naming the key, its dotted path and the file or ``command line``)::

    stage: pretrain | finetune        # must match the command (emma-mamba pretrain / finetune)
    output_dir: runs/tiny_stage1
    model: tiny                       # a preset name, a model YAML path, or a mapping {preset: ..., lm: {...}}
    init_from: null                   # a checkpoint dir (EmmaMamba.save layout); then `model` must be omitted
    data:  {json: ..., image_folder: ..., max_length: ..., packing: ..., on_error: raise | skip, ...}
    train: {lr: ..., epochs: ..., global_batch_size: ..., micro_batch_size: ..., ...}
    val:   {json: ..., every_steps: ..., max_samples: ...}   # optional validation loss on held-out data
    parallel: {strategy: auto | none | ddp | fsdp, timeout_minutes: ..., ...}
    checkpoint: {every_steps: ..., keep_last: ..., format: full|sharded, async_save: false}
    log: {every_steps: ..., jsonl: ..., tensorboard: ..., progress_bar: ..., wandb: ..., peak_tflops: ...}
    profile: {steps: 0, start_step: 3, ...}   # torch.profiler traces of chosen steps (off by default)

Command-line overrides use the same dotted paths (``--train.lr 2e-5``, ``--data.packing true``,
``--model.lm.d_state 16``); values are parsed as YAML scalars/flow lists (plus plain floats such as ``2e-5``,
which YAML 1.1 would read as a string) and validated exactly like YAML keys, each key once. The model section is
the model's own strict config (:mod:`emma_mamba.config`), its errors naming the full key (``model.lm.d_model``).
The fully resolved config is written next to every checkpoint as ``train_config.yaml`` (and the model's as
``config.yaml``), so a checkpoint directory describes itself.

Batch sizes count *rows*: a row is one sample when padding, or several samples packed into ``max_length``
tokens when ``data.packing`` is on. ``global_batch_size = micro_batch_size * grad_accum * world_size``; the
accumulation steps are derived, so the same YAML runs on any number of processes with the same global batch.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from emma_mamba.config import (CHAT_TEMPLATE, TURN_END, TURN_SEP, ChatConfig, ConfigError, ModelConfig,
                               apply_overrides, check_field_types, check_prompt_template, config_from_dict,
                               config_to_dict, field_type, float_fields, get_preset, load_config, parse_cli_value,
                               read_yaml_mapping, resolve_config_path, yaml_float)

__all__ = ["DataConfig", "LoraConfig", "TrainConfig", "ValConfig", "ParallelConfig", "CheckpointConfig", "LogConfig",
           "ProfileConfig", "RunConfig", "load_run_config", "run_config_from_dict", "save_run_config", "run_config_to_dict",
           "parse_cli_value", "dotted_fields", "resolve_chat_format"]


@dataclass
class DataConfig:
    json: str | None = None
    """LLaVA-format training file: a JSON list of {id, image, conversations} records, or JSONL (one per line)."""
    image_folder: str | None = None
    """Folder the records' ``image`` paths are relative to (null: relative to the JSON file's folder)."""
    sources: list[dict] | None = None
    """Several training files mixed into one data set, instead of data.json: a list of {json, image_folder
    (null: data.image_folder, else the file's folder), repeat (default 1)}. repeat 2 takes a file's records
    twice per epoch, 0.25 a fixed seeded quarter of them (the same ones every epoch and run); the mixture is
    shuffled (and packed) as one."""
    max_length: int = 2048
    """Most tokens per sample (and per packed row), visual tokens included; longer samples are truncated
    (counted and logged; never inside an image's visual tokens)."""
    packing: bool = False
    """Pack several samples into each row of max_length tokens (seq_idx resets the scan at each boundary)
    instead of padding every sample to the longest of its batch. A step is ``train.global_batch_size`` rows
    either way: packed, it holds several times as many samples (``emma-mamba data check`` says how many)."""
    group_by_length: bool = True
    """Without packing: a step's samples (the same ones either way) go to its micro-batches by length, longest
    first, so that each pads to little more than its own samples (LLaVA's ``group_by_length``, within one step:
    the step's objective is unchanged). false: micro-batches in the shuffled order."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad record (missing/corrupt image, empty conversation, no assistant turn, wrong role, placeholder/image
    mismatch, nothing left after truncation): raise an error naming file and record index, or skip and count it."""
    prompt_template: str = CHAT_TEMPLATE
    """Chat template of one user turn, ``{prompt}`` is the human text (default: mamba-2.8b-zephyr's, the one
    inference uses by default: emma_mamba.config.CHAT_TEMPLATE). Another template (or turn_end / turn_sep) is
    written into the model the run saves (``model.chat``), and generate, chat, serve and eval prompt with it; left
    at the defaults, the model's own chat format (an init_from model's) is the data's."""
    turn_end: str = TURN_END
    """Appended to every assistant answer; trained on (the model learns to stop)."""
    turn_sep: str = TURN_SEP
    """Between an answer's turn_end and the next user turn (not trained on)."""
    num_workers: int = 0
    """DataLoader worker processes decoding images (0: in the training process)."""
    image_cache_mb: int = 0
    """Keep up to this many MB of decoded, preprocessed images in memory (per process: each DataLoader worker
    holds its own), so that a small data set is decoded once instead of every epoch. The first images seen are
    kept until the budget is spent (no eviction: an epoch-order scan over a larger set would otherwise miss on
    every access). 0 = off."""


@dataclass
class LoraConfig:
    r: int = 0
    """Rank of the LoRA adapters on the LM's mixer projections (0: off, the LM trains fully when trained). With
    r > 0 the LM's own weights are frozen and only the adapters train (emma_mamba.models.lora); the run still
    writes plain merged models. LLaVA-1.5's LoRA recipe: r 128, alpha 256, lr 2e-4."""
    alpha: float | None = None
    """Scaling numerator: the adapter adds alpha / r * B @ A (null: 2 * r, LLaVA's choice)."""
    targets: list[str] | None = None
    """Mixer projections that get an adapter, from in_proj, x_proj, dt_proj, out_proj (a Mamba-2 LM has in_proj
    and out_proj only); null: the LM's default, written out when the config is read: in_proj, x_proj, out_proj
    for a Mamba-1 LM (model.lm.ssm_layer mamba1), in_proj, out_proj for a Mamba-2 LM."""
    dropout: float = 0.0
    """LoRA dropout on the adapters' inputs in training (peft's lora_dropout; LLaVA-1.5's recipe: 0.05). It
    reaches the in_proj and out_proj adapters, which act on activations; x_proj and dt_proj adapters are merged
    into the fused mixer op's weights, so dropout > 0 with those targets is refused."""
    train_embeddings: bool = False
    """Also train the LM's token embedding (and its head, tied or not) fully, as peft's modules_to_save: for
    tokens the pretrained LM never learned (a new vocabulary, added tokens); +vocab x d_model trained
    parameters."""
    base_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype of the frozen weights under the adapters: bf16 halves them (at 2.8B, 5 GB instead of 10 GB by
    parameter count); the adapters, their merge and the written model stay fp32."""


@dataclass
class TrainConfig:
    lr: float = 2e-5
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """LR schedule after the linear warmup."""
    warmup_ratio: float = 0.03
    """Linear warmup length as a fraction of the total steps (ignored when warmup_steps is set)."""
    warmup_steps: int | None = None
    """Linear warmup length in optimizer steps (overrides warmup_ratio)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices; never on A_log, D, norms, biases or other 1-D parameters."""
    decay_embeddings: bool = True
    """Whether the (tied) token embedding matrix is decayed (as nanoGPT and HF Trainer do)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derive from epochs."""
    global_batch_size: int = 128
    """Rows per optimizer step over all processes (micro_batch_size x grad_accum x world_size)."""
    micro_batch_size: int = 4
    """Rows per forward/backward on one process."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is logged either way)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (GPU) or fp32; auto = bf16 on a GPU that supports it, fp32 on the CPU."""
    gradient_checkpointing: bool = False
    """Recompute each Mamba block's activations (and an unfrozen ViT's blocks') in the backward pass (saves memory,
    costs ~1 forward)."""
    mixer_recompute: bool = True
    """Each Mamba mixer's backward recomputes its conv output, delta and scan output instead of keeping them
    (ops.mamba_inner, as mamba-ssm's fast path does): per layer 2 kept (batch, d_inner, seqlen) activations
    instead of 5-6, for one more depthwise conv and a small GEMM (a few % of the layer; the scan's backward
    recomputes its output anyway). false keeps them. Mamba-1 mixers only: a Mamba-2 LM (lm.ssm_layer mamba2) keeps
    its activations (use train.gradient_checkpointing to trade them for recomputation)."""
    compile: bool = False
    """torch.compile each Mamba block of the LM (one graph per block shape, shared by all blocks; the scan and
    conv kernels sit in it as custom ops): fuses the norms, gates, casts and residual adds around the kernels.
    The first steps (and the first of each new sequence length, until shapes go dynamic) take longer. Under
    FSDP only each block's mixer is compiled, so FSDP's hooks stay outside the graphs."""
    compile_backend: str = "inductor"
    """torch.compile backend for train.compile: inductor (generated kernels), aot_eager (traces, no codegen)."""
    seed: int = 0
    """Seeds model init, data order (per epoch) and every RNG; the run is a pure function of config and data."""
    lr_multipliers: dict = field(default_factory=dict)
    """Per-module learning-rate multipliers, e.g. {vision: 0.1} for an unfrozen ViT or {projector: 10}; keys from
    vision, mff, instruction, projector, lm, align_head; each module's peak lr is lr x its multiplier (1 for the
    others) and follows the same warmup and schedule."""
    trainable: list[str] | None = None
    """Modules trained in this run, from: vision, mff, instruction, projector, lm, align_head. null = the
    stage's default (pretrain: mff, instruction, projector; finetune: also lm and align_head, and vision when
    model.vision.freeze is false). E.g. a from-scratch LM can also be trained on stage-1 captions; vision needs
    model.vision.freeze false. The CLIP text tower of instruction fusion is never trained."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA fine-tuning of the LM (train.lora.r > 0): see LoraConfig."""


@dataclass
class ParallelConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto = DDP under torchrun with >1 process, else none; fsdp = FSDP2 fully_shard (per Mamba block)."""
    find_unused_parameters: bool = True
    """DDP: tolerate trainable parameters unused in a step (text-only batches skip the vision bridge)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after the forward (ZeRO-3) rather than keeping them (ZeRO-2)."""
    timeout_minutes: float | None = None
    """How long a process waits in a collective (a step's all-reduce, a checkpoint's barrier) for the others before
    it fails: the process group's timeout (init_process_group's). null: torch's default (10 minutes with NCCL, 30
    with gloo). Longer where a process may be busy alone for longer (writing a large checkpoint to a slow disk)."""


@dataclass
class ValConfig:
    json: str | None = None
    """Held-out LLaVA-format file (JSON or JSONL, like data.json) to compute a validation loss on; null = no
    validation. Read with data's max_length, packing, prompt template, on_error and image cache."""
    image_folder: str | None = None
    """Folder its records' image paths are relative to (null: the file's folder)."""
    every_steps: int = 0
    """Validate every N optimizer steps (0: only after the last step); always after the last step."""
    max_samples: int = 0
    """Validate on the first N samples of the file only (0 = all of them)."""
    micro_batch_size: int | None = None
    """Rows per validation forward (null: train.micro_batch_size)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Write a checkpoint every N optimizer steps (0 = only the final model)."""
    keep_last: int = 0
    """Keep only the newest N step checkpoints (0 = keep all)."""
    format: Literal["full", "sharded"] = "full"
    """Step checkpoints' layout. full: one model.safetensors + the optimizer state in trainer_state.pt, gathered
    to rank 0 under FSDP. sharded: torch.distributed.checkpoint (DCP) files in state/, every rank writing its own
    shards (nothing gathered: for FSDP runs of large models). Both resume on any number of processes under any
    strategy, and emma_mamba.load / init_from / eval read both; the final model is always written full."""
    async_save: bool = False
    """sharded only: each rank copies its shards to host memory (one copy of its model and optimizer state) and
    training goes on while a background thread writes them (torchtitan's async mode); the step directory appears
    when every shard and the metadata are on disk. The next checkpoint, the end of the run and an interruption
    wait for it."""


@dataclass
class LogConfig:
    every_steps: int = 1
    """Write metrics every N optimizer steps."""
    jsonl: bool = True
    """Metrics to output_dir/metrics.jsonl (one JSON object per line)."""
    tensorboard: bool = True
    """Metrics to output_dir/tensorboard when the tensorboard package is installed."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    wandb: str | None = None
    """Weights & Biases project to log the same metrics to (rank 0; needs `pip install wandb`; WANDB_MODE=offline
    works without network); the run is named after output_dir and a resumed run continues the same W&B run.
    null = off."""
    peak_tflops: float | None = None
    """One device's peak TFLOPS for the mfu metric (model FLOPs per second per process / this). null: the dense
    bf16 peak of a known GPU (H100, H200, A100, L40S, L40, L4; half of it for an fp32 run), none on a CPU or an
    unknown GPU (then only tflops is logged)."""


@dataclass
class ProfileConfig:
    steps: int = 0
    """Profile this many optimizer steps with torch.profiler (0 = off): per rank, a Chrome / Perfetto trace
    (output_dir/profile/rank{r}_steps{a}-{b}.json; open it at ui.perfetto.dev or chrome://tracing) and a table of
    the ops that took the most time (..._ops.txt). Profiled steps run slower: their metrics say profiled: true."""
    start_step: int = 3
    """The first profiled step, as numbered in metrics.jsonl (later than the first steps, whose allocations,
    compilation and caches are not the steady state)."""
    record_shapes: bool = False
    """Record each op's input shapes (the table is then grouped by shape too)."""
    with_stack: bool = False
    """Record the Python stack of each op (larger traces)."""
    memory: bool = False
    """Also a CUDA memory snapshot of the profiled steps (rank{r}_steps{a}-{b}_memory.pickle, for
    pytorch.org/memory_viz); CUDA only (warned and skipped on a CPU run)."""


@dataclass
class RunConfig:
    stage: Literal["pretrain", "finetune"] = "pretrain"
    """pretrain: train MFF, projector, instruction fusion; finetune: also the LM and the alignment head
    (train.trainable overrides the modules)."""
    output_dir: str = "runs/default"
    """Where checkpoints, metrics and the final model go."""
    model: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    """The model (a preset name, a model YAML path, or a mapping of model config keys)."""
    init_from: str | None = None
    """Start from this checkpoint directory (EmmaMamba.save layout, e.g. a stage-1 output_dir)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed strategy."""
    val: ValConfig = field(default_factory=ValConfig)
    """Validation loss on held-out data (val.json), logged with the training metrics."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and progress."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler traces of chosen training steps (off by default)."""

    def validate(self, source: str = "<config>") -> "RunConfig":
        """Checks every field's type (a config built in code too; the model section's types included) and the
        run's cross-field rules; returns self. The model's own cross-field rules are :meth:`ModelConfig.validate`'s
        (``model.*`` paths)."""
        def bad(msg):
            raise ConfigError(f"{source}: {msg}")

        try:
            check_field_types(self)
        except ConfigError as e:
            bad(str(e))

        # the numbers of free-form mappings (no field type to coerce them): 1e-1 is text to YAML 1.1, a number here
        self.train.lr_multipliers = {k: yaml_float(v) for k, v in self.train.lr_multipliers.items()}
        for e in self.data.sources or ():
            if isinstance(e, dict) and "repeat" in e:
                e["repeat"] = yaml_float(e["repeat"])
        for key, v in float_fields(self):  # NaN passes every comparison below (nan <= 0 is False): refuse it first
            if not math.isfinite(v):
                bad(f"{key} must be a finite number, got {v}")
        t, d = self.train, self.data
        if not self.output_dir.strip():
            bad("output_dir is empty: the folder the run writes its checkpoints and metrics to is required")
        if d.sources is not None:
            if d.json:
                bad("give data.json (one file) or data.sources (several), not both")
            _check_sources(d.sources, bad)
        elif not d.json:
            bad("data.json: the training file is required (a LLaVA-format JSON or JSONL; or data.sources, a list of "
                "them)")
        if d.max_length < 2:
            bad(f"data.max_length must be >= 2, got {d.max_length}")
        try:
            check_prompt_template(d.prompt_template, "data.prompt_template")
        except ConfigError as e:
            bad(str(e))
        if not d.turn_end:
            bad("data.turn_end must not be empty: it ends every answer, and generation stops at it")
        if d.num_workers < 0:
            bad(f"data.num_workers must be >= 0, got {d.num_workers}")
        if d.image_cache_mb < 0:
            bad(f"data.image_cache_mb must be >= 0, got {d.image_cache_mb}")
        if t.lr <= 0:
            bad(f"train.lr must be > 0, got {t.lr}")
        if not -SEED_LIMIT <= t.seed <= SEED_LIMIT:  # (a bool or a non-integer is refused by type already)
            bad(f"train.seed must be between -2**43 and 2**43 (each epoch's data order is seeded with seed * "
                f"1000003 + epoch, a 64-bit integer), got {t.seed}")
        if not 0 <= t.min_lr_ratio <= 1:
            bad(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        if not 0 <= t.warmup_ratio < 1:
            bad(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if t.warmup_steps is not None and t.warmup_steps < 0:
            bad(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
        if t.weight_decay < 0:
            bad(f"train.weight_decay must be >= 0, got {t.weight_decay}")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            bad(f"train.betas must be two numbers in [0, 1), got {t.betas}")
        if not t.eps > 0:
            bad(f"train.eps must be > 0 (AdamW's denominator term), got {t.eps}")
        if t.max_steps < 0:
            bad(f"train.max_steps must be >= 0 (0: train.epochs decides), got {t.max_steps}")
        if t.max_steps == 0 and t.epochs <= 0:
            bad(f"train: set max_steps > 0 or epochs > 0 (got max_steps={t.max_steps}, epochs={t.epochs})")
        if t.micro_batch_size < 1 or t.global_batch_size < 1:
            bad(f"train.micro_batch_size and train.global_batch_size must be >= 1, got "
                f"{t.micro_batch_size} and {t.global_batch_size}")
        if t.global_batch_size % t.micro_batch_size:  # (grad_accum checks the world size's part at the start)
            bad(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x world size")
        if t.grad_clip < 0:
            bad(f"train.grad_clip must be >= 0, got {t.grad_clip}")
        if t.lr_multipliers:
            from emma_mamba.models.vlm import TRAINABLE_MODULES

            for k, v in t.lr_multipliers.items():
                if k not in TRAINABLE_MODULES:
                    bad(f"train.lr_multipliers: unknown module {k!r}; valid: {', '.join(TRAINABLE_MODULES)}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    bad(f"train.lr_multipliers.{k}: expected a number > 0, got {v!r}")
        if t.trainable is not None:
            from emma_mamba.models.vlm import TRAINABLE_MODULES

            unknown = [m for m in t.trainable if m not in TRAINABLE_MODULES]
            if unknown or not t.trainable or len(set(t.trainable)) != len(t.trainable):
                bad(f"train.trainable must be a non-empty list of distinct module names from "
                    f"{', '.join(TRAINABLE_MODULES)} (or null for the stage's default), got {t.trainable}")
            m = self.model
            absent = {"vision": "model.vision.freeze is true (set it to false to train the ViT)",
                      "instruction": "model.instruction.enabled is false (the model has no instruction fusion)",
                      "align_head": "model.align.enabled is false (the model has no alignment head)"}
            on = {"vision": not m.vision.freeze, "instruction": m.instruction.enabled, "align_head": m.align.enabled}
            for name in t.trainable:
                if name in absent and not on[name]:
                    bad(f"train.trainable lists {name} but {absent[name]}")
        lo = t.lora
        if lo.r < 0:
            bad(f"train.lora.r must be >= 0 (0: off), got {lo.r}")
        if lo.alpha is not None and not lo.alpha > 0:
            bad(f"train.lora.alpha must be > 0 (or null for 2 * r), got {lo.alpha}")
        if lo.r:
            from emma_mamba.models.lora import check_targets
            from emma_mamba.models.vlm import STAGES

            arch = self.model.lm.ssm_layer
            try:  # null: the LM's own projections, spelled out in the resolved config
                lo.targets = check_targets(lo.targets, arch)
            except ValueError as e:
                bad(str(e))
            if not 0.0 <= lo.dropout < 1.0:
                bad(f"train.lora.dropout must be in [0, 1), got {lo.dropout}")
            from emma_mamba.models.lora import ACTIVATION_SPACE

            merged_only = [x for x in lo.targets if x not in ACTIVATION_SPACE]
            if lo.dropout > 0 and merged_only:
                bad(f"train.lora.dropout acts on the in_proj and out_proj adapters only: {', '.join(merged_only)} "
                    f"adapters are merged into the fused mixer op's weights, where no dropout can act; set "
                    f"train.lora.targets to [in_proj, out_proj] or train.lora.dropout to 0")
            trained = t.trainable if t.trainable is not None else STAGES[self.stage]
            if "lm" not in trained:
                bad(f"train.lora adapts the LM, which this run does not train (stage {self.stage}, train.trainable "
                    f"{t.trainable}); use stage finetune or list lm in train.trainable")
        v = self.val
        if v.every_steps < 0 or v.max_samples < 0:
            bad(f"val.every_steps and val.max_samples must be >= 0, got {v.every_steps} and {v.max_samples}")
        if v.micro_batch_size is not None and v.micro_batch_size < 1:
            bad(f"val.micro_batch_size must be >= 1 (or null), got {v.micro_batch_size}")
        if v.json is None and (v.every_steps or v.max_samples):
            bad(f"val.every_steps / val.max_samples are set ({v.every_steps} / {v.max_samples}) but val.json (the "
                f"validation file) is not; to run without validation set them to 0 too (--val.every_steps 0 "
                f"--val.max_samples 0)")
        if self.parallel.timeout_minutes is not None and not self.parallel.timeout_minutes > 0:
            bad(f"parallel.timeout_minutes must be > 0 (or null for torch's default), got "
                f"{self.parallel.timeout_minutes}")
        if self.checkpoint.every_steps < 0 or self.checkpoint.keep_last < 0:
            bad("checkpoint.every_steps and checkpoint.keep_last must be >= 0")
        if self.log.peak_tflops is not None and not self.log.peak_tflops > 0:
            bad(f"log.peak_tflops must be > 0 (or null), got {self.log.peak_tflops}")
        if self.checkpoint.async_save and self.checkpoint.format != "sharded":
            bad("checkpoint.async_save needs checkpoint.format: sharded (the full format gathers to rank 0)")
        if self.log.every_steps < 1:
            bad(f"log.every_steps must be >= 1, got {self.log.every_steps}")
        if self.profile.steps < 0 or self.profile.start_step < 1:
            bad(f"profile.steps must be >= 0 and profile.start_step >= 1, got {self.profile.steps} and "
                f"{self.profile.start_step}")
        return self

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per process per optimizer step; errors unless the global batch divides evenly."""
        per = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % per:
            raise ConfigError(f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.train.micro_batch_size}) x world size ({world_size})")
        return self.train.global_batch_size // per


SEED_LIMIT = 2 ** 43
"""|train.seed| at most this: each epoch's data order is seeded with seed * 1000003 + epoch (``plan_rows``), which
torch's generator takes as a 64-bit integer."""

_SOURCE_KEYS = ("json", "image_folder", "repeat")
MAX_REPEAT = 1000  # a file's data.sources repeat (beyond it the epoch's index list alone outgrows memory)


def _check_sources(sources: list, bad) -> None:
    if not sources:
        bad("data.sources must list at least one {json, image_folder, repeat} mapping (or be null)")
    for i, e in enumerate(sources):
        where = f"data.sources[{i}]"
        unknown = sorted(set(e) - set(_SOURCE_KEYS))
        if unknown:
            bad(f"{where}: unknown key(s) {unknown}; valid: {', '.join(_SOURCE_KEYS)}")
        if not isinstance(e.get("json"), str) or not e["json"]:
            bad(f"{where}.json: the file's path is required (a string), got {e.get('json')!r}")
        if e.get("image_folder") is not None and not isinstance(e["image_folder"], str):
            bad(f"{where}.image_folder: expected a path or null, got {e['image_folder']!r}")
        rep = e.get("repeat", 1.0)
        if isinstance(rep, bool) or not isinstance(rep, (int, float)) or not 0 < rep <= MAX_REPEAT:
            bad(f"{where}.repeat: expected a number > 0 and at most {MAX_REPEAT} (its records per epoch as a "
                f"multiple of their number; train.epochs repeats the whole mixture), got {rep!r}")


# ---------------------------------------------------------------------------------------------- loading

def _model_from_value(value, source: str, base_dir: Path | None, validate: bool = True) -> ModelConfig:
    """`model:` is a preset name, a model YAML path, or a mapping of model keys (with optional `preset`).
    ``validate=False``: keys and types only (``--model.*`` options still apply)."""
    if isinstance(value, ModelConfig):
        return copy.deepcopy(value)
    if isinstance(value, dict):  # keys named by their path in the run config: model.lm.d_model
        return config_from_dict(value, source=source, path="model", validate=validate)
    if isinstance(value, str):
        from emma_mamba.config import PRESETS

        if value in PRESETS:
            return get_preset(value)
        for cand in ([base_dir / value] if base_dir is not None else []) + [Path(value)]:
            if cand.is_file():
                return load_config(cand, validate)
        try:  # a shipped model YAML by name (configs/model_tiny.yaml, model_tiny)
            return load_config(resolve_config_path(value), validate)
        except ConfigError:
            pass
        raise ConfigError(f"{source}: model: {value!r} is neither a preset ({', '.join(PRESETS)}) nor a model "
                          f"YAML file")
    raise ConfigError(f"{source}: model: expected a preset name, a YAML path or a mapping, got "
                      f"{type(value).__name__}")


INIT_FROM_MODEL_KEYS = ("vision.freeze", "align.loss_weight")
"""Model keys that a run starting from ``init_from`` may still set (how the model trains, not what it is)."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_config_from_dict(d: dict, *, source: str = "<dict>", overrides: dict | None = None,
                         override_source: str = "overrides", base_dir: Path | None = None,
                         model: str | None = None) -> RunConfig:
    """A validated RunConfig from a YAML-shaped dict and optional nested overrides (both strict). ``model`` (a
    preset name or a model YAML path, the command line's ``--model``) replaces the dict's model before the
    ``model`` section of the overrides applies."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of config keys, got {type(d).__name__}")
    d = copy.deepcopy(d)
    overrides = copy.deepcopy(overrides or {})
    cfg = RunConfig()
    model_value = d.pop("model", None)
    model_over = overrides.pop("model", None)
    apply_overrides(cfg, d, source=source)
    apply_overrides(cfg, overrides, source=override_source)
    if cfg.init_from is not None:
        ckpt_cfg = Path(cfg.init_from) / "config.yaml"
        init = Path(cfg.init_from)
        if init.is_file() and (init.parent / "config.yaml").is_file():  # a file of a model directory
            raise ConfigError(f"{source}: init_from: {cfg.init_from} is a file; give its directory: "
                              f"{init.parent}")
        if not init.is_dir():
            raise ConfigError(f"{source}: init_from: {cfg.init_from}: no such directory (the stage-1 run's "
                              f"output_dir, or a directory written by EmmaMamba.save: has it run yet?)")
        if not ckpt_cfg.is_file():
            from emma_mamba.training.checkpoint import latest_checkpoint
            from emma_mamba.training.trainer import LOCK_FILE

            last = latest_checkpoint(init)
            hint = (f"; it holds checkpoints but no final model (the run did not finish): --resume auto finishes "
                    f"it, or start from its newest checkpoint, init_from: {last}" if last is not None else "")
            left = {p.name for p in init.iterdir()} - {LOCK_FILE, "train_config.yaml", "metrics.jsonl"}
            if last is None and not left:  # what a run that stopped at its start leaves (its lock, its config)
                hint = "; it holds no model: the run into it stopped before its first checkpoint (its error above?)"
            raise ConfigError(f"{source}: init_from: {cfg.init_from} has no config.yaml (expected a directory "
                              f"written by EmmaMamba.save or a previous run's output_dir){hint}")
        cfg.model = load_config(ckpt_cfg)
        if model_value is not None:  # allowed only when it says the same (a resolved train_config.yaml does),
            given = _model_from_value(model_value, source, base_dir)  # but for how it trains (INIT_FROM_MODEL_KEYS)
            for key in INIT_FROM_MODEL_KEYS:
                section, name = key.split(".")
                setattr(getattr(cfg.model, section), name, getattr(getattr(given, section), name))
            if given != cfg.model:
                diff = [f.name for f in dataclasses.fields(given) if getattr(given, f.name) != getattr(cfg.model, f.name)]
                raise ConfigError(f"{source}: give either `model` or `init_from` (the model config then comes from "
                                  f"{ckpt_cfg}), not both; they differ in: {', '.join(diff)}")
    # the model's own validation waits for the --model.* options (they may correct a value of the file's)
    later = model_over is not None
    origin = None  # what gave the model before the options: (value, source, base_dir), re-read for its error
    if model_value is not None and cfg.init_from is None:
        if model is None:  # replaced by --model: only its keys and types count
            origin = (model_value, source, base_dir)
        cfg.model = _model_from_value(model_value, source, base_dir, validate=not (later or model is not None))
    if model is not None:
        if cfg.init_from is not None:
            raise ConfigError(f"{override_source}: --model cannot replace a model loaded by init_from "
                              f"({cfg.init_from})")
        origin = (model, override_source, None)
        cfg.model = _model_from_value(model, override_source, None, validate=not later)
    if model_over is not None:
        if cfg.init_from is not None:
            flat = _flatten(model_over)
            other = sorted(k for k in flat if k not in INIT_FROM_MODEL_KEYS)
            if other:
                raise ConfigError(f"{override_source}: --model.{other[0]} cannot change a model loaded by init_from "
                                  f"({cfg.init_from}); only how it trains can: "
                                  f"{', '.join('model.' + k for k in INIT_FROM_MODEL_KEYS)}")
        apply_overrides(cfg.model, model_over, path="model", source=override_source)
        try:
            cfg.model.validate("model")  # the keys as typed: --model.lm.d_model, not lm.d_model
        except ConfigError as e:
            if origin is not None:  # invalid before the options too: said as that file / section says it
                _model_from_value(*origin)
            raise ConfigError(f"{override_source}: {e}") from None
    # a value that fails validation may come from either: name both when options were given
    given = set(overrides) - {"stage"} or model_over or model
    opts = override_source if override_source == "overrides" else f"{override_source} options"
    return cfg.validate(f"{source} with the {opts}" if given else source)


def load_run_config(path: str | Path, overrides: dict | None = None, *, model: str | None = None,
                    override_source: str = "overrides") -> RunConfig:
    """Reads a run YAML (``yaml.safe_load``) strictly, then applies nested ``overrides`` (named
    ``override_source`` in errors). ``path`` may name a shipped recipe
    (:func:`emma_mamba.config.resolve_config_path`); ``model`` replaces its model (a preset name or a model YAML
    path)."""
    path = resolve_config_path(path, "run config")
    return run_config_from_dict(read_yaml_mapping(path), source=str(path), overrides=overrides,
                                override_source=override_source, base_dir=path.parent, model=model)


def resolve_chat_format(cfg: RunConfig) -> None:
    """One chat format for the run, which its data is laid out in and its model carries (``model.chat``, what
    inference prompts with): ``data.prompt_template`` / ``turn_end`` / ``turn_sep`` when set to other than the
    defaults, else the model's own (an ``init_from`` model's, or a model config's ``chat``)."""
    d = cfg.data
    asked = ChatConfig(d.prompt_template, d.turn_end, d.turn_sep)
    if asked != ChatConfig():
        if cfg.model.chat not in (ChatConfig(), asked):
            logging.getLogger("emma_mamba.training").warning(
                "data.prompt_template / turn_end / turn_sep differ from the model's chat format (%s): the run trains "
                "on the data's, and the model it writes carries that", cfg.model.chat)
        cfg.model.chat = asked
    else:
        d.prompt_template, d.turn_end, d.turn_sep = (cfg.model.chat.prompt_template, cfg.model.chat.turn_end,
                                                     cfg.model.chat.turn_sep)


def run_config_to_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["model"] = config_to_dict(cfg.model)
    return d


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    """The fully resolved run config as YAML; ``load_run_config`` reads it back to an equal RunConfig."""
    import yaml

    Path(path).write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))


# ------------------------------------------------------------------------------------ command line

def dotted_fields(cls=RunConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, first docstring line) of every leaf field, for --help and argument registration."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:  # field docstrings (the string literal after each annotated field)
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
    except (OSError, TypeError, SyntaxError):
        pass
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.extend(dotted_fields(type(default), path + "."))
        else:
            out.append((path, docs.get(f.name, "")))
    return out


def overrides_from_pairs(pairs: list[tuple[str, str]]) -> dict:
    """[('train.lr', '2e-5'), ...] -> {'train': {'lr': 2e-05}}: each value read by
    :func:`emma_mamba.config.parse_cli_value` for its field's type (``--output_dir 2024`` is the folder '2024')."""
    out: dict = {}
    for key, text in pairs:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: --{key} conflicts with another override of {p}")
        node[parts[-1]] = parse_cli_value(text, field_type(RunConfig, key))
    return out
