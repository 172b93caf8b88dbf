"""torch.profiler traces of chosen training steps (the run config's ``profile`` section).

The profiler runs from the start of step ``profile.start_step`` (its data loading included) to the end of step
``start_step + steps - 1``, on every rank; then each rank writes a Chrome / Perfetto trace and a table of the ops
that took the most time (self time: on the GPU the kernels', on the CPU the host's), and with ``profile.memory``
on CUDA a memory snapshot of the same steps. A run resumed inside the window profiles the rest of it; a run that
ends or fails inside it writes what was recorded. Profiling changes no result (tested: the same losses bit for bit).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from emma_mamba.training.parallel import DistInfo

__all__ = ["StepProfiler", "PROFILE_DIR"]

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"


class StepProfiler:
    def __init__(self, cfg, output_dir: Path, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.dir = Path(output_dir) / PROFILE_DIR
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.prof = None
        self.started_at = None
        self.memory = False
        if cfg.memory and cfg.steps and info.device.type != "cuda" and info.is_main:
            log.warning("profile.memory: memory snapshots are CUDA only; this run on %s records none",
                        info.device.type)

    def before_step(self, step: int) -> None:
        """Called before step ``step`` (as metrics.jsonl numbers it) loads its data."""
        if self.prof is not None or not (self.cfg.steps and self.first <= step <= self.last):
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.info.device.type == "cuda" else [])
        self.memory = self.cfg.memory and self.info.device.type == "cuda"
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = profile(activities=acts, record_shapes=self.cfg.record_shapes, with_stack=self.cfg.with_stack,
                            profile_memory=self.cfg.memory)
        self.prof.__enter__()
        self.started_at = step

    def after_step(self, step: int) -> bool:
        """Called when step ``step`` ended; returns whether it was profiled."""
        if self.prof is None:
            return False
        if step >= self.last:
            self._write(step)
        return True

    def close(self, step: int) -> None:
        """End of the run (or its failure): write what a window still open recorded (up to ``step``)."""
        if self.prof is not None:
            self._write(step)

    def _write(self, step: int) -> None:
        prof, self.prof = self.prof, None
        cuda = self.info.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.info.device)
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"rank{self.info.rank}_steps{self.started_at}-{step}"
        prof.export_chrome_trace(f"{stem}.json")
        table = prof.key_averages(group_by_input_shape=self.cfg.record_shapes).table(
            sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40)
        Path(f"{stem}_ops.txt").write_text(table + "\n")
        if self.memory:
            torch.cuda.memory._dump_snapshot(f"{stem}_memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.info.is_main:
            log.info("profiled steps %d-%d: %s.json (trace), %s_ops.txt", self.started_at, step, stem, stem)
