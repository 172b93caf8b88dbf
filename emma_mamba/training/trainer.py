"""The training loop behind ``emma-mamba pretrain`` and ``emma-mamba finetune``.

One :class:`Trainer` runs one stage (:data:`emma_mamba.models.vlm.STAGES`): ``pretrain`` trains MFF,
instruction fusion and the projector with the ViT and the LM frozen (the model is built without the alignment
head, which stage 1 does not train); ``finetune`` also trains the LM and the alignment head, starting from
``init_from`` (a stage-1 output directory) or from the configured pretrained files (single-stage recipe).

Data order is a pure function of (seed, epoch, data): every rank computes the same plan of rows
(:func:`emma_mamba.data.llava.plan_rows`), each optimizer step takes the next ``global_batch_size`` rows
(wrapping around to the start of the epoch to fill the last step, logged), and rank r takes its contiguous
slice of them, ``grad_accum`` micro-batches of ``micro_batch_size`` rows. A resumed run recomputes the plan and
skips to the saved (epoch, step) position; nothing about the order lives in a sampler object.

Loss normalisation: the LM loss of a step is the mean over *all* answer tokens of the global batch and the
pixel loss the mean over all its images, whatever the split into processes and micro-batches (token and image
counts are all-reduced before the backward pass; each micro-batch's loss is scaled by its share, times the
world size that DDP/FSDP divide by). So 1 process x 4 micro-batches, 2 processes x 2 and padding vs packing
all optimise the same objective: ``lm + align.loss_weight * align``.

Metrics (rank 0, a line every ``log.every_steps`` steps averaging those steps, :func:`interval_record`; ``lr`` the
schedule's, ``train.lr`` times its factor, not a multiplied group's): ``lm_loss``, ``align_loss``, ``loss``, ``lr``,
``grad_norm`` (before clipping), ``tokens_per_s`` (real LM positions, visual tokens included, padding not,
per second of wall time including data loading), ``fill`` (real / computed positions), ``tflops`` (model FLOPs
per second per process, :mod:`emma_mamba.training.flops`) and ``mfu`` (that over the device's peak, when known),
sample/token counters and ``skipped_records``; to ``output_dir/metrics.jsonl`` and to TensorBoard when installed.

Validation (``val.json``, every ``val.every_steps`` steps and after the last step): the same losses over a
held-out LLaVA file in a fixed order (no gradients, the model in eval mode), normalised like the training loss
(the mean over all of its answer tokens and images, whatever the number of processes), plus ``val_token_acc``
(the fraction of answer tokens the LM's argmax predicts). Logged as their own ``metrics.jsonl`` records
(``step``, ``val_lm_loss``, ``val_align_loss``, ``val_loss``, ``val_token_acc``, ``val_label_tokens``,
``val_time``), ``emma-mamba plot`` draws them over the training curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from emma_mamba.config import ConfigError
from emma_mamba.data.llava import (DataError, LlavaDataset, check_data_paths, collate, group_by_length, plan_rows,
                                   steps_per_epoch)
from emma_mamba.fileio import text_lines
from emma_mamba.models.vlm import TRAINABLE_MODULES, stage_modules
from emma_mamba.training import TrainingError, TrainingInterrupted
from emma_mamba.training.checkpoint import (latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint,
                                            save_model_dir, write_failure)
from emma_mamba.training.config import RunConfig, resolve_chat_format, run_config_to_dict, save_run_config
from emma_mamba.training.optim import build_optimizer, build_scheduler
from emma_mamba.training.profiling import StepProfiler
from emma_mamba.training.parallel import (DistInfo, all_gather_object, all_reduce_sum, broadcast_object,
                                          clip_grad_norm, init_distributed, is_fsdp, lost_peer, no_grad_sync,
                                          resolve_strategy, sync_replicated_grads, wrap_model)

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)


class _MicroBatches(torch.utils.data.Dataset):
    """Item j = this rank's j-th micro-batch of the epoch from the start position, collated.

    Image errors are caught here (this may be a worker process) and returned in ``batch['errors']``; the
    training process applies ``data.on_error`` to them, so raise/skip behave the same with or without workers.
    """

    def __init__(self, dataset: LlavaDataset, micro_batches: list[list[list[int]]], pad_id: int, packing: bool):
        self.dataset, self.mbs, self.pad_id, self.packing = dataset, micro_batches, pad_id, packing

    def __len__(self) -> int:
        return len(self.mbs)

    def __getitem__(self, j: int) -> dict:
        rows, errors = [], []
        for row in self.mbs[j]:
            loaded = []
            for i in row:
                s = self.dataset.samples[i]
                try:
                    px = self.dataset.load_images(s) if s.images else None
                except DataError as e:
                    errors.append(e)
                    continue
                loaded.append((s, px))
            rows.append(loaded)
        if not any(rows):
            return {"empty": True, "errors": errors}
        batch = collate(rows, self.pad_id, self.packing, self.dataset.N)
        batch["errors"] = errors
        return batch


class Trainer:
    """Builds model, data, optimizer and (on resume) restores them; :meth:`fit` runs the stage."""

    def __init__(self, cfg: RunConfig, resume: str | None = None, device: str | None = None):
        # a config built or edited in code meets the rules a YAML file does (run_config_from_dict validated only
        # what came through it: a bad Literal value trained with the default, and the saved model did not load)
        if not isinstance(cfg, RunConfig):
            raise TypeError(f"Trainer expects a RunConfig (load_run_config / run_config_from_dict), got "
                            f"{type(cfg).__name__}")
        cfg.model.validate("model")
        cfg.validate("the run config")
        resolve_chat_format(cfg)
        self.cfg = cfg
        self.info: DistInfo = init_distributed(device, cfg.parallel.timeout_minutes)
        try:
            self._setup(cfg, resume)
        except BaseException:  # nothing will run: the folder's lock (taken early in _setup) is given back
            if self.info.is_main:
                _unlock_output_dir(Path(cfg.output_dir))
            raise

    def _setup(self, cfg: RunConfig, resume: str | None) -> None:
        """:meth:`__init__`'s work (the folder checked and locked first, then the model, data and optimizer)."""
        info = self.info
        self.output_dir = Path(cfg.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise FileExistsError(f"output_dir {self.output_dir} is a file, not a folder; choose another output_dir")
        # rank 0 decides what the run starts from and prepares the folder; the others take its outcome (an error
        # too: every rank raises it, none is left waiting) and check that they see that folder
        outcome = error = None
        if info.is_main:
            try:
                outcome = self._prepare_output_dir(resume)
            except Exception as e:
                if not info.distributed:
                    raise
                error = e
        if info.distributed:
            shared = broadcast_object(_picklable(error) if error is not None else outcome)
            if error is not None:
                raise error
            if isinstance(shared, BaseException):
                raise shared
            outcome = shared
        self.resume_from, probe = outcome
        if info.distributed:
            self._check_output_dir_shared(probe)
        if self.resume_from is not None:
            # before anything is built from the config: a model that differs is refused now, and the optimizer
            # settings the checkpoint's states hold are put back into cfg.train, so that the optimizer's parameter
            # groups are built from them (not from the values asked for, which the checkpoint's state would not fit)
            self._check_resume_config(self.resume_from)
        tc = cfg.train
        check_data_paths(cfg.data, cfg.val)  # a mistyped file or image folder: named now, not after the model
        cfg.grad_accum(info.world_size)  # so is a global batch this run's processes cannot split evenly
        if cfg.log.wandb and info.is_main:
            _require_wandb()  # before minutes of model building, not after
        _seed_everything(tc.seed)

        # ---- model
        from emma_mamba.models.vlm import EmmaMamba, load

        # the alignment head is built where it trains: stage 2 by default, or wherever train.trainable lists it (a
        # frozen head's loss would train the LM towards a fixed, e.g. random, decoder's pixels)
        for_training = "align_head" in tc.trainable if tc.trainable is not None else cfg.stage == "finetune"
        if (not for_training and cfg.stage == "finetune" and cfg.model.align.enabled
                and cfg.model.align.loss_weight > 0 and info.is_main):
            log.warning("train.trainable leaves out align_head: no alignment head is built and its loss "
                        "(model.align.loss_weight %g) is off in this run", cfg.model.align.loss_weight)
        if for_training and cfg.model.align.enabled and cfg.model.align.loss_weight == 0 and info.is_main:
            log.warning("model.align.loss_weight is 0: the alignment head is still built, run and trained (weight "
                        "decay only moves it); to leave it out, set model.align.enabled: false or leave align_head "
                        "out of train.trainable")
        if self.resume_from is not None and not tc.lora.r:
            # every weight comes from the checkpoint (loaded whole and strictly below): neither the pretrained files
            # nor init_from's model are read again (minutes and ~11 GB at 2.8B), nor are the pretrained files needed
            # where they have moved since; the tokenizer is the checkpoint's copy, the model config the run's (its
            # init_from's, with what the run may change). (LoRA's resume checks its frozen base weights against
            # the files it was built from.)
            from emma_mamba.models.tokenizer import load_tokenizer

            saved = self.resume_from / "tokenizer.json"
            self.model = EmmaMamba(cfg.model, for_training=for_training, device=info.device, load_pretrained=False,
                                   tokenizer=load_tokenizer(saved) if saved.is_file() else None)
        elif cfg.init_from is not None:
            self.model = load(cfg.init_from, for_training=for_training, device=info.device)
            # what the run config may still change (INIT_FROM_MODEL_KEYS): how the loaded model trains
            self.model.config.align.loss_weight = cfg.model.align.loss_weight
            self.model.config.vision.freeze = cfg.model.vision.freeze
            self.model.config.chat = dataclasses.replace(cfg.model.chat)  # the chat format this run trains, writes
            self.model.vision.set_frozen(cfg.model.vision.freeze)
        else:
            self.model = EmmaMamba(cfg.model, for_training=for_training, device=info.device)
        self.model.set_stage(cfg.stage, tc.trainable)
        if tc.lora.r:  # the LM's weights frozen, adapters on its mixers trained (emma_mamba.models.lora)
            from emma_mamba.models.lora import apply_lora

            apply_lora(self.model.lm, tc.lora.r, tc.lora.alpha if tc.lora.alpha is not None else 2.0 * tc.lora.r,
                       tc.lora.targets, torch.bfloat16 if tc.lora.base_dtype == "bf16" else None, tc.lora.dropout)
            if tc.lora.train_embeddings:
                self.model.lm.embeddings.requires_grad_(True)
                if self.model.lm.lm_head is not None:
                    self.model.lm.lm_head.requires_grad_(True)
        self.model.train()
        if tc.gradient_checkpointing:  # the LM's blocks, and an unfrozen ViT's (it kept every activation)
            self.model.set_gradient_checkpointing(True)
        self.model.lm.set_mixer_recompute(tc.mixer_recompute)
        cuda = info.device.type == "cuda"
        self.bf16 = tc.precision == "bf16" or (tc.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
        # model FLOPs per step for the tflops / mfu metrics (counted with this run's trainable parameters)
        from emma_mamba.training.flops import StepFlops, device_peak_tflops

        self.step_flops = StepFlops(self.model)
        self.peak_tflops = device_peak_tflops(info.device, self.bf16, cfg.log.peak_tflops)
        if info.is_main:
            sf = self.step_flops
            log.info("model FLOPs: %.3g per LM position + %.3g per labelled position (the LM head), %.3g per image "
                     "(forward + backward); mfu %s", sf.per_position - sf.per_head, sf.per_head, sf.per_image,
                     f"against {self.peak_tflops:g} TFLOPS per device" if self.peak_tflops else
                     "not logged (no known peak for this device: set log.peak_tflops)")
        self.strategy = resolve_strategy(cfg.parallel.strategy, info)
        if tc.compile:  # before the parallel wrapping (DDP and FSDP wrap the compiled blocks)
            from emma_mamba.ops._library import require_compile_backend

            try:
                require_compile_backend(tc.compile_backend, "train.compile_backend")
            except ValueError as e:  # a config value: printed by the CLI without a traceback
                raise ConfigError(str(e)) from None
            self.model.lm.compile_blocks(backend=tc.compile_backend, mixer_only=self.strategy == "fsdp")

        # ---- data
        n_vis = self.model.vision.num_tokens
        if cfg.data.max_length <= n_vis:
            raise ConfigError(f"data.max_length {cfg.data.max_length} is not more than one image's {n_vis} visual "
                              f"tokens: every sample with an image would be cut before its text (set it above "
                              f"{n_vis} + the longest conversation's tokens)")
        self.dataset = self._dataset(cfg.data)
        if len(self.dataset) == 0:
            raise DataError(f"no usable training records ({self.dataset.report.summary()})")
        self.val_dataset = self._val_dataset()
        self.accum = cfg.grad_accum(info.world_size)
        self.rows_per_step = tc.global_batch_size
        self._plans: dict[int, list[list[int]]] = {}
        self.total_steps = self._total_steps()
        from emma_mamba.training.optim import warmup_steps

        if warmup_steps(tc, self.total_steps) > self.total_steps and info.is_main:
            log.warning("train.warmup_steps %d is more than the run's %d steps: the learning rate never reaches "
                        "train.lr (%g)", warmup_steps(tc, self.total_steps), self.total_steps, tc.lr)

        # ---- parallel wrapping, optimizer, schedule
        self.wrapped = wrap_model(self.model, self.strategy, info, bf16=self.bf16,
                                  find_unused_parameters=cfg.parallel.find_unused_parameters,
                                  reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward)
        # text-only micro-batches (see EmmaMamba.modality_lockstep): under FSDP every process must give the same
        # parameters a gradient; with a frozen LM (stage 1) a text-only micro-batch (text-only records, or a
        # stand-in for one whose samples were all skipped) would otherwise reach no trainable parameter at all
        lm_frozen = not any(p.requires_grad for p in self.model.lm.parameters())
        self.model.modality_lockstep = self.strategy == "fsdp" or lm_frozen
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc, self.total_steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

        # ---- position and counters
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.counters = {"samples": 0, "tokens": 0, "positions": 0}
        self.history: list[dict] = []
        self._logged_upto = 0  # history[:_logged_upto] is in metrics.jsonl's lines (a line averages the steps after)
        self._unlogged: list[dict] = []  # a resumed run's steps since the last line, from its checkpoint
        self._pending_save = None  # an AsyncCheckpoint being written (checkpoint.async_save)
        self._stop_signal = None  # SIGINT / SIGTERM seen by this process (fit's handler)
        self._stop_agreed = False  # ... by any process, as of the last step's all-reduce
        self._warned_mfu = False
        self.val_history: list[dict] = []
        if self.resume_from is not None:
            self._restore(self.resume_from)
        if info.distributed:
            self._check_ranks_agree()
        n_train = sum(p.numel() for p in self.params)
        if info.is_main:
            rows = self.epoch_rows(self.epoch)  # packed: a row holds several samples, and so does a step
            per_row = len(self.dataset) / max(1, len(rows))
            log.info("stage %s: %s, %d trainable parameters, %d steps (global batch %d rows = %d x %d accum x %d "
                     "procs), %s, %s, %s", cfg.stage, cfg.model.name, n_train, self.total_steps, tc.global_batch_size,
                     tc.micro_batch_size, self.accum, info.world_size, self.strategy, "bf16" if self.bf16 else "fp32",
                     f"packing ({per_row:.2f} samples a row: ~{per_row * tc.global_batch_size:.0f} a step)"
                     if cfg.data.packing else
                     f"padding{' (micro-batches grouped by length)' if cfg.data.group_by_length else ''}")

    def _prepare_output_dir(self, resume: str | None) -> tuple[Path | None, str]:
        """Rank 0: what the run starts from (:func:`resolve_resume`: None, a fresh run, is refused where output_dir
        holds one; a checkpoint of the other stage is refused first), the folder made, checked writable (before
        minutes of model building) and locked. Returns (that checkpoint or None, the name of a probe file left in
        the folder for the other ranks to look for: :meth:`_check_output_dir_shared` removes it)."""
        resume_from = resolve_resume(resume, self.output_dir, self.cfg.stage)
        probe = self.output_dir / f".write_test_{os.getpid()}_{os.urandom(4).hex()}"
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe.touch()
        except OSError as e:
            raise ConfigError(f"output_dir {self.output_dir}: cannot write there ({e.strerror or e})") from None
        try:
            _lock_output_dir(self.output_dir)  # one run at a time in a folder (a second one is refused now)
            metrics = self.output_dir / "metrics.jsonl"
            if resume_from is None and resume == "auto" and metrics.is_file() and metrics.stat().st_size:
                # --resume auto found no checkpoint: a fresh run, whose metrics.jsonl would replace the old one's
                metrics.replace(metrics.with_name("metrics.jsonl.prev"))
                log.warning("--resume auto: no checkpoint to resume from; the earlier run's metrics.jsonl is kept "
                            "as metrics.jsonl.prev")
        except BaseException:
            probe.unlink(missing_ok=True)
            raise
        if not self.info.distributed:
            probe.unlink()
        return resume_from, probe.name

    def _check_output_dir_shared(self, probe: str) -> None:
        """Every rank must see the folder rank 0 prepared and the checkpoint it resumes from: on a node-local disk
        rank 0 resumed while another rank, seeing an empty folder, started afresh (trained wrong, then hung at the
        next checkpoint). Refused on every rank (an all-gather of what each sees), naming the rank and the path."""
        from emma_mamba.training.checkpoint import STATE_NAME

        def here(path: Path) -> str:  # a relative path is another folder on each node: said with this cwd
            return str(path) if path.is_absolute() else f"{path} (from {Path.cwd()})"

        problem = None
        deadline = time.monotonic() + _SHARED_FS_WAIT_S  # a network filesystem may show a new file late
        while not (self.output_dir / probe).is_file() and time.monotonic() < deadline:
            time.sleep(0.25)
        if not (self.output_dir / probe).is_file():
            problem = f"does not see the output_dir rank 0 prepared: {here(self.output_dir)} has no {probe}"
        elif self.resume_from is not None and not (self.resume_from / STATE_NAME).is_file():
            problem = f"does not see the checkpoint rank 0 resumes from: no {here(self.resume_from / STATE_NAME)}"
        seen = all_gather_object(problem)
        if self.info.is_main:
            (self.output_dir / probe).unlink(missing_ok=True)
        bad = [(r, p) for r, p in enumerate(seen) if p]
        if bad:
            r, p = bad[0]
            more = f" (so do ranks {', '.join(str(x) for x, _ in bad[1:])})" if len(bad) > 1 else ""
            raise ConfigError(f"rank {r} {p}{more}: output_dir must be on a filesystem every process can read (a "
                              f"shared one, not a node-local disk)")

    def _check_ranks_agree(self) -> None:
        """Every rank starts at the same step of the same data and run length: a rank that read other data files
        or another checkpoint would train its share of each step wrong, silently. Compared once (an all-gather),
        refused on every rank naming the first rank that differs from rank 0."""
        mine = {"resume step": self.global_step, "data hash": self.dataset.content_hash(),
                "total steps": self.total_steps}
        every = all_gather_object(mine)
        for r, theirs in enumerate(every):
            diff = [f"{k} {every[0][k]} on rank 0, {theirs[k]} on rank {r}" for k in mine if theirs[k] != every[0][k]]
            if diff:
                raise ConfigError(f"rank {r} differs from rank 0 ({'; '.join(diff)}): every process must read the "
                                  f"same data files, and output_dir must be on a filesystem every process can read")

    def _dataset(self, dcfg) -> LlavaDataset:
        return LlavaDataset.for_model(dcfg, self.model)

    def _val_dataset(self) -> LlavaDataset | None:
        v = self.cfg.val
        if v.json is None:
            return None
        ds = self._dataset(dataclasses.replace(self.cfg.data, json=v.json, image_folder=v.image_folder,
                                                   sources=None))
        if v.max_samples:
            ds.samples = ds.samples[:v.max_samples]
        if len(ds) == 0:
            raise DataError(f"{v.json} (val.json): no usable records ({ds.report.summary()})")
        return ds

    # ------------------------------------------------------------------------------------------- plan

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            d = self.cfg.data
            self._plans = {epoch: plan_rows(self.dataset.lengths, self.cfg.train.seed, epoch, d.packing,
                                            d.max_length)}
        return self._plans[epoch]

    def _steps_in_epoch(self, epoch: int) -> int:
        return steps_per_epoch(len(self.epoch_rows(epoch)), self.rows_per_step)

    def _total_steps(self) -> int:
        tc = self.cfg.train
        if tc.max_steps > 0:
            return tc.max_steps
        full = int(tc.epochs)
        total = sum(self._steps_in_epoch(e) for e in range(full))
        frac = tc.epochs - full
        if frac > 0:
            part = frac * self._steps_in_epoch(full)
            total += int(part)
            if part != int(part) and self.info.is_main:
                log.info("train.epochs %g: the last %g epoch is %d of its %d steps (rounded down)", tc.epochs, frac,
                         int(part), self._steps_in_epoch(full))
        return max(1, total)

    def _step_micro_batches(self, rows: list[list[int]], step: int, lengths=None) -> list[list[list[int]]]:
        """This rank's micro-batches (lists of rows) for ``step`` of an epoch whose plan is ``rows`` (``lengths``:
        the samples' lengths, read once per epoch by the caller; ``dataset.lengths`` builds its list anew)."""
        G, n = self.rows_per_step, len(rows)
        glob = [rows[(step * G + j) % n] for j in range(G)]  # the last step wraps around to fill itself
        mb, d = self.cfg.train.micro_batch_size, self.cfg.data
        if d.group_by_length and not d.packing:
            lengths = self.dataset.lengths if lengths is None else lengths
            return group_by_length(glob, lengths, mb, self.info.world_size)[self.info.rank]
        per = mb * self.accum
        mine = glob[self.info.rank * per:(self.info.rank + 1) * per]
        return [mine[j * mb:(j + 1) * mb] for j in range(self.accum)]

    def _loader(self, epoch: int, start: int, stop: int):
        rows = self.epoch_rows(epoch)
        if self.rows_per_step > len(rows) and self.info.is_main and start == 0:
            log.warning("epoch %d has %d rows, fewer than one global batch of train.global_batch_size %d rows: "
                        "every step repeats rows (a smaller global batch would not)", epoch, len(rows),
                        self.rows_per_step)
        elif stop * self.rows_per_step > len(rows) and self.info.is_main:
            log.info("epoch %d: the last step repeats %d rows from the start of the epoch to fill the global batch",
                     epoch, stop * self.rows_per_step - len(rows))
        lengths = self.dataset.lengths  # once: a list of every sample's (665K at LLaVA's scale), not per step
        mbs = [m for s in range(start, stop) for m in self._step_micro_batches(rows, s, lengths)]
        return self._data_loader(self.dataset, mbs)

    def _data_loader(self, dataset: LlavaDataset, micro_batches: list[list[list[int]]]):
        """Collated micro-batches of ``dataset`` in the given order (data.num_workers processes decode images)."""
        ds = _MicroBatches(dataset, micro_batches, self.model.tokenizer.pad_token_id, self.cfg.data.packing)
        nw = self.cfg.data.num_workers
        # its own generator: an iterator draws its workers' base seed from it, not from the global random state,
        # which the model's dropout (train.lora.dropout) draws from and a checkpoint restores; a resumed run, which
        # starts its iterator after restoring that state, would otherwise draw other dropout masks
        gen = torch.Generator().manual_seed(self.cfg.train.seed)
        return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=nw,
                                           pin_memory=self.info.device.type == "cuda", generator=gen,
                                           persistent_workers=False, prefetch_factor=4 if nw else None,
                                           worker_init_fn=_loader_worker_init if nw else None)

    # ------------------------------------------------------------------------------------------- step

    def _autocast(self):
        if self.bf16 and not is_fsdp(self.wrapped):  # FSDP2 casts through its MixedPrecisionPolicy instead
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, b: dict) -> dict:
        dev = self.info.device
        out = dict(b)
        for k in ("input_ids", "labels", "seq_idx", "pixel_values"):
            if out.get(k) is not None:
                out[k] = out[k].to(dev, non_blocking=True)
        if out.get("pixel_values") is not None and self.model.instruction is not None:
            out["instruction_ids"] = self.model.tokenize_instructions(out["instructions"]).to(dev)
        return out

    def _dummy_batch(self) -> dict:
        # a zero-weight text row (see _usable): keeps the collectives of every rank in step
        pad = self.model.tokenizer.pad_token_id
        ids = torch.full((1, 2), pad, dtype=torch.long)
        return {"input_ids": ids, "labels": torch.full_like(ids, -100), "seq_idx": None, "pixel_values": None,
                "image_counts": [0], "instructions": [], "sample_ids": ["<skipped>"], "num_samples": 0,
                "num_tokens": 0, "num_positions": 0, "num_label_tokens": 0, "num_images": 0}

    def _usable(self, b: dict | None, dataset: LlavaDataset, skipped: list | None = None) -> dict:
        """A loaded micro-batch with its image errors handed to data.on_error (raised, or logged and counted, the
        records counted now appended to ``skipped``); an empty one (every sample skipped) or none at all (a rank
        with fewer validation rows) becomes a zero-weight dummy row."""
        for err in b["errors"] if b is not None else ():
            new = dataset.report_issue(err)  # raises under on_error=raise
            if new is not None and skipped is not None:
                skipped.append(new)
        return self._dummy_batch() if b is None or b.get("empty") else b

    def _forward(self, b: dict):
        """The (wrapped) model on a batch already on the device."""
        return self.wrapped(input_ids=b["input_ids"], pixel_values=b["pixel_values"], labels=b["labels"],
                            instruction_ids=b.get("instruction_ids"), image_counts=b["image_counts"],
                            seq_idx=b["seq_idx"], sample_ids=b["sample_ids"], labelled_logits_only=True)

    def _align_weight(self) -> float:
        return self.model.config.align.loss_weight if self.model.align_head is not None else 0.0

    def _logged_lr(self) -> float:
        """The lr of the schedule itself (``train.lr`` times the schedule's factor) for this step's update: the
        first group's, divided by its ``train.lr_multipliers`` factor (every trained module may have one)."""
        g = self.optimizer.param_groups[0]
        module = g["names"][0].split(".", 1)[0] if g.get("names") else None
        mult = float(self.cfg.train.lr_multipliers.get(module, 1.0)) if module is not None else 1.0
        return self.scheduler.get_last_lr()[0] / (mult or 1.0)

    def train_step(self, micro_batches: list[dict]) -> dict:
        info, cfg = self.info, self.cfg
        skipped: list = []  # records this rank skipped in this step (data.on_error: skip)
        error = None
        try:
            batches = [self._usable(b, self.dataset, skipped) for b in micro_batches]
        except DataError as e:  # data.on_error: raise; made known to every rank by the all-reduce below
            error, batches = e, []
        keys = ("num_label_tokens", "num_images", "num_tokens", "num_positions", "num_samples")
        # + the records skipped and whether a data error stops the run, before any forward (every rank stops here)
        counts = torch.tensor([sum(b[k] for b in batches) for k in keys] + [len(skipped), error is not None],
                              dtype=torch.float64)
        counts = all_reduce_sum(counts.to(info.device)).cpu()
        if counts[5] > 0 and info.distributed:  # every rank counts every rank's skips (metrics, checkpoints)
            for r, theirs in enumerate(all_gather_object(skipped)):
                if r != info.rank:
                    self.dataset.count_skips_elsewhere(theirs)
        if counts[6] > 0:
            self._raise_data_error(error, f"in step {self.global_step + 1}")
        n_lab, n_img = max(1.0, float(counts[0])), max(1.0, float(counts[1]))
        w_align = self._align_weight()
        # (lm, align, SIGTERM seen): the stop request rides on the step's own all-reduce, so every rank agrees
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)
        sums[2] = float(self._stop_signal is not None)
        for j, b in enumerate(batches):
            b = self._to_device(b)
            with no_grad_sync(self.wrapped, sync=j == len(batches) - 1):
                with self._autocast():
                    out = self._forward(b)
                lm = out.loss["lm"].float() * b["num_label_tokens"]
                al = out.loss["align"].float() * b["num_images"]
                loss = (lm / n_lab + w_align * al / n_img) * info.world_size
                loss.backward()
            sums[:2] += torch.stack([lm.detach(), al.detach()]).double()
        sync_replicated_grads(self.model)  # FSDP: the SSM parameters it leaves whole (parallel.py)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.params, max_norm)
        sums = all_reduce_sum(sums).cpu()  # the losses summed over ranks: the same on every rank, as the norm
        lm_loss, align_loss = float(sums[0]) / n_lab, float(sums[1]) / n_img
        # a loss that is not finite stops the run as a gradient that is not does (a finite gradient beside an inf
        # loss is possible: a detached term), all ranks together, before the update
        if not (torch.isfinite(grad_norm) and math.isfinite(lm_loss) and math.isfinite(align_loss)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"step {self.global_step + 1}: the loss ({lm_loss:.4g} lm, {align_loss:.4g} align) or its gradient "
                f"is not finite (grad norm {float(grad_norm)}); stopped before the update, "
                f"so no weights were changed by it. {self._last_checkpoint_hint()} Lower train.lr, keep "
                f"train.grad_clip on, or check the data of this step")
        lr = self._logged_lr()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stop_agreed = float(sums[2]) > 0
        return {"lm_loss": lm_loss, "align_loss": align_loss, "loss": lm_loss + w_align * align_loss, "lr": lr,
                "grad_norm": float(grad_norm), "label_tokens": int(counts[0]), "images": int(counts[1]),
                "tokens": int(counts[2]), "positions": int(counts[3]), "samples": int(counts[4])}

    @torch.no_grad()
    def validate(self, stoppable: bool = False) -> dict | None:
        """Losses over the whole validation set (val.json), the same on every rank; see the module doc.
        ``stoppable`` (fit's): None as soon as a stop was asked for (Ctrl-C / SIGTERM on any rank, agreed batch
        by batch), so that the step's checkpoint is written at once, not after a long validation."""
        ds, info = self.val_dataset, self.info
        if ds is None:
            raise RuntimeError("no validation data: set val.json")
        t0 = time.perf_counter()
        d = self.cfg.data
        rows = plan_rows(ds.lengths, 0, 0, d.packing, d.max_length)  # a fixed order, independent of the run
        mb = self.cfg.val.micro_batch_size or self.cfg.train.micro_batch_size
        chunks = [rows[j:j + mb] for j in range(0, len(rows), mb)]
        per_rank = -(-len(chunks) // info.world_size)  # every rank runs as many forwards (FSDP's collectives)
        mine = chunks[info.rank::info.world_size]
        batches = iter(self._data_loader(ds, mine))
        # sums: lm loss x tokens, align loss x images, answer tokens, images, tokens predicted right, data errors
        sums = torch.zeros(6, dtype=torch.float64, device=info.device)
        error = None
        was_training = self.model.training
        self.model.eval()
        try:
            for j in range(per_rank):
                if stoppable and self._stop_during_validation():
                    return None
                try:
                    b = self._usable(next(batches, None) if error is None else None, ds)
                except DataError as e:
                    if not info.distributed:
                        raise
                    # said to the others at the all-reduce below; until then as many forwards as they run (FSDP)
                    error, b = e, self._dummy_batch()
                    sums[5] = 1.0
                b = self._to_device(b)
                with self._autocast():
                    out = self._forward(b)
                target = torch.nn.functional.pad(out.labels[:, 1:], (0, 1), value=-100)
                # out.logits: the labelled positions' only (out.logits_mask: where they are)
                right = (out.logits.argmax(-1) == target[out.logits_mask]).sum()
                sums[:5] += torch.tensor([float(out.loss["lm"]) * b["num_label_tokens"],
                                          float(out.loss["align"]) * b["num_images"], b["num_label_tokens"],
                                          b["num_images"], float(right)], dtype=torch.float64, device=info.device)
        finally:
            self.model.train(was_training)
        sums = all_reduce_sum(sums).cpu()
        if sums[5] > 0:
            self._raise_data_error(error, f"in the validation after step {self.global_step}")
        n_lab, n_img = max(1.0, float(sums[2])), max(1.0, float(sums[3]))
        w_align = self.model.config.align.loss_weight if self.model.align_head is not None else 0.0
        lm_loss, align_loss = float(sums[0]) / n_lab, float(sums[1]) / n_img
        # the epoch position of the step validated (as its training record has it; also on a resume, whose
        # history is empty when the resumed step is validated again)
        epoch = self.epoch + self.step_in_epoch / max(1, self._steps_in_epoch(self.epoch))
        return {"step": self.global_step, "epoch": epoch,
                "val_lm_loss": lm_loss, "val_align_loss": align_loss,
                "val_loss": lm_loss + w_align * align_loss, "val_token_acc": float(sums[4]) / n_lab,
                "total_tokens": self.counters["tokens"], "val_label_tokens": int(sums[2]),
                "val_images": int(sums[3]), "val_samples": len(ds), "val_time": time.perf_counter() - t0}

    def _validation_due(self) -> bool:
        """Whether the step just finished (``global_step``) is validated: every ``val.every_steps`` and the last."""
        every = self.cfg.val.every_steps
        return self.val_dataset is not None and bool((every and self.global_step % every == 0)
                                                     or self.global_step >= self.total_steps)

    def _maybe_validate(self, writer, bar) -> None:
        if not self._validation_due():
            return
        v = self.validate(stoppable=True)
        if v is None:  # a stop was asked for during it: the run stops after this step (its checkpoint first)
            if self.info.is_main:
                log.info("step %d: validation cut short by the stop; a resumed run validates this step first",
                         self.global_step)
            return
        self.val_history.append(v)
        if writer is not None:
            writer.write(v)
        if self.info.is_main:
            msg = (f"step {v['step']}: val_loss {v['val_loss']:.4f} (lm {v['val_lm_loss']:.4f}, align "
                   f"{v['val_align_loss']:.4f}), answer-token accuracy {v['val_token_acc']:.3f} over "
                   f"{v['val_samples']} samples")
            if bar is not None:  # above the bar, once (the log line would print it a second time)
                bar.write(msg)
            else:
                log.info("%s", msg)

    # -------------------------------------------------------------------------------------------- run

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Runs the remaining steps, writing metrics, checkpoints and the final model; returns the metrics.
        ``stop_after``: return after that many steps of this session without writing the final model (what
        an interrupted run leaves behind; tests use it).

        While it runs, rank 0 holds the output folder's lock (:data:`LOCK_FILE`; a second run is refused) and
        Ctrl-C (SIGINT) and SIGTERM ask for a stop after the step in progress, with a checkpoint of it (exit code
        130 / 143); a second one stops at once (under torchrun the same signal only :data:`SAME_STOP_S` after the
        first: :meth:`_request_stop`)."""
        if self.info.is_main:
            _lock_output_dir(self.output_dir)  # again, should an earlier fit of this trainer have released it
        self._stop_signal, self._stop_agreed, self._pid, self._bar = None, False, os.getpid(), None
        self._stop_time = 0.0  # when the stop signal came (time.monotonic)
        self._data_error_agreed = False  # a data error every rank raised (_raise_data_error)
        previous = _on_stop_signals(self._request_stop)
        try:
            return self._fit(stop_after)
        finally:
            _restore_signals(previous)
            if self.info.is_main:
                _unlock_output_dir(self.output_dir)

    def _fit(self, stop_after: int | None) -> list[dict]:
        """:meth:`fit` inside its lock and signal handlers."""
        cfg, info = self.cfg, self.info
        # resumed at a step whose validation was due but may not have run (a stop after the step's checkpoint and
        # before or during its validation): it runs first, replacing any record of it (validation is deterministic)
        revalidate = (self.global_step > 0 and self._validation_due()
                      and not any(v["step"] == self.global_step for v in self.val_history))
        writer = _MetricsWriter(self.output_dir, cfg, info, self.global_step,
                                drop_val_at=self.global_step if revalidate else None) if info.is_main else None
        bar = None
        if info.is_main and cfg.log.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True,
                       desc=cfg.stage)
        self._bar = bar  # where the signal handler's notice is written (above the bar, not through it)
        t_start, tok_start, step_start = time.perf_counter(), self.counters["tokens"], self.global_step
        if info.is_main and self.global_step >= self.total_steps:
            log.info("resumed at step %d of %d: no step is left to train; writing the final model",
                     self.global_step, self.total_steps)
        profiler = StepProfiler(cfg.profile, self.output_dir, info)
        self._saved_step = self.global_step  # what a resume of this folder would start from (a fresh run: 0)
        self._history_at_fit = len(self.history)  # stop_after counts this call's steps
        try:
            if revalidate:
                self._maybe_validate(writer, bar)
                if self._stop_requested():  # a signal during it: the state is the checkpoint's, nothing to save
                    self._stop_after_signal(True)
            self._fit_loop(writer, bar, profiler, stop_after)
            self.wait_for_checkpoint()
        except KeyboardInterrupt:
            self._wait_quietly("interrupted")
            raise TrainingInterrupted(f"interrupted at step {self.global_step} of {self.total_steps}. "
                                      f"{self._last_checkpoint_hint()}") from None
        except TrainingInterrupted:
            raise
        except BaseException as e:
            self._wait_quietly("stopped by an error")
            if isinstance(e, DataError):
                self._checkpoint_before_data_error()
            gone = lost_peer(e)
            if gone is not None:  # this process's collective failed because another one ended: said in one line
                raise TrainingError(f"another process stopped first (its error is above; here: {gone}); stopped at "
                                    f"step {self.global_step} of {self.total_steps}. "
                                    f"{self._last_checkpoint_hint()}") from None
            if info.is_main and isinstance(e, Exception):  # the error itself is printed by the command
                log.error("training stopped at step %d of %d. %s", self.global_step, self.total_steps,
                          self._last_checkpoint_hint())
            raise
        finally:
            profiler.close(self.global_step)
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if stop_after is not None and len(self.history) - self._history_at_fit >= stop_after \
                and self.global_step < self.total_steps:
            return self.history
        try:
            save_model_dir(self.model, self.output_dir, info, cfg)
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted while writing the final model after step {self.global_step} "
                                      f"of {self.total_steps}: {self.output_dir} holds no complete final model "
                                      f"(each file is written whole or not at all); --resume auto writes it "
                                      f"again from the last checkpoint") from None
        except Exception as e:
            why = write_failure(e)  # a full disk, a folder made read-only (else not a write's failure: raised)
            if why is None:
                raise
            raise TrainingError(f"writing the final model into {self.output_dir} failed after step "
                                f"{self.global_step} of {self.total_steps} ({why}). "
                                f"{self._last_checkpoint_hint()}") from None
        # every process's count of truncated instructions (a barrier too): each truncated its own micro-batches'
        truncated = sum(all_gather_object(self.model.instruction.num_truncated
                                          if self.model.instruction is not None else 0))
        if info.is_main:
            el = time.perf_counter() - t_start
            rep = self.dataset.report
            speed = (f"{(self.counters['tokens'] - tok_start) / max(el, 1e-9):.0f} tokens/s over this session"
                     if self.global_step > step_start else "no step this session")
            log.info("done: %d steps; %s; %s; final model in %s", self.global_step, rep.summary(), speed,
                     self.output_dir)
            if truncated:
                log.warning("instruction fusion truncated %d instructions to the text tower's context (every use "
                            "counted, validation's included; `emma-mamba data check` counts the data's)", truncated)
        return self.history

    def _fit_loop(self, writer, bar, profiler, stop_after: int | None) -> None:
        """The steps of :meth:`fit` (returns at the end of the run or after ``stop_after`` steps)."""
        cfg = self.cfg
        while self.global_step < self.total_steps:
            n_steps = self._steps_in_epoch(self.epoch)
            if self.step_in_epoch >= n_steps:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                continue
            stop = min(n_steps, self.step_in_epoch + self.total_steps - self.global_step)
            it = iter(self._loader(self.epoch, self.step_in_epoch, stop))
            while self.step_in_epoch < stop:
                profiler.before_step(self.global_step + 1)
                t0 = time.perf_counter()
                mbs = [next(it) for _ in range(self.accum)]
                m = self.train_step(mbs)
                dt = time.perf_counter() - t0
                self.global_step += 1
                self.step_in_epoch += 1
                if profiler.after_step(self.global_step):
                    m["profiled"] = True
                for k in self.counters:
                    self.counters[k] += m[k]
                m.update(step=self.global_step, epoch=self.epoch + self.step_in_epoch / n_steps,
                         step_time=dt, tokens_per_s=m["tokens"] / dt, fill=m["tokens"] / max(1, m["positions"]),
                         skipped_records=sum(self.dataset.report.skipped.values()),
                         total_tokens=self.counters["tokens"])
                flops = self.step_flops(m["tokens"], m["images"], m["label_tokens"])
                m["tflops"] = flops / dt / self.info.world_size / 1e12
                if self.peak_tflops:
                    m["mfu"] = m["tflops"] / self.peak_tflops
                    if m["mfu"] > 1 and self.info.is_main and not self._warned_mfu:
                        self._warned_mfu = True
                        log.warning("mfu %.3g at step %d is above 1: the peak of %g TFLOPS per device "
                                    "(log.peak_tflops or the GPU table) is below what it achieved", m["mfu"],
                                    self.global_step, self.peak_tflops)
                self.history.append(m)
                if self.global_step % cfg.log.every_steps == 0 or self.global_step == self.total_steps:
                    if writer is not None:  # the steps since the last line, averaged (interval_record)
                        writer.write(interval_record(self._unlogged + self.history[self._logged_upto:],
                                                     self._align_weight()))
                    self._logged_upto, self._unlogged = len(self.history), []
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                                    tok_s=f"{m['tokens_per_s']:.0f}",
                                    **({"mfu": f"{m['mfu']:.1%}"} if "mfu" in m else {}))
                # the checkpoint first: a validation that fails (an unreadable held-out image) loses no step
                every = cfg.checkpoint.every_steps
                saved = bool(every and self.global_step % every == 0)
                if saved:
                    self.save_checkpoint()
                if self._stop_requested():  # Ctrl-C / SIGTERM (on any rank): checkpoint this step, then stop
                    self._stop_after_signal(saved)
                self._maybe_validate(writer, bar)
                if self._stop_requested():  # one process: a signal during the validation (the state is this step's)
                    self._stop_after_signal(saved)
                if self.global_step >= self.total_steps:
                    break
                if stop_after is not None and len(self.history) - self._history_at_fit >= stop_after:
                    return
            del it

    def _raise_data_error(self, error: DataError | None, where: str) -> None:
        """After an all-reduce that said some rank met a data error (``error`` on this one, else None): raise it on
        every rank, this rank's own or one naming the first rank that met one, so that all checkpoint together
        (:meth:`_checkpoint_before_data_error`) and stop."""
        self._data_error_agreed = True
        failed = [r for r, bad in enumerate(all_gather_object(error is not None)) if bad]
        if error is not None:
            raise error
        raise DataError(f"rank {failed[0]} met a data error {where} (its message above)")

    def _checkpoint_before_data_error(self) -> None:
        """A data error (an unreadable image of the next step, or of the held-out set after a step) leaves the
        state at the end of a finished step, consistent: checkpoint it when the last checkpoint is older, so that
        fixing the data (or ``data.on_error: skip``) and ``--resume auto`` lose no step. In a distributed run only
        an error every rank raised (:meth:`_raise_data_error`): the save is collective."""
        if (self.info.world_size > 1 and not self._data_error_agreed) or self.global_step <= self._saved_step:
            return
        try:
            path = self.save_checkpoint()
            self.wait_for_checkpoint()
        except BaseException as e:  # noqa: BLE001 - never raised over the data error being handled
            log.error("checkpointing step %d after the data error failed: %s", self.global_step, e)
            return
        if self.info.is_main:
            log.info("checkpointed step %d before stopping: %s", self.global_step, path)

    def _last_checkpoint_hint(self) -> str:
        last = latest_checkpoint(self.output_dir)
        if last is not None:
            return f"The last checkpoint is {last} (--resume auto continues from it)."
        return "No checkpoint was written (checkpoint.every_steps sets how often)."

    def _request_stop(self, signum, frame) -> None:
        """Ctrl-C (SIGINT), or SIGTERM (Slurm, Kubernetes, torchrun pass it on before they kill): stop after the
        step in progress, with a checkpoint of it; a second signal stops at once (the steps since the last
        checkpoint are then lost). torchrun starts its workers in their own session, so a terminal's Ctrl-C
        reaches them once, passed on by torchrun (which kills them after its 30 s shutdown timeout). Under
        torchrun the same signal again within :data:`SAME_STOP_S` is the same stop passed on twice (a scheduler
        signals every process of the job, and torchrun passes its own on a moment later): only a later one stops
        at once."""
        now = time.monotonic()
        if self._stop_signal is not None:
            since = now - self._stop_time
            if signum == self._stop_signal and since < SAME_STOP_S and "TORCHELASTIC_RUN_ID" in os.environ:
                log.debug("%s again %.2f s after the first: the same stop, passed on by torchrun",
                          signal.Signals(signum).name, since)
                return
            raise KeyboardInterrupt
        self._stop_signal, self._stop_time = signum, now
        if self.info.is_main and os.getpid() == self._pid:  # not a data-loader worker that inherited the handler
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = f"{name} again" + (f" {SAME_STOP_S:g} s or more later" if "TORCHELASTIC_RUN_ID" in os.environ
                                       else "")
            msg = (f"{name}: stopping after the step in progress, which is checkpointed first; {again} stops "
                   f"at once (losing the steps since the last checkpoint)")
            if self._bar is not None:
                self._bar.write(msg, file=sys.stderr)
            else:
                log.warning("%s", msg)

    def _stop_during_validation(self) -> bool:
        """Whether a stop was asked for (any rank: a one-number all-reduce per validation batch, every rank at the
        same batch); agreed, it is also the step's stop (:meth:`_stop_requested`)."""
        if self.info.world_size == 1:
            return self._stop_signal is not None
        flag = torch.tensor([float(self._stop_signal is not None)], dtype=torch.float64, device=self.info.device)
        if float(all_reduce_sum(flag)) > 0:
            self._stop_agreed = True
        return self._stop_agreed

    def _stop_requested(self) -> bool:
        """Whether to stop after this step: one process, as soon as it saw a signal; several, when any rank had
        seen one by the step's all-reduce (so that every rank stops after the same step)."""
        if self.info.world_size == 1:
            return self._stop_signal is not None
        return self._stop_agreed

    def _stop_after_signal(self, saved: bool) -> None:
        """After the step in which a rank saw Ctrl-C or SIGTERM: checkpoint it (unless it just was), wait until
        the checkpoint is complete, and end the run with :class:`TrainingInterrupted` (exit code 130 for SIGINT,
        143 for SIGTERM; a rank that saw no signal itself ends as SIGTERM's)."""
        if not saved:  # also with checkpoint.every_steps 0: the only way to keep the run's work
            self.save_checkpoint()
        self.wait_for_checkpoint()
        by_ctrl_c = self._stop_signal == signal.SIGINT
        raise TrainingInterrupted(f"stopped by {'Ctrl-C' if by_ctrl_c else 'SIGTERM'} after step {self.global_step} "
                                  f"of {self.total_steps}. {self._last_checkpoint_hint()}",
                                  exit_code=130 if by_ctrl_c else 143)

    def wait_for_checkpoint(self) -> Path | None:
        """Block until the checkpoint being written in the background (checkpoint.async_save) is complete;
        returns its directory (None when none was pending). Raises TrainingError if its write failed."""
        pending, self._pending_save = self._pending_save, None
        if pending is None:
            return None
        if not pending.done() and self.info.is_main:
            log.info("waiting for checkpoint %s to be written", pending.path)
        return pending.wait()

    def _wait_quietly(self, why: str) -> None:
        """On the way out of a failed or interrupted run: finish a background checkpoint write (it holds a
        complete state); a failure of it is logged, never raised over the error being handled."""
        if self._pending_save is None:
            return
        if self.info.is_main and not self._pending_save.done():
            log.warning("%s: finishing checkpoint %s being written first", why, self._pending_save.path)
        try:
            self.wait_for_checkpoint()
        except BaseException as e:  # noqa: BLE001
            log.error("%s", e)

    def save_checkpoint(self) -> Path:
        """Write a step checkpoint (collective); with checkpoint.async_save, waits for the previous background
        write, starts this one and returns the directory it will have."""
        self.wait_for_checkpoint()
        self._saved_step = self.global_step
        state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "counters": dict(self.counters), "skipped": dict(self.dataset.report.skipped),
                 "failed_records": self.dataset.failed_records(),  # counted once across a resume
                 "fingerprint": self.dataset.fingerprint(), "data_hash": self.dataset.content_hash(),
                 "samples": len(self.dataset), "world_size": self.info.world_size,
                 "global_batch_size": self.cfg.train.global_batch_size, "total_steps": self.total_steps,
                 "cpu_threads": torch.get_num_threads(),  # a CPU run is bitwise at one thread count (resume says)
                 # the steps the next metrics.jsonl line averages, so that a resumed run writes the same line
                 "unlogged_steps": self._unlogged + self.history[self._logged_upto:]}
        try:
            out = save_checkpoint(self.output_dir, self.global_step, self.model, self.optimizer, self.scheduler,
                                  state, self.cfg, self.info, keep_last=self.cfg.checkpoint.keep_last,
                                  fmt=self.cfg.checkpoint.format, async_save=self.cfg.checkpoint.async_save)
        except Exception as e:  # a full disk, a folder made read-only: said with what is left to resume from
            why = write_failure(e)
            if why is None:
                raise
            raise TrainingError(f"writing the checkpoint of step {self.global_step} into {self.output_dir} failed "
                                f"({why}); its partial files are ignored by --resume. "
                                f"{self._last_checkpoint_hint()}") from None
        if isinstance(out, Path):
            return out
        self._pending_save = out
        return out.path

    def _check_resume_config(self, path: Path) -> None:
        """The checkpoint's own configs against this run's: a model that differs is refused, naming the keys
        (its weights would not fit, or mean something else); optimizer and schedule settings the checkpoint's
        optimizer and scheduler states fix are taken from it, with a warning, so that this run's
        train_config.yaml says what the run does."""
        from emma_mamba.config import config_to_dict, load_config
        from emma_mamba.training.checkpoint import _read
        from emma_mamba.training.config import _flatten, load_run_config

        def read_config(file: Path, load):
            """A checkpoint's config file through the checkpoint reader: an empty, truncated or unparsable one is
            named as a damaged checkpoint with the run's other checkpoints; one that parses but names a key or
            value this version does not know is a TrainingError naming the file and the key (another checkpoint
            would not help)."""
            def reader(f: Path):
                text = f.read_text(encoding="utf-8")
                if not text.strip():
                    raise ValueError("the file is empty")
                yaml.safe_load(text)  # a truncated or garbled file: damage (raised as such by _read)
                try:
                    return load(f)
                except ConfigError as e:
                    raise TrainingError(f"{f}: {e}") from None
            return _read(file, reader)

        if (path / "config.yaml").is_file():
            theirs = _flatten(config_to_dict(read_config(path / "config.yaml", load_config)))
            ours = _flatten(config_to_dict(self.cfg.model))
            where = ("name", "pretrained", "tokenizer")  # where weights came from, not what the model is
            diff = sorted(k for k in set(theirs) | set(ours)
                          if theirs.get(k) != ours.get(k) and k.rsplit(".", 1)[-1] not in where)
            if diff:
                shown = "; ".join(f"model.{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in diff[:4])
                raise ConfigError(f"--resume {path}: the checkpoint's model differs from this run's ({shown}"
                                  f"{' ...' if len(diff) > 4 else ''}); resume with the run's own config, or start a "
                                  f"new run from it with init_from")
        if not (path / "train_config.yaml").is_file():
            return
        old_run = read_config(path / "train_config.yaml", load_run_config)
        old, t = old_run.train, self.cfg.train
        # what trains: the optimizer's state holds those parameters only (another set failed inside torch's
        # optimizer-state loader with a KeyError)
        mc = self.cfg.model  # (the checkpoint's model config equals it: checked above)
        built = set(TRAINABLE_MODULES) - ({"instruction"} if not mc.instruction.enabled else set()) \
            - ({"align_head"} if not mc.align.enabled else set())
        was, now = ([m for m in _trainable_modules(run) if m in built] for run in (old_run, self.cfg))
        if was != now:
            raise ConfigError(f"--resume {path}: the checkpoint trained {', '.join(was)} and this run would train "
                              f"{', '.join(now)} (train.trainable, the stage or model.vision.freeze changed): its "
                              f"optimizer state holds what it trained; resume with the run's own values, or start a "
                              f"new run from the checkpoint with init_from")
        if old.lora.r and t.lora.r and old.lora.r != t.lora.r:  # (with or without adapters: refused further on)
            raise ConfigError(f"--resume {path}: train.lora.r {old.lora.r!r} there, {t.lora.r!r} here: the "
                              f"checkpoint's adapters have its own rank; resume with it, or start a new run from the "
                              f"checkpoint's merged model with init_from")
        # what the data order and the meaning of the saved data position depend on (plan_rows): another value
        # would reshuffle the rest of the epoch (records skipped, others trained twice), so it is refused
        order = [("train.seed", old.seed, t.seed), ("data.packing", old_run.data.packing, self.cfg.data.packing),
                 ("data.max_length", old_run.data.max_length, self.cfg.data.max_length)]
        changed = [f"{k} {a!r} there, {b!r} here" for k, a, b in order if a != b]
        if changed:
            raise ConfigError(f"--resume {path}: {'; '.join(changed)}: the data order of the rest of the epoch "
                              f"depends on it (records would be skipped or trained twice); resume with the run's "
                              f"own value, or start a new run from the checkpoint with init_from")
        # the adapters the checkpoint trained (another r fails on their shapes, naming train.lora.r): another alpha
        # would rescale them (a sharded checkpoint resumed with it silently), another base_dtype round the frozen
        # weights, other targets or train_embeddings change what trains; dropout may change (noise only)
        lo_old, lo_new = old.lora, t.lora
        if lo_old.r and lo_new.r and lo_old.r == lo_new.r:
            def eff(lo):
                return {"alpha": float(lo.alpha if lo.alpha is not None else 2.0 * lo.r),
                        "targets": sorted(lo.targets or []), "base_dtype": lo.base_dtype,
                        "train_embeddings": bool(lo.train_embeddings)}

            was, now = eff(lo_old), eff(lo_new)
            lora_changed = [f"train.lora.{k} {was[k]!r} there, {now[k]!r} here" for k in was if was[k] != now[k]]
            if lora_changed:
                raise ConfigError(f"--resume {path}: {'; '.join(lora_changed)}: the checkpoint's adapters were "
                                  f"trained with its own train.lora (alpha scales them, base_dtype holds the frozen "
                                  f"weights, targets and train_embeddings say what trains); resume with the run's "
                                  f"own values, or start a new run from the checkpoint's merged model with init_from")
        # held by the optimizer's and scheduler's states (the peak lr is the scheduler's base_lrs): the checkpoint's
        fixed = ("lr", "weight_decay", "betas", "eps", "lr_multipliers", "decay_embeddings")
        kept = []
        for name in fixed:
            if getattr(t, name) != getattr(old, name):
                kept.append(f"train.{name} {getattr(old, name)!r} (asked: {getattr(t, name)!r})")
                setattr(t, name, getattr(old, name))
        # the schedule's shape is computed from the config at every step: the new values apply from here on
        shape = [f"train.{n} {getattr(old, n)!r} -> {getattr(t, n)!r}" for n in
                 ("schedule", "warmup_ratio", "warmup_steps", "min_lr_ratio") if getattr(t, n) != getattr(old, n)]
        if self.info.is_main and kept:
            log.warning("resuming %s: the optimizer continues with the checkpoint's settings: %s; start a new run "
                        "from it with init_from to change them", path, ", ".join(kept))
        if self.info.is_main and shape:
            log.warning("resuming %s: the LR schedule changes from the resumed step on: %s", path, ", ".join(shape))

    def _check_resume_data(self, path: Path, state: dict) -> None:
        """The data must be those the checkpoint trained on, else the data position means other samples: the
        whole content (:meth:`LlavaDataset.content_hash`); checkpoints written before it carry only the
        fingerprint of the first 64 tokens of each sample, which is checked instead."""
        was = state.get("data_hash")
        now = self.dataset.content_hash() if was is not None else self.dataset.fingerprint()
        if was is None:
            was = state["fingerprint"]
            if self.info.is_main:
                log.info("resuming %s: its data check covers each sample's first 64 tokens (a checkpoint of an "
                         "earlier version)", path)
        if was != now:
            n_was, n_now = state.get("samples"), len(self.dataset)
            count = (f"{n_was} samples then, {n_now} now" if n_was is not None and n_was != n_now else
                     f"{n_now} samples, some with other tokens, labels or images" if n_was is not None else
                     f"{n_now} samples now")
            raise ConfigError(f"--resume {path}: the training data differ from the checkpoint's ({count}; hash "
                              f"{was} vs {now}); resume with the same data.json (or data.sources), image names and "
                              f"max_length, or start a new run from the checkpoint with init_from")

    def _restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (its configs already checked and adopted by
        :meth:`_check_resume_config` in ``__init__``)."""
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.info)
        self._check_resume_data(path, state)
        if state["global_batch_size"] != self.cfg.train.global_batch_size:
            raise ConfigError(f"--resume {path}: train.global_batch_size was {state['global_batch_size']}, is "
                              f"{self.cfg.train.global_batch_size}; the data position would not mean the same")
        written_by = int(state.get("world_size", self.info.world_size))
        if written_by != self.info.world_size and self.info.is_main:
            log.warning("resuming %s, written by %d process(es), with %d: the same data order and objective; the "
                        "gradients are summed in another order, so the run continues to rounding, not bit for bit",
                        path, written_by, self.info.world_size)
        threads = state.get("cpu_threads")
        if threads is not None and threads != torch.get_num_threads() and self.info.device.type == "cpu" \
                and self.info.is_main:
            # (its own logger: quickstart and ablate quiet the trainer's, and they are where --threads is set)
            logging.getLogger("emma_mamba.training.resume").warning(
                "resuming %s, written at %d CPU threads, with %d: the matrix products sum in another order, so the "
                "run continues to rounding, not bit for bit (for that, the same count: OMP_NUM_THREADS=%d, or "
                "--threads %d for quickstart and ablate)", path, threads, torch.get_num_threads(), threads, threads)
        if state["total_steps"] != self.total_steps:
            log.warning("resuming %s: the run now has %d total steps (was %d); the LR schedule changes",
                        path, self.total_steps, state["total_steps"])
        # the restored learning rates are the old schedule's at this step: the next update takes this run's
        # schedule's (the same value, bit for bit, when the schedule did not change)
        sch = self.scheduler
        for group, base, lam in zip(self.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
            group["lr"] = base * lam(sch.last_epoch)
        sch._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.counters = {k: int(v) for k, v in state["counters"].items()}
        self._unlogged = list(state.get("unlogged_steps", []))  # (absent from an older checkpoint)
        # the saved counts include the load-time skips this run just counted again: replace, not add
        self.dataset.restore_skips(state["skipped"], state.get("failed_records"))  # None: an older checkpoint
        if self.info.is_main:
            log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", path, self.global_step,
                     self.epoch, self.step_in_epoch)
            from emma_mamba.training.checkpoint import CHECKPOINT_DIR, _complete_steps

            later = sorted(p.name for s, p in _complete_steps(self.output_dir / CHECKPOINT_DIR) if s > self.global_step)
            if later:
                log.warning("%s holds checkpoints after step %d (%s) of the run this one replaces: each is "
                            "overwritten when this run reaches its step; until then --resume auto would pick "
                            "them", self.output_dir / CHECKPOINT_DIR, self.global_step, ", ".join(later))


def _trainable_modules(run) -> list[str]:
    """The modules a run trains (:meth:`EmmaMamba.set_stage`'s choice): ``train.trainable``, or the stage's own."""
    if run.train.trainable is not None:
        return sorted(run.train.trainable)
    return sorted(stage_modules(run.stage, run.model.vision.freeze))


_SUMMED = ("label_tokens", "images", "tokens", "positions", "samples", "step_time")


def interval_record(steps: list[dict], align_weight: float) -> dict:
    """One metrics.jsonl line for the steps since the previous line (``log.every_steps`` of them, fewer at the end;
    a checkpoint carries those steps, so a resumed run writes the uninterrupted run's lines), as a plot of the run
    wants them: the losses the mean over every answer token (lm) and image (align) of those steps, as one step of
    their combined batch would weigh them; the counts and ``step_time`` summed; the rates (``tokens_per_s``,
    ``fill``, ``tflops``, ``mfu``) over the summed time and positions; ``grad_norm`` the steps' mean and
    ``grad_norm_max`` their largest; ``steps`` how many; everything else (step, epoch, lr, totals) the last step's.
    One step is returned as it is, plus ``steps: 1``."""
    last = dict(steps[-1])
    if len(steps) == 1:
        return {**last, "steps": 1}

    def mean(key: str, weight: str) -> float:
        w = [s[weight] for s in steps]
        if sum(w) <= 0:
            return sum(s[key] for s in steps) / len(steps)
        return sum(s[key] * x for s, x in zip(steps, w)) / sum(w)

    rec = last
    rec.update({k: sum(s[k] for s in steps) for k in _SUMMED})
    rec["lm_loss"] = mean("lm_loss", "label_tokens")
    rec["align_loss"] = mean("align_loss", "images")
    rec["loss"] = rec["lm_loss"] + align_weight * rec["align_loss"]
    rec["grad_norm"] = sum(s["grad_norm"] for s in steps) / len(steps)
    rec["grad_norm_max"] = max(s["grad_norm"] for s in steps)
    dt = max(rec["step_time"], 1e-12)
    rec["tokens_per_s"] = rec["tokens"] / dt
    rec["fill"] = rec["tokens"] / max(1, rec["positions"])
    if "tflops" in last:  # per step: tflops * step_time is the step's work
        rec["tflops"] = sum(s["tflops"] * s["step_time"] for s in steps) / dt
        if "mfu" in last:
            rec["mfu"] = sum(s["mfu"] * s["step_time"] for s in steps) / dt
    if any(s.get("profiled") for s in steps):
        rec["profiled"] = True
    rec["steps"] = len(steps)
    return rec


class _MetricsWriter:
    """metrics.jsonl (+ TensorBoard when installed), rank 0 only. On resume, lines past the resumed step (from
    the interrupted run) are dropped so the file reads as one uninterrupted run, and so is the validation record
    of the resumed step itself when it is validated again (``drop_val_at``)."""

    def __init__(self, output_dir: Path, cfg: RunConfig, info: DistInfo, start_step: int,
                 drop_val_at: int | None = None):
        output_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, output_dir / "train_config.yaml")
        self.f = None
        if cfg.log.jsonl:
            path = output_dir / "metrics.jsonl"
            keep = []
            if start_step > 0 and path.is_file():
                for line in text_lines(path.read_text(encoding="utf-8")):
                    try:
                        rec = json.loads(line)
                        if rec.get("step", 0) <= start_step and not (rec.get("step") == drop_val_at
                                                                      and "val_loss" in rec):
                            keep.append(line)
                    except json.JSONDecodeError:
                        continue
            path.write_text("".join(x + "\n" for x in keep))
            self.f = path.open("a")
        self.tb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
        self.wandb = _wandb_run(cfg, output_dir, start_step) if cfg.log.wandb else None

    def write(self, m: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(m) + "\n")
            self.f.flush()
        if self.tb is not None:
            for k in ("lm_loss", "align_loss", "loss", "lr", "grad_norm", "tokens_per_s", "fill", "tflops", "mfu"):
                if k in m:
                    self.tb.add_scalar(f"train/{k}", m[k], m["step"])
            for k in ("val_lm_loss", "val_align_loss", "val_loss", "val_token_acc"):
                if k in m:
                    self.tb.add_scalar(f"val/{k.removeprefix('val_')}", m[k], m["step"])
        if self.wandb is not None:  # every numeric field, under train/ or val/ as in TensorBoard
            val = "val_loss" in m
            self.wandb.log({(f"val/{k.removeprefix('val_')}" if val else f"train/{k}"): v for k, v in m.items()
                            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)},
                           step=m["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


LOCK_FILE = ".emma_mamba.lock"
"""In a run's output_dir while a training process (rank 0) writes into it: an exclusive ``flock`` held for the
run's lifetime (released by the kernel when the process ends, however it ends), the holder's pid, host and start
time written inside for the message that refuses a second run."""

_held_locks: dict[str, int] = {}  # resolved output_dir -> the open lock file's descriptor, in this process


def _lock_output_dir(path: Path) -> None:
    """Hold ``path``'s :data:`LOCK_FILE`, or raise FileExistsError naming the process that holds it (two runs
    writing one folder interleave their metrics.jsonl and replace each other's checkpoints and final model). A
    second trainer of the same process on the same folder (a test resuming in-process) shares this process's lock."""
    import fcntl
    import socket

    key = str(path.resolve())
    if key in _held_locks:
        return
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process
        try:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        except OSError:
            holder = "another process"
        os.close(fd)
        raise FileExistsError(f"output_dir {path} is in use by a training run that is still going ({holder}; "
                              f"lock {lock}): two runs in one folder would overwrite each other's checkpoints and "
                              f"metrics; wait for it to end, or choose another output_dir") from None
    except OSError as e:  # a filesystem without locks (some network mounts): the run goes on, unguarded
        os.close(fd)
        log.warning("output_dir %s: cannot lock %s (%s): a second run into this folder would not be refused",
                    path, lock, e.strerror or e)
        return
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held_locks[key] = fd


def _unlock_output_dir(path: Path) -> None:
    """Release the lock :func:`_lock_output_dir` took (the file stays: removing it could let a third run lock
    a new file while a second still waits on the old one)."""
    fd = _held_locks.pop(str(path.resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


_NOT_INSTALLED = object()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_SHARED_FS_WAIT_S = 5.0
"""How long a rank looks for the probe file rank 0 left in output_dir before it says it cannot see the folder."""

SAME_STOP_S = 5.0
"""Under torchrun, the same stop signal again within this many seconds of the first is that stop passed on twice
(the scheduler's SIGTERM to every process, then torchrun's), not a second one that stops at once."""


def _on_stop_signals(handler):
    """Install ``handler`` for SIGINT and SIGTERM (in the main thread only: elsewhere signal handlers cannot be
    set) and return what :func:`_restore_signals` puts back."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _NOT_INSTALLED
    # a SIGINT ignored from the start (nohup, a non-interactive shell's background job) stays ignored, as Python
    # leaves it then
    signals = [s for s in _STOP_SIGNALS if s != signal.SIGINT or signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, handler) for s in signals}
    return {s: signal.SIG_DFL if h is None else h for s, h in previous.items()}  # None: set outside Python


def _restore_signals(previous) -> None:
    if previous is not _NOT_INSTALLED:
        for s, h in previous.items():
            signal.signal(s, h)


def _loader_worker_init(worker_id: int) -> None:
    """A data-loader worker leaves Ctrl-C and SIGTERM to the training process, which stops the workers itself
    (a terminal's Ctrl-C reaches every process of its group: a worker it ended failed the step being finished)."""
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _require_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb is set but the wandb package is not installed (pip install wandb; or set "
                          "log.wandb: null)") from None
    return wandb


def _wandb_run(cfg: RunConfig, output_dir: Path, start_step: int):
    """A W&B run for log.wandb, its id kept in output_dir/wandb_run_id so that a resumed run continues it."""
    wandb = _require_wandb()
    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None
    run = wandb.init(project=cfg.log.wandb, name=output_dir.name, dir=str(output_dir), id=run_id,
                     resume="allow" if run_id else None, config=run_config_to_dict(cfg))
    id_file.write_text(str(run.id))
    return run


def _picklable(e: Exception) -> Exception:
    """``e``, or a TrainingError with its message where it cannot be pickled (to be sent to the other ranks)."""
    import pickle

    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - whatever pickling an arbitrary exception raises
        return TrainingError(str(e))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: RunConfig, resume: str | None = None, device: str | None = None) -> Trainer:
    """Build a Trainer for ``cfg`` and run it; returns the trainer (``.history`` holds the metrics)."""
    trainer = Trainer(cfg, resume=resume, device=device)
    trainer.fit()
    return trainer
