"""Training checkpoints: self-describing directories that a run resumes from exactly.

Layout of ``output_dir``::

    train_config.yaml            the resolved run config
    metrics.jsonl                one JSON object per logged step
    checkpoints/step_00000100/   every checkpoint.every_steps steps
        config.yaml model.safetensors tokenizer.json    EmmaMamba.save layout: emma_mamba.load(dir) works
        train_config.yaml                               the resolved run config
        trainer_state.pt    optimizer, scheduler, data position (epoch, step in epoch), counters, data fingerprint
        rng_rank{r}.pt      python / numpy / torch (CPU and CUDA) RNG states of rank r
    config.yaml model.safetensors tokenizer.json train_config.yaml   the final model (written at the end)

With ``checkpoint.format: sharded`` a step checkpoint holds, instead of model.safetensors and the optimizer
state in trainer_state.pt, a torch.distributed.checkpoint (DCP) directory ``state/`` of ``{"model", "optimizer"}``
(parameter-name keys; under FSDP each rank writes its own shards, nothing is gathered). DCP reshards on load, so
such a checkpoint resumes on any number of processes under any strategy as well, and ``emma_mamba.load`` reads
it (adapters of a LoRA run merged) for init_from, eval and chat. config.yaml, tokenizer.json,
train_config.yaml, trainer_state.pt (scheduler, data position, counters) and the RNG files are as in the full
layout.

``checkpoint.async_save`` (sharded only, torchtitan's async mode): each rank copies its shards to host memory and
returns to training while a background thread writes them (an :class:`AsyncCheckpoint`); rank 0 renames the
directory once DCP's metadata is written, which happens after every rank's shards are. At most one such save is in
flight: the next checkpoint, the end of the run and an interruption wait for it.

A checkpoint is written into ``step_N.tmp`` and renamed when complete, so an interrupted write is never picked
up by ``--resume auto`` (which takes the highest complete step; a newer ``step_N`` whose trainer state is missing
is passed over with a warning naming it). Everything is read back with
``torch.load(weights_only=True)`` / safetensors: loading runs no code from the files.

Under FSDP2 the full (unsharded) model and optimizer states are gathered to rank 0 on the CPU and written in
the same single-file layout. The optimizer state is keyed by parameter name under every strategy
(``torch.distributed.checkpoint.state_dict``'s full state dict), so a checkpoint depends neither on the number of
processes nor on the parallelism that wrote it: a run written by 8 FSDP processes resumes on 1 process, under DDP
on 2, and back (the data order is a function of the global batch, not of the process count; the objective is the
same, gradients are summed in another order, so such a resume continues to rounding rather than bit for bit). A
rank that the writing run did not have takes rank 0's RNG state re-seeded by its rank. Checkpoints of earlier
versions (optimizer state keyed by position, written without FSDP) still resume without FSDP.
"""

from __future__ import annotations

import difflib
import logging
import random
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emma_mamba.training import TrainingError
from emma_mamba.training.parallel import DistInfo, barrier, is_fsdp

__all__ = ["save_checkpoint", "AsyncCheckpoint", "load_checkpoint", "latest_checkpoint", "resolve_resume",
           "check_resume_stage", "save_model_dir", "rng_state", "set_rng_state", "CHECKPOINT_DIR", "SHARDED_DIR",
           "is_sharded", "read_sharded_model", "write_failure"]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.pt"
SHARDED_DIR = "state"
_STEP_RE = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    # weights_only unpickling keeps tuples, but be robust to lists
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _full_model_state(model: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model_dir(model: nn.Module, path: Path, info: DistInfo, run_cfg=None) -> None:
    """Write the EmmaMamba.save layout (+ train_config.yaml) into ``path``. Collective under FSDP. A model with
    LoRA adapters is written merged (a plain model), its adapters beside it in ``lora.safetensors``."""
    from emma_mamba.config import save_config
    from emma_mamba.models.lora import LORA_FILE, export_state, has_lora, lora_metadata
    from emma_mamba.training.config import save_run_config

    lora = has_lora(model)
    if is_fsdp(model) or lora:
        # every rank must take part in an FSDP gather
        sd = _full_model_state(model) if is_fsdp(model) else model.state_dict()
        if info.is_main:
            from emma_mamba import __version__
            from emma_mamba.fileio import save_safetensors

            meta = {"format": "pt", "emma_mamba": __version__}
            adapters = None
            if lora:
                sd, adapters = export_state(model, sd)
            path.mkdir(parents=True, exist_ok=True)
            save_config(model.config, path / "config.yaml")
            save_safetensors({k: v.contiguous() for k, v in sd.items()}, path / "model.safetensors", metadata=meta)
            if adapters is not None:
                save_safetensors(adapters, str(path / LORA_FILE), metadata={**meta, **lora_metadata(model)})
            model.tokenizer.save(path)
    elif info.is_main:
        model.save(path)
    if info.is_main and run_cfg is not None:
        save_run_config(run_cfg, path / "train_config.yaml")


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict,
                    run_cfg, info: DistInfo, keep_last: int = 0, fmt: str = "full", async_save: bool = False):
    """Write checkpoint ``step`` (collective: every rank calls it) in layout ``fmt`` (full or sharded: see the
    module docstring). Returns the final directory; with ``async_save`` (sharded only) an :class:`AsyncCheckpoint`
    whose shards are still being written (its ``path`` appears when they are; ``wait()`` before the next save)."""
    if fmt not in ("full", "sharded"):
        raise ValueError(f"checkpoint format must be full or sharded, got {fmt!r}")
    if async_save and fmt != "sharded":
        raise ValueError("async_save needs the sharded checkpoint format")
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    future = None
    if fmt == "sharded":
        if info.is_main:
            _save_description(model, tmp, run_cfg)
            from emma_mamba.models.lora import has_lora, lora_metadata

            extra = {"format": "sharded", "lora": lora_metadata(model) if has_lora(model) else None}
            _torch_save({"scheduler": scheduler.state_dict(), **extra, **state}, tmp / STATE_NAME)
        _torch_save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
        # the small files first: with async_save they must be on disk before DCP's metadata (written last,
        # after every rank's shards) lets rank 0 rename the directory
        future = _save_sharded(tmp, model, optimizer, info, async_save)
    else:
        save_model_dir(model, tmp, info, run_cfg)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # keyed by parameter name whatever the strategy (see the module docstring); gathered to rank 0 under FSDP
        optim_sd = get_optimizer_state_dict(model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:
            _torch_save({"optimizer": optim_sd, "scheduler": scheduler.state_dict(), **state}, tmp / STATE_NAME)
        _torch_save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if future is not None:
        return AsyncCheckpoint(future, tmp, final, keep_last, info.is_main)
    barrier()
    if info.is_main:
        _finalize(tmp, final, keep_last)
    barrier()
    return final


def _torch_save(obj, path: Path) -> None:
    """``torch.save``, whose failure to write (a full disk: "unexpected pos 64 vs 0", "file write failed") is a
    RuntimeError, raised as the OSError it is (what the trainer reports in one line with the last checkpoint)."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        raise OSError(f"writing {path.name} failed ({_last_line(e)}{free})") from e


def write_failure(e: BaseException) -> str | None:
    """Why a checkpoint or model write failed, when ``e`` is how one fails: an OSError (:func:`_torch_save`'s
    too) or safetensors' SafetensorError (a full disk: "I/O error: No space left on device (os error 28)"); None
    for any other error."""
    from safetensors import SafetensorError

    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, SafetensorError):
        return _last_line(e).removeprefix("Error while serializing: ")
    return None


def _finalize(tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0: the complete ``tmp`` becomes ``final``; older step checkpoints beyond ``keep_last`` go."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:  # among this run's steps: later ones of a run resumed from an earlier step are left alone
        m = _STEP_RE.match(final.name)
        steps = sorted(x for x in _complete_steps(final.parent) if x[0] <= int(m.group(1)))
        for s, p in steps[:-keep_last]:
            shutil.rmtree(p)
    log.info("checkpoint written: %s", final)


class AsyncCheckpoint:
    """A sharded checkpoint whose shards a background thread is writing (``checkpoint.async_save``).

    Rank 0's DCP future completes after DCP has gathered every rank's write results and written the metadata,
    so rank 0 alone renames ``step_N.tmp`` to ``path`` then, from the writer thread, without a collective;
    training goes on meanwhile. :meth:`wait` (every rank) blocks until that is done and raises TrainingError if
    the write failed (the checkpoint then stays ``.tmp``, never resumed from)."""

    def __init__(self, future, tmp: Path, final: Path, keep_last: int, is_main: bool):
        self.path, self._tmp, self._keep_last = final, tmp, keep_last
        self._future = future
        self._error: BaseException | None = None
        self._finalized = threading.Event()
        if is_main:
            future.add_done_callback(self._finish)
        else:
            self._finalized.set()

    def _finish(self, future) -> None:
        try:
            future.result()
            _finalize(self._tmp, self.path, self._keep_last)
        except BaseException as e:  # noqa: BLE001 - reported by wait() in the training thread
            self._error = e
        finally:
            self._finalized.set()

    def done(self) -> bool:
        return self._future.done() and self._finalized.is_set()

    def wait(self) -> Path:
        import torch.distributed.checkpoint as dcp

        try:
            self._future.result()
        except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
            raise TrainingError(f"writing checkpoint {self.path} in the background failed ({_last_line(e)}); it "
                                f"stays {self._tmp.name} and is not resumed from") from e
        self._finalized.wait()
        if self._error is not None:
            raise TrainingError(f"finishing checkpoint {self.path} failed: {self._error}") from self._error
        return self.path


_ASYNC_GROUP = None


def _async_group():
    """A gloo process group for DCP's writer thread (its collectives run beside the training's, on the CPU;
    created once, collectively, at the first async save)."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None:
        import torch.distributed as dist

        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def _save_description(model: nn.Module, path: Path, run_cfg) -> None:
    """config.yaml, tokenizer.json and train_config.yaml: what makes a sharded checkpoint describe itself."""
    from emma_mamba.config import save_config
    from emma_mamba.training.config import save_run_config

    save_config(model.config, path / "config.yaml")
    model.tokenizer.save(path)
    if run_cfg is not None:
        save_run_config(run_cfg, path / "train_config.yaml")


def _dcp(fn, state: dict, path: Path, no_dist: bool) -> None:
    """dcp.save / dcp.load of ``state`` at ``path``; ``no_dist``: this process alone (DCP's warning that it
    assumes so is expected here, and silenced). A load reads only plain data (see :func:`_check_metadata`); its
    failure (a refused entry, a missing or truncated shard file) is one RuntimeError naming ``path``."""
    import inspect
    import warnings

    import torch.distributed.checkpoint as dcp

    kw = {"no_dist": True} if no_dist and "no_dist" in inspect.signature(fn).parameters else {}
    planner = None
    if fn is dcp.load:
        _check_metadata(path)
        kw["planner"] = planner = _plain_data_load_planner()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            fn(state, checkpoint_id=str(path), **kw)
        except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - DCP wraps every rank's error
            if planner is None:  # a save
                raise TrainingError(f"writing {path} failed ({_last_line(e)}); the checkpoint stays incomplete and "
                                    f"is not resumed from") from e
            if planner.refused:
                raise TrainingError(f"{path}: {planner.refused}") from None
            raise TrainingError(f"{path}: reading the checkpoint failed ({_last_line(e)}); it is incomplete or "
                                f"corrupt") from e


def _last_line(e: BaseException) -> str:
    """An error's last non-empty line (DCP's CheckpointException holds each rank's traceback: its last line is the
    error itself), or its type's name."""
    return next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)


# DCP unpickles its .metadata with pickle.load and its non-tensor entries with torch.load(weights_only=False): a
# file from elsewhere could run code when read. Loading never runs code from a file (DESIGN.md), so the metadata is
# first unpickled with only the classes DCP writes there allowed, and every non-tensor entry with weights_only.
_METADATA_GLOBALS = {  # and every class of torch.distributed.checkpoint.metadata (dataclasses and enums)
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def _check_metadata(state_dir: Path) -> None:
    """Unpickle ``state_dir/.metadata`` allowing only what DCP writes there (its metadata classes, torch.Size,
    dtypes, layouts, paths); anything else is refused by name before DCP reads the file itself."""
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if name in _METADATA_GLOBALS.get(module, ()) or (
                    module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))):
                return super().find_class(module, name)
            if module == "torch.distributed.checkpoint.metadata":
                import torch.distributed.checkpoint.metadata as md

                if isinstance(getattr(md, name, None), type):
                    return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    path = Path(state_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            Restricted(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: an incomplete sharded checkpoint") from None
    except Exception as e:  # noqa: BLE001 - refused globals, truncation, another format: name the file
        raise TrainingError(f"{path}: not a sharded checkpoint's metadata that loads as plain data ({e}); "
                            f"it is refused, as loading never runs code from a file") from e


def _plain_data_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class PlainDataLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, reading each non-tensor entry (the optimizer's hyperparameters) only after
        ``torch.load(weights_only=True)`` has accepted it."""

        refused: str | None = None

        def load_bytes(self, read_item, value):
            start = value.tell()
            try:
                torch.load(value, weights_only=True)
            except Exception as e:  # noqa: BLE001
                why = next((line.strip().split(". ")[0] for line in str(e).splitlines()
                            if "Unsupported global" in line), type(e).__name__)
                self.refused = (f"the checkpoint entry {read_item.dest_index.fqn} is not plain data ({why}); it is "
                                f"refused, as loading never runs code from a file")
                raise TrainingError(self.refused) from e
            value.seek(start)
            super().load_bytes(read_item, value)

    return PlainDataLoadPlanner()


def _save_sharded(path: Path, model: nn.Module, optimizer, info: DistInfo, async_save: bool = False):
    """DCP save of the model and optimizer states; with ``async_save`` the states are staged in host memory
    before this returns and written by a background thread: returns its future (else None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)  # DTensor shards under FSDP, plain tensors otherwise
    # every rank writes its shards (a tensor every rank holds whole, once); rank 0 the metadata
    if not async_save:
        _dcp(dcp.save, {"model": msd, "optimizer": osd}, path / SHARDED_DIR, not info.distributed)
        return None
    import warnings

    if not info.distributed:  # DCP's notice that it assumes one process, also raised from its writer thread
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    kw = {"no_dist": True} if not info.distributed else {"process_group": _async_group()}
    resp = dcp.async_save({"model": msd, "optimizer": osd}, checkpoint_id=str(path / SHARDED_DIR), **kw)
    staged = getattr(resp, "staging_completion", None)  # newer torch: (staging, upload) futures
    if staged is not None:
        staged.result()  # the live tensors may change from the next step on: the copy must be complete
        resp = resp.upload_completion
    return resp


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` holds a sharded (DCP) model state (``checkpoint.format: sharded``)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def _sharded_model_meta(path: Path) -> dict:
    """{parameter name: (shape, dtype)} of the model state in a sharded checkpoint's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check_metadata(path / SHARDED_DIR)
    try:
        meta = dcp.FileSystemReader(str(path / SHARDED_DIR)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
        raise TrainingError(f"{path / SHARDED_DIR}: cannot read the sharded checkpoint's metadata ({e})") from e
    return {k[len("model."):]: (tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}


def read_sharded_model(path: str | Path, skip=lambda key: False) -> dict:
    """The whole model state of a sharded checkpoint as plain CPU tensors, read in this process alone (no
    process group needed, whatever number of ranks wrote it). ``skip(name)``: names not to read."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_sharded(path):
        raise FileNotFoundError(f"{path} has no {SHARDED_DIR}/.metadata: not a sharded checkpoint (or an incomplete one)")
    sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in _sharded_model_meta(path).items() if not skip(k)}
    _dcp(dcp.load, {"model": sd}, path / SHARDED_DIR, True)  # a bad shard file: an error naming the checkpoint
    return sd


def _read(file: Path, reader):
    """``reader(file)``, a read failure turned into one TrainingError naming the file (and, in a run's
    checkpoints folder, the other complete checkpoints to resume from instead)."""
    try:
        return reader(file)
    except TrainingError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader's failure (OSError, EOFError, SafetensorError, pickle)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"{file} cannot be read ({first}): the checkpoint is incomplete or corrupt"
                            f"{_others_hint(file.parent)}") from e


def _others_hint(ckpt: Path) -> str:
    """'; the other checkpoints of this run: ...' (the newest three complete ones beside checkpoint directory
    ``ckpt``), or '' when there is none: what every error about a checkpoint's files ends with."""
    others = [str(p) for _, p in sorted(_complete_steps(Path(ckpt).parent)) if p != Path(ckpt)]
    return f"; the other checkpoints of this run: {', '.join(others[-3:])}" if others else ""


def _torch_read(file: Path):
    return _read(file, lambda f: torch.load(f, map_location="cpu", weights_only=True))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, info: DistInfo) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path`` (either layout); returns the saved
    state dict (data position, counters) without the optimizer/scheduler/layout entries."""
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_NAME}); --resume takes a "
                                f"checkpoints/step_N directory or 'auto'{_others_hint(path)}")
    rng_file = path / f"rng_rank{info.rank}.pt"
    rng_rank0 = path / "rng_rank0.pt"
    if not rng_rank0.is_file():
        raise FileNotFoundError(f"{path} has no {rng_rank0.name}: the checkpoint is incomplete{_others_hint(path)}")
    state = _torch_read(state_file)
    if not isinstance(state, dict) or "scheduler" not in state:
        raise TrainingError(f"{state_file} is not a trainer state (no scheduler entry): the checkpoint is corrupt")
    if state.get("format") == "sharded":
        _load_sharded(path, model, optimizer, state, info)
    else:
        _load_full(path, model, optimizer, state, info)
    scheduler.load_state_dict(state["scheduler"])
    if rng_file.is_file():
        set_rng_state(_torch_read(rng_file))
    else:  # more processes than the writing run: rank 0's state, then a seed of this rank's own
        set_rng_state(_torch_read(rng_rank0))
        seed = (int(torch.randint(0, 2**31 - 1, (1,))) + 7919 * info.rank) % (2**31 - 1)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "format", "lora")}


def _load_full(path: Path, model: nn.Module, optimizer, state: dict, info: DistInfo) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from emma_mamba.models.lora import LORA_FILE, has_lora

    osd = state["optimizer"]
    by_name = all(isinstance(i, str) for g in osd.get("param_groups", []) for i in g["params"])
    lora = has_lora(model)
    if lora and not (path / LORA_FILE).is_file():
        raise TrainingError(f"{path} has no {LORA_FILE}: it was not written by a run with train.lora, which this "
                           f"run has (resume it with the same train.lora)")
    if not lora and (path / LORA_FILE).is_file():
        raise TrainingError(f"{path} was written by a run with train.lora (it has {LORA_FILE}); this run has none: "
                           f"resume it with the same train.lora, or start a new run from it with init_from")
    if is_fsdp(model):
        if not by_name:
            raise TrainingError(f"{path}: its optimizer state is keyed by position (a checkpoint of an earlier "
                               f"version, written without FSDP); resume it with parallel.strategy ddp or none")
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        current = _full_model_state(model) if lora else None  # collective
        sd = _read(path / "model.safetensors", lambda f: load_file(str(f))) if info.is_main else {}
        if lora and info.is_main:
            sd = _lora_state(model, current, sd, _read(path / LORA_FILE, lambda f: load_file(str(f))), path)
        set_model_state_dict(model, sd, options=opts)
        _load_optimizer(path, lambda: set_optimizer_state_dict(model, optimizer, osd if info.is_main else {},
                                                               options=opts))
    else:
        dev = str(info.device)
        sd = _read(path / "model.safetensors", lambda f: load_file(str(f), device=dev))
        own = model.state_dict()
        if lora:
            sd = _lora_state(model, own, sd, _read(path / LORA_FILE, lambda f: load_file(str(f), device=dev)), path)
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise TrainingError(f"{path}/model.safetensors does not match the model of this run: missing "
                               f"{missing[:6]}, unexpected {unexpected[:6]}")
        bad = next((k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)), None)
        if bad is not None:
            raise TrainingError(f"{path}/model.safetensors does not match the model of this run: {bad} has shape "
                                f"{tuple(sd[bad].shape)} there, {tuple(own[bad].shape)} here")
        model.load_state_dict(sd, strict=True)
        if by_name:
            _load_optimizer(path, lambda: set_optimizer_state_dict(model, optimizer, osd,
                                                                   options=StateDictOptions(full_state_dict=True)))
        else:
            _load_optimizer(path, lambda: optimizer.load_state_dict(osd))


def _lora_state(model, current, saved, adapters, path: Path) -> dict:
    """:func:`emma_mamba.models.lora.resume_state`, its refusals (another train.lora.r, other base weights) as the
    run's one-line TrainingError."""
    from emma_mamba.models.lora import resume_state

    try:
        return resume_state(model, current, saved, adapters, str(path))
    except RuntimeError as e:
        raise TrainingError(str(e)) from None


def _load_optimizer(path: Path, load) -> None:
    """The optimizer's state from the checkpoint: one that holds other parameters than this run trains (another
    train.trainable, stage or vision.freeze) is a TrainingError saying so, not torch's KeyError."""
    try:
        load()
    except (KeyError, ValueError, RuntimeError) as e:
        # torch's loaders' words for parameters that are not there (not a failed collective or an OOM: raised)
        if isinstance(e, RuntimeError) and not any(w in str(e) for w in ("optimizer state", "param_groups",
                                                                        "parameter group")):
            raise
        raise TrainingError(f"{path}: its optimizer state does not fit this run's trainable parameters ({_last_line(e)}"
                            f"): resume with the run's own train.trainable, stage and model.vision.freeze, or start "
                            f"a new run from the checkpoint with init_from") from None


def _load_sharded(path: Path, model: nn.Module, optimizer, state: dict, info: DistInfo) -> None:
    """Every rank reads the parts of its own shards (DCP reshards: any number of writing processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from emma_mamba.models.lora import has_lora

    if not is_sharded(path):
        raise FileNotFoundError(f"{path} has no {SHARDED_DIR}/.metadata: an incomplete sharded checkpoint")
    lora = has_lora(model)
    if lora != bool(state.get("lora")):
        raise TrainingError(f"{path} was written by a run {'with' if state.get('lora') else 'without'} train.lora, "
                           f"this run has {'it' if lora else 'none'}: resume it with the same train.lora"
                           + ("" if lora else ", or start a new run from it with init_from"))
    msd, osd = get_state_dict(model, optimizer)
    saved = _sharded_model_meta(path)
    own = {k: tuple(v.shape) for k, v in msd.items()}
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise TrainingError(f"{path}/{SHARDED_DIR} does not match the model of this run: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}")
    bad = [f"{k} {saved[k][0]} vs {own[k]}" for k in own if saved[k][0] != own[k]]
    if bad:
        raise TrainingError(f"{path}/{SHARDED_DIR} does not match the model of this run (saved vs this run's "
                           f"shapes): {'; '.join(bad[:4])}")
    _dcp(dcp.load, {"model": msd, "optimizer": osd}, path / SHARDED_DIR, not info.distributed)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            out.append((int(m.group(1)), p))
    return out


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = _complete_steps(Path(output_dir) / CHECKPOINT_DIR)
    return max(steps)[1] if steps else None


def _incomplete_steps(root: Path) -> list[tuple[int, Path]]:
    """step_N directories of ``root`` without a trainer state (files deleted or lost: never resumed from)."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_RE.match(p.name)) and p.is_dir() and not (p / STATE_NAME).is_file())


def _final_model(output_dir: Path) -> bool:
    return (Path(output_dir) / "model.safetensors").is_file()


def resolve_resume(resume: str | None, output_dir: Path, stage: str | None = None) -> Path | None:
    """What a run in ``output_dir`` starts from, by ``--resume``: None (a fresh run: refused with
    FileExistsError where output_dir already holds a run's checkpoints or final model), 'auto' (its latest
    complete checkpoint; a fresh run when it has none, refused where it holds a finished run's final model), or
    a checkpoint directory. ``stage``: this run's (pretrain / finetune); a checkpoint of the other one is refused
    (:func:`check_resume_stage`). Incomplete checkpoints 'auto' passes over are named in a warning."""
    output_dir = Path(output_dir)
    if resume is None:
        last = latest_checkpoint(output_dir)
        if last is not None:
            raise FileExistsError(f"output_dir {output_dir} already holds a run (checkpoints up to {last.name}"
                                  f"{' and a final model' if _final_model(output_dir) else ''}); pass --resume auto "
                                  f"to continue it, or choose another output_dir")
        if _final_model(output_dir):
            raise FileExistsError(f"output_dir {output_dir} already holds a finished run (a final model, no "
                                  f"checkpoints to resume from); choose another output_dir for a new run (or start "
                                  f"one from this model with init_from)")
        metrics = output_dir / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size:  # a run stopped before its first checkpoint
            raise FileExistsError(f"output_dir {output_dir} holds the metrics.jsonl of an earlier run that wrote no "
                                  f"checkpoint (nothing to resume), which a new run would replace; choose another "
                                  f"output_dir, or pass --resume auto to start over in this folder (the old file is "
                                  f"kept as metrics.jsonl.prev)")
        return None
    if resume == "auto":
        p = latest_checkpoint(output_dir)
        root = output_dir / CHECKPOINT_DIR
        passed = [d for s, d in _incomplete_steps(root) if p is None or s > int(_STEP_RE.match(p.name).group(1))]
        if passed:
            log.warning("--resume auto: passing over incomplete checkpoint(s) %s (no %s: the files were deleted "
                        "or not all written); %s", ", ".join(str(d) for d in passed), STATE_NAME,
                        f"resuming from {p}, the newest complete one" if p is not None else
                        "there is no complete checkpoint")
        if p is None:
            if _final_model(output_dir):
                raise FileExistsError(f"--resume auto: output_dir {output_dir} holds a finished run: its final model "
                                      f"and no checkpoint in {root} (checkpoint.every_steps was 0, or they were "
                                      f"removed), so there is nothing to resume; choose another output_dir for a new "
                                      f"run (or start one from this model with init_from)")
            log.info("--resume auto: no checkpoint in %s, starting a fresh run", root)
            return None
        check_resume_stage(p, stage, "--resume auto: its newest checkpoint")
        return p
    p = Path(resume)
    if not (p / STATE_NAME).is_file():
        raise FileNotFoundError(_not_a_checkpoint(resume, p, output_dir))
    check_resume_stage(p, stage)
    return p


def _not_a_checkpoint(resume: str, p: Path, output_dir: Path) -> str:
    """Why ``--resume p`` is not a checkpoint directory, and what to pass instead (a run's output_dir or its
    checkpoints folder: its newest checkpoint, or --resume auto)."""
    msg = f"--resume {resume}: not a checkpoint directory (expected {p / STATE_NAME})"
    if not p.exists():
        close = difflib.get_close_matches(resume, ["auto"], n=1, cutoff=0.6)
        return (f"--resume {resume}: no such file or directory (--resume takes 'auto' or a checkpoint directory"
                + ("; did you mean 'auto'?)" if close else ")"))
    if not p.is_dir():  # a file of the checkpoint (model.safetensors, trainer_state.pt): its folder is what resumes
        return f"--resume {resume} is a file; give its directory: {p.parent}"
    run = p if (p / CHECKPOINT_DIR).is_dir() else p.parent if p.name == CHECKPOINT_DIR else None
    last = latest_checkpoint(run) if run is not None else None
    if last is not None:
        what = "a run's output_dir" if run == p else "a run's checkpoints folder"
        same = run.resolve() == Path(output_dir).resolve()
        auto = "--resume auto, which continues this run from it" if same else f"--resume auto with output_dir {run}"
        return f"{msg}: it is {what}; pass its newest checkpoint, --resume {last}, or {auto}"
    if _STEP_RE.match(p.name):
        return f"{msg}: the checkpoint is incomplete (its {STATE_NAME} is missing){_others_hint(p)}"
    if _final_model(p):
        return (f"{msg}: it holds a run's final model and no checkpoints, so there is nothing to resume; start a new "
                f"run from it with init_from {p}")
    return msg


STAGE_NAMES = {"pretrain": "stage-1 (pretrain)", "finetune": "stage-2 (finetune)"}


def check_resume_stage(path: Path, stage: str | None, said: str = "--resume") -> None:
    """Refuse, with a ConfigError saying so first, to resume checkpoint ``path`` of another stage than ``stage``
    (its train_config.yaml's ``stage``): a stage-2 command given a stage-1 checkpoint would otherwise warn about
    optimizer settings and then fail on the alignment head's missing weights. Nothing to check without
    ``stage`` or the file (its other contents are checked when the run's config is compared)."""
    import yaml

    f = Path(path) / "train_config.yaml"
    if stage is None or not f.is_file():
        return
    try:
        theirs = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # named when the configs are compared
    theirs = theirs.get("stage") if isinstance(theirs, dict) else None
    if theirs is None or theirs == stage:
        return
    from emma_mamba.config import ConfigError

    p = Path(path)
    run = p.parent.parent if p.parent.name == CHECKPOINT_DIR else p
    name = STAGE_NAMES.get(theirs, f"stage {theirs!r}")
    msg = (f"{said} {path} is a {name} checkpoint (its train_config.yaml says stage: {theirs}), but this is a "
           f"{STAGE_NAMES.get(stage, stage)} run; --resume continues a run of the same stage")
    if theirs == "pretrain" and stage == "finetune":
        msg += (f". To start stage 2 from stage 1's result, drop --resume and set init_from: {run} (the stage-1 "
                f"run's output_dir; or this checkpoint)")
    else:
        msg += f". To continue that run, use `emma-mamba {theirs}`"
    raise ConfigError(msg)
