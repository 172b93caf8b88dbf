"""`emma-mamba quickstart`: the whole pipeline on a laptop CPU in minutes, with no download.

    emma-mamba quickstart [--out runs/quickstart] [--seed 0] [--fast] [--config configs/quickstart.yaml]
                          [--resume | --overwrite]

Steps (each one the library's own code path, nothing special-cased):

1. ShapesWorld (:mod:`emma_mamba.data.shapes`): training images with captions (stage 1) and conversations
   (stage 2), held-out images with POPE / VQAv2 / GQA files; the blind (question-only) baseline of
   :func:`~emma_mamba.data.shapes.blind_baseline` is scored as the chance level.
2. Stage 0 (when the recipe has a ``clip`` section): a tiny CLIP, both open_clip towers, trained with CLIP's
   contrastive loss on the stage-1 captions (:mod:`emma_mamba.training.clip_pretrain`), standing in for the
   pretrained CLIP that EMMA-Mamba starts from and that cannot be downloaded here; it becomes the model's
   ``vision.pretrained``.
3. Stage 1 (alignment) and stage 2 (instruction tuning) with :class:`emma_mamba.training.trainer.Trainer` on
   the ``tiny`` preset (random-initialised: there is nothing to download), from run configs built the same
   way ``emma-mamba pretrain|finetune`` builds them.
4. Held-out evaluation with :func:`emma_mamba.eval.runner.evaluate` (VQAv2-style, GQA-style, POPE random /
   popular / adversarial), one demo answer about one held-out image, and a summary table: the model's numbers
   next to the blind baseline's. Everything is written under ``--out`` (``summary.json`` holds the table).

The recipe (data size, model overrides, steps, learning rates) lives in ``configs/quickstart.yaml``; ``--fast``
uses ``configs/quickstart_fast.yaml``, a seconds-long smoke run of the same pipeline (its numbers mean
nothing). The keys are checked strictly: an unknown key is an error naming the file and the key.

An interrupted run (Ctrl-C, SIGTERM) continues with ``--resume``: the steps it finished are reused, a training
stage that Ctrl-C or SIGTERM stopped continues from the checkpoint it wrote (a second Ctrl-C, which stops at once,
writes none: that stage starts again), and the evaluation runs again; the recipe and seed must be the run's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from emma_mamba.fileio import text_lines, write_whole

__all__ = ["QuickstartConfig", "load_quickstart_config", "run_pipeline", "format_table", "recipe_path"]

log = logging.getLogger("emma_mamba.quickstart")

DEFAULT_CONFIG = "quickstart.yaml"
FAST_CONFIG = "quickstart_fast.yaml"

CLIP_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps")

EVAL_TASKS = ("vqav2", "gqa", "pope_random", "pope_popular", "pope_adversarial")


def run_environment() -> dict:
    """Where a quickstart or ablation ran: the device its training used, the kernel backend on it, threads,
    platform and torch (kept in its summary.json beside the results)."""
    import torch

    from emma_mamba import ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device": device, "backend": ops.get_backend(device), "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__}


@dataclass
class QuickstartConfig:
    """The quickstart recipe. Stage sections are run-config overrides (configs/train_*.yaml keys)."""

    data: dict = field(default_factory=dict)
    """ShapesConfig fields (n_train, n_heldout, image_size, ...); the seed comes from --seed."""
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    """Model config (a mapping with an optional preset, as in configs/model_*.yaml)."""
    clip: dict = field(default_factory=dict)
    """Stage 0, contrastive CLIP pretraining of the model's open_clip towers on the stage-1 captions
    (emma_mamba.training.clip_pretrain): steps (0 or absent = none), batch_size, lr, weight_decay,
    warmup_steps. Its checkpoint becomes the model's vision.pretrained, as a downloaded CLIP would."""
    stage1: dict = field(default_factory=dict)
    """Overrides of the stage-1 run config (train.*, data.max_length, ...)."""
    stage2: dict = field(default_factory=dict)
    """Overrides of the stage-2 run config."""
    eval: dict = field(default_factory=dict)
    """batch_size, max_new_tokens, and limit (questions per task; null = all)."""


def recipe_path(config: str | None, fast: bool = False) -> Path:
    """The quickstart recipe to run: ``config`` (a file, or a shipped recipe's name), else the shipped
    quickstart.yaml (quickstart_fast.yaml with ``fast``)."""
    from emma_mamba.config import resolve_config_path

    return resolve_config_path(config or (FAST_CONFIG if fast else DEFAULT_CONFIG), "quickstart config")


def load_quickstart_config(path: str | Path) -> QuickstartConfig:
    from emma_mamba.config import ConfigError, resolve_config_path, yaml_float

    path = resolve_config_path(path, "quickstart config")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    names = [f.name for f in fields(QuickstartConfig)]
    for k, v in raw.items():
        if k not in names:
            raise ConfigError(f"{path}: unknown key {k!r}; valid keys: {', '.join(names)}")
        if not isinstance(v, dict):
            raise ConfigError(f"{path}: {k} must be a mapping, got {type(v).__name__}")
    for section, valid in (("eval", ("batch_size", "max_new_tokens", "limit")), ("clip", CLIP_KEYS)):
        for k in raw.get(section, {}):
            if k not in valid:
                raise ConfigError(f"{path}: unknown key {section}.{k}; valid keys: {', '.join(valid)}")
    # stage 0's values go straight to pretrain_clip / AdamW: a wrong type would end in a TypeError there (PyYAML
    # reads `lr: 1e-3` as the text '1e-3': a number here, as in the run configs)
    clip = raw.get("clip", {})
    for k, v in list(clip.items()):
        if k in ("lr", "weight_decay"):
            v = clip[k] = yaml_float(v)
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (v > 0 if k == "lr" else v >= 0))
            want = "a number > 0" if k == "lr" else "a number >= 0"
        else:  # steps (or null), batch_size, warmup_steps: counts
            low = 2 if k == "batch_size" else 0
            ok = (v is None and k == "steps") or (isinstance(v, int) and not isinstance(v, bool) and v >= low)
            want = f"an integer >= {low}"
        if not ok:
            raise ConfigError(f"{path}: clip.{k} must be {want}, got {v!r}")
    for k, v in (raw.get("eval") or {}).items():  # checked here, not after both training stages
        if not ((v is None and k == "limit") or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)):
            want = "an integer >= 1" + (" or null (every question)" if k == "limit" else "")
            raise ConfigError(f"{path}: eval.{k} must be {want}, got {v!r}")
    return QuickstartConfig(**raw)


def check_seed(seed: int, flag: str = "--seed") -> None:
    """The seed is the stages' train.seed: refused up front where the trainer could not use it."""
    from emma_mamba.config import ConfigError
    from emma_mamba.training.config import SEED_LIMIT

    if not -SEED_LIMIT <= seed <= SEED_LIMIT:
        raise ConfigError(f"{flag} must be between -2**43 and 2**43 (the trainer seeds torch with seed * 1000003 + "
                          f"epoch, a 64-bit integer), got {seed}")


def check_recipe(qc: QuickstartConfig, seed: int, source: str, model: dict | None = None) -> None:
    """Everything of the recipe that would otherwise fail only when its stage starts (after the data and stage 0,
    or after both training stages): the seed, the data section, the model, both stages' run configs (built as
    the stages build them, the word tokenizer stood in for) and the eval section (load_quickstart_config)."""
    from emma_mamba.data.shapes import ShapesConfig
    from emma_mamba.config import ConfigError

    check_seed(seed)
    try:
        ShapesConfig(seed=seed, **qc.data).validate()
    except TypeError as e:  # an unknown data key
        raise ConfigError(f"{source}: data: {e}") from None
    if int(qc.clip.get("steps", 0) or 0) > 0:
        clip_vision_config(qc)
    placeholder = Path("/nonexistent-quickstart-check")
    for stage in ("pretrain", "finetune"):
        _stage_config(qc, stage, placeholder, placeholder / "data", seed, source, model, check_only=True)


def _stage_config(qc: QuickstartConfig, stage: str, out: Path, data_dir: Path, seed: int, source: str,
                  model: dict | None = None, clip_checkpoint: Path | None = None, check_only: bool = False):
    """The RunConfig of one stage: the run defaults, then the quickstart file's stage overrides. ``model``
    (stage 1 only) replaces ``qc.model`` (the ablation passes each variant's model here). ``check_only``: before
    any data or stage 1 exists, to check the recipe (the word tokenizer a placeholder, stage 2 given stage 1's
    model instead of its checkpoint)."""
    from emma_mamba.training.config import run_config_from_dict

    is1 = stage == "pretrain"
    base = {
        "stage": stage,
        "output_dir": str(out / ("stage1" if is1 else "stage2")),
        "data": {"json": str(data_dir / "train" / ("stage1_captions.json" if is1 else "stage2_instruct.json")),
                 "image_folder": str(data_dir / "images")},
        "train": {"seed": seed},
        # validation loss on the held-out images' captions / conversations (val.every_steps: the recipe)
        "val": {"json": str(data_dir / "heldout" / ("captions.json" if is1 else "instruct.json")),
                "image_folder": str(data_dir / "images")},
        "checkpoint": {"every_steps": 0},
        "log": {"tensorboard": False},
    }
    if check_only:
        m = copy.deepcopy(qc.model if model is None else model)
        if (m.get("lm") or {}).get("tokenizer") == "shapesworld":
            m["lm"] = {**m["lm"], "tokenizer": "<shapesworld word tokenizer>", "vocab_size": 256}
        base["model"] = m
    elif is1:
        base["model"] = resolve_model(qc, qc.model if model is None else model, data_dir / "tokenizer",
                                      clip_checkpoint)
    else:
        base["init_from"] = str(out / "stage1")
    over = qc.stage1 if is1 else qc.stage2
    return run_config_from_dict(base, source=source, overrides=over, override_source=f"{source} ({stage})")


SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>", "[UNK]", "<|user|>", "<|assistant|>")


def build_word_tokenizer(data_dir: Path, out_dir: Path) -> Path:
    """A word-level tokenizer over the words of ShapesWorld's *training* text (captions, conversations, the
    chat template's tokens), written as ``out_dir/tokenizer.json``; unknown words map to ``[UNK]``.

    Why: the quickstart trains its LM from scratch, and the tiny preset's GPT-NeoX vocabulary (50k ids) makes
    the LM head and its 50k-way softmax most of the CPU time of a step, for a world of ~150 words. A
    ~200-id vocabulary makes the same steps several times faster (the model and the pipeline are otherwise the
    tiny preset's). It is an ordinary ``tokenizers`` JSON, saved into every checkpoint like any tokenizer.
    """
    import re

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words: set[str] = set()
    split = re.compile(r"\w+|[^\w\s]+")
    for name in ("stage1_captions.json", "stage2_instruct.json"):
        for rec in json.loads((data_dir / "train" / name).read_text()):
            for turn in rec["conversations"]:
                words.update(split.findall(turn["value"].replace("<image>", " ")))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # the same \w+|[^\w\s]+ split as above
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t != "[UNK]"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


def resolve_model(qc: QuickstartConfig, model: dict, tokenizer_dir: Path, clip_checkpoint: Path | None = None) -> dict:
    """The model mapping with ``lm.tokenizer: shapesworld`` replaced by the built word tokenizer (and
    ``lm.vocab_size`` set to its size), and ``vision.pretrained`` set to the stage-0 CLIP when there is one."""
    from emma_mamba.models.tokenizer import load_tokenizer

    model = copy.deepcopy(model)
    lm = model.get("lm") or {}
    if lm.get("tokenizer") == "shapesworld":
        path = tokenizer_dir / "tokenizer.json"
        lm["tokenizer"] = str(path)
        lm["vocab_size"] = len(load_tokenizer(path))
        model["lm"] = lm
    if clip_checkpoint is not None:
        model["vision"] = {**(model.get("vision") or {}), "pretrained": str(clip_checkpoint)}
    return model


def clip_vision_config(qc: QuickstartConfig):
    """The VisionConfig of the recipe's model (the towers stage 0 trains)."""
    from emma_mamba.config import config_from_dict

    return config_from_dict(copy.deepcopy(qc.model), source="quickstart config", path="model").vision


def pretrain_clip_stage(qc: QuickstartConfig, out: Path, data_dir: Path, seed: int, *, progress: bool = True,
                        echo=None, checkpoint: Path | None = None) -> tuple[Path | None, dict | None, float]:
    """Stage 0 into ``checkpoint`` (default ``out/clip/open_clip.pt``) when the recipe has ``clip.steps``;
    returns (checkpoint or None, summary, seconds)."""
    import torch

    from emma_mamba.training.clip_pretrain import pretrain_clip

    steps = int(qc.clip.get("steps", 0) or 0)
    if steps <= 0:
        if echo is not None:
            echo("[2/5] stage 0 (CLIP on captions): not in this recipe")
        return None, None, 0.0
    t0 = time.perf_counter()
    opts = {k: qc.clip[k] for k in CLIP_KEYS if k in qc.clip and k != "steps"}
    ckpt = checkpoint if checkpoint is not None else out / "clip" / "open_clip.pt"
    res = pretrain_clip(clip_vision_config(qc), data_dir / "train" / "stage1_captions.json", data_dir / "images",
                        ckpt, steps=steps, seed=seed, progress=progress,
                        device="cuda" if torch.cuda.is_available() else "cpu", **opts)
    dt = time.perf_counter() - t0
    if echo is not None:
        echo(f"[2/5] stage 0 (CLIP on captions): {steps} steps, loss {res['first_loss']:.3f} -> "
             f"{res['last_loss']:.3f}, in-batch retrieval {100 * res['last_i2t_acc']:.0f}% ({dt:.0f}s)")
    return ckpt, res, dt


def make_data(qc: QuickstartConfig, data_dir: Path, seed: int, blind_dir: Path) -> tuple[dict, dict, dict]:
    """ShapesWorld under ``data_dir`` and its blind baseline under ``blind_dir``.
    Returns (meta, blind answer files per task, blind metrics per task)."""
    from emma_mamba.data.shapes import ShapesConfig, generate

    meta = generate(ShapesConfig(seed=seed, **qc.data), data_dir)
    build_word_tokenizer(data_dir, data_dir / "tokenizer")
    return (meta, *blind_chance(data_dir, blind_dir))


def blind_chance(data_dir: Path, blind_dir: Path) -> tuple[dict, dict]:
    """The blind (question-only) baseline's answer files under ``blind_dir`` and their metrics per task, the
    chance levels (cheap: rebuilt wherever ShapesWorld is reused)."""
    from emma_mamba.data.shapes import blind_baseline
    from emma_mamba.eval.scorers import score

    files = blind_baseline(data_dir, blind_dir)
    return files, {t: score(t.split("_")[0], *files[t]) for t in EVAL_TASKS}


def train_stages(qc: QuickstartConfig, out: Path, data_dir: Path, seed: int, *, source: str, model: dict | None = None,
                 progress: bool = True, echo=None, clip_checkpoint: Path | None = None,
                 on_stage=None, done: dict | None = None, on_done=None) -> tuple[dict, dict]:
    """Stage 1 into ``out/stage1``, stage 2 into ``out/stage2``. Returns (per-stage history summary, seconds).
    ``on_stage(name)`` is called as each stage starts, ``on_done(stage, summary, seconds)`` as it ends.

    A resumed quickstart passes ``done``: {stage: {"summary", "seconds"}} of the stages an earlier run finished
    (not trained again; run_pipeline clears every folder after the first step not done). A stage not done whose
    folder holds a checkpoint (a stage stopped by Ctrl-C or SIGTERM writes one) continues from its newest one, as
    ``--resume auto`` does."""
    import torch

    from emma_mamba.training.checkpoint import latest_checkpoint
    from emma_mamba.training.trainer import Trainer

    done = done or {}
    histories, timings = {}, {}
    for k, stage in enumerate(("pretrain", "finetune"), 3):
        stage_dir = out / ("stage1" if stage == "pretrain" else "stage2")
        if stage in done:
            histories[stage], timings[stage] = done[stage]["summary"], done[stage]["seconds"]
            if echo is not None:
                echo(f"[{k}/5] {stage}: done earlier ({histories[stage]['steps']} steps, LM loss "
                     f"{histories[stage]['first_loss']:.3f} -> {histories[stage]['last_loss']:.3f})")
            continue
        t0 = time.perf_counter()
        if on_stage is not None:
            on_stage(f"stage {k - 2} ({stage})")
        last = latest_checkpoint(stage_dir)
        rc = _stage_config(qc, stage, out, data_dir, seed, source, model, clip_checkpoint)
        rc.log.progress_bar = progress
        # "auto" also where the stage stopped before its first checkpoint: a fresh start that keeps the stopped
        # run's metrics.jsonl as metrics.jsonl.prev (a plain new run is refused in a folder holding one)
        trainer = Trainer(rc, resume="auto", device=None if torch.cuda.is_available() else "cpu")
        trainer.fit()
        if last is None:
            h, val = trainer.history, trainer.val_history
        else:  # the steps before the checkpoint are in metrics.jsonl (the trainer keeps it one run across resumes;
            h, val = _logged_history(stage_dir / "metrics.jsonl")  # every step of it unless log.every_steps > 1)
        tail = h[-5:]
        histories[stage] = {"steps": trainer.global_step, "first_loss": h[0]["lm_loss"],
                            "last_loss": sum(m["lm_loss"] for m in tail) / len(tail),
                            "last_align_loss": sum(m["align_loss"] for m in tail) / len(tail),
                            "trainable_parameters": sum(p.numel() for p in trainer.params)}
        if val:  # held-out LM loss along the run: {step: loss}, and answer-token accuracy at the end
            histories[stage]["val_lm_loss"] = {v["step"]: round(v["val_lm_loss"], 4) for v in val}
            histories[stage]["val_token_acc"] = val[-1]["val_token_acc"]
        timings[stage] = time.perf_counter() - t0
        if echo is not None:
            held = (f"; held-out {val[-1]['val_lm_loss']:.3f} (best {min(v['val_lm_loss'] for v in val):.3f})"
                    if val else "")
            cont = f" (continued from {last.name})" if last is not None else ""
            echo(f"[{k}/5] {stage}: {trainer.global_step} steps{cont}, LM loss "
                 f"{histories[stage]['first_loss']:.3f} -> {histories[stage]['last_loss']:.3f} (the last "
                 f"{len(tail)} steps' mean){held} "
                 f"({timings[stage]:.0f}s)")
        del trainer
        if on_done is not None:
            on_done(stage, histories[stage], timings[stage])
    return histories, timings


def _logged_history(path: Path) -> tuple[list[dict], list[dict]]:
    """A run's step records and validation records, from its metrics.jsonl."""
    steps, val = [], []
    for line in text_lines(path.read_text(encoding="utf-8")):
        if line.strip():
            m = json.loads(line)
            (val if "val_lm_loss" in m else steps).append(m)
    return steps, val


def evaluate_heldout(model, qc: QuickstartConfig, data_dir: Path, out: Path, blind_files: dict, chance: dict, *,
                     checkpoint: str | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Every EVAL_TASKS file of the held-out split; returns (model metrics, chance metrics on the same
    questions) per task."""
    from emma_mamba.eval.runner import evaluate

    ev = qc.eval
    ho = data_dir / "heldout"
    files = {"vqav2": ho / "vqav2_questions.json", "gqa": ho / "gqa_questions.json",
             **{f"pope_{v}": ho / f"pope_{v}.jsonl" for v in ("random", "popular", "adversarial")}}
    results, chance = {}, dict(chance)
    for t in EVAL_TASKS:
        task = t.split("_")[0]
        ann = ho / "vqav2_annotations.json" if task == "vqav2" else None
        rep = evaluate(model, task, files[t], data_dir / "images", out / t, annotations=ann,
                       batch_size=ev.get("batch_size", 16), max_new_tokens=ev.get("max_new_tokens", 8),
                       limit=ev.get("limit"), checkpoint=checkpoint, progress=progress)
        results[t] = rep["metrics"]
        if ev.get("limit") is not None:  # the blind baseline on the same (first N) questions
            chance[t] = _score_subset(task, blind_files[t], out / t / "answers.jsonl")
    return results, chance


def summary_rows(results: dict, chance: dict) -> list[dict]:
    rows = []
    for t in EVAL_TASKS:
        m = results[t]
        row = {"task": t, "n": m["n"], "accuracy": m["accuracy"], "chance_accuracy": chance[t]["accuracy"]}
        if t.startswith("pope"):
            row.update(f1=m["f1"], chance_f1=chance[t]["f1"], yes_ratio=m["yes_ratio"])
        rows.append(row)
    return rows


def run_pipeline(qc: QuickstartConfig, out: str | Path, seed: int = 0, *, source: str = "<quickstart>",
                 overwrite: bool = False, resume: bool = False, progress: bool = True, echo=print) -> dict:
    """Runs the quickstart; returns (and writes to ``out/summary.json``) the summary.

    ``resume``: where ``out`` holds an unfinished quickstart of the same recipe and seed, continue it: the steps it
    finished (ShapesWorld, stage 0, stage 1, stage 2: each recorded in STATE_FILE as it ends) are reused, a training
    stage stopped by Ctrl-C or SIGTERM continues from its checkpoint, the step it stopped in otherwise starts again, and the
    held-out evaluation runs again (seconds). A finished quickstart's summary is returned as it is; an empty or
    absent ``out`` starts a new one."""
    from emma_mamba.data.shapes import SHORT_ANSWER_PROMPT
    from emma_mamba.models.vlm import answer, load

    out = Path(out)
    check_recipe(qc, seed, source)  # before anything is made, or an --overwrite deletes the previous run
    earlier = resumable_state(out, qc, seed) if resume else None
    if earlier is None:
        if resume:
            echo(f"nothing to resume in {out}: a new quickstart")
        prepare_out(out, overwrite)
        done = {}
    else:
        done = _reusable_steps(out, earlier)
        # (a finished run of an older version recorded no steps: its summary stands)
        if earlier.get("finished") and (len(done) == len(STEP_NAMES) or "done" not in earlier):
            try:
                summary = json.loads((out / "summary.json").read_text())
                echo(f"{out} holds this quickstart, finished: nothing to resume")
                return summary
            except (OSError, ValueError):  # its summary lost: the evaluation writes it again
                pass
        _check_writable(out)
        _clear_after(out, done)
        how = ("finished, but files of it are gone" if earlier.get("finished") else
               f"stopped during {earlier.get('stage')}")
        echo(f"resuming the quickstart in {out} ({how}): "
             + (f"reusing {', '.join(STEP_NAMES[k] for k in done)}" if done else "nothing of it is reusable"))
    reused = list(done)
    state = {"what": "emma-mamba quickstart", "seed": seed, "config": source,
             "recipe": asdict(qc), "stage": "data", "finished": False, "done": done}
    _write_state(out, state)

    def finished(step: str, **record) -> None:
        done[step] = record
        _write_state(out, state)

    t_all = time.perf_counter()
    t0 = time.perf_counter()
    data_dir = out / "data"
    if "data" in reused:
        meta = json.loads((data_dir / "meta.json").read_text())
        blind_files, chance = blind_chance(data_dir, out / "blind")
        timings = {"data": done["data"]["seconds"]}
    else:
        meta, blind_files, chance = make_data(qc, data_dir, seed, out / "blind")
        timings = {"data": time.perf_counter() - t0}
        finished("data", seconds=timings["data"])
    c = meta["counts"]
    echo(f"[1/5] ShapesWorld seed {seed}: {c['train_images']} train images ({c['stage1']} captions, "
         f"{c['stage2_turns']} QA turns), {c['heldout_images']} held-out images, {meta['config']['image_size']}px "
         + ("(done earlier)" if "data" in reused else f"({timings['data']:.1f}s)"))

    state["stage"] = "stage 0 (CLIP)"
    if "clip" in reused:
        clip_summary, timings["clip"] = done["clip"]["summary"], done["clip"]["seconds"]
        clip_ckpt = None if clip_summary is None else out / "clip" / "open_clip.pt"
        echo("[2/5] stage 0 (CLIP on captions): " + ("not in this recipe" if clip_summary is None else
                                                      f"done earlier ({clip_summary['steps']} steps)"))
    else:
        _write_state(out, state)
        clip_ckpt, clip_summary, timings["clip"] = pretrain_clip_stage(qc, out, data_dir, seed, progress=progress,
                                                                       echo=echo)
        finished("clip", summary=clip_summary, seconds=timings["clip"])

    def stage_started(name: str) -> None:
        state["stage"] = name
        _write_state(out, state)

    histories, t_train = train_stages(
        qc, out, data_dir, seed, source=source, progress=progress, echo=echo, clip_checkpoint=clip_ckpt,
        on_stage=stage_started, done=done,
        on_done=lambda stage, summary, seconds: finished(stage, summary=summary, seconds=seconds))
    timings.update(t_train)
    if clip_summary is not None:
        histories = {"clip": clip_summary, **histories}

    stage_started("held-out evaluation")
    t0 = time.perf_counter()
    model = load(out / "stage2")
    results, chance = evaluate_heldout(model, qc, data_dir, out / "eval", blind_files, chance,
                                       checkpoint=str(out / "stage2"), progress=progress)
    timings["eval"] = time.perf_counter() - t0
    echo(f"[5/5] evaluated on held-out ShapesWorld ({timings['eval']:.0f}s)")

    # one question about one held-out image, through the same `answer` that `emma-mamba generate` uses
    ho = data_dir / "heldout"
    demo_q = json.loads((ho / "vqav2_questions.json").read_text())["questions"][0]
    demo_a = json.loads((ho / "vqav2_annotations.json").read_text())["annotations"][0]
    raw = answer(model, data_dir / "images" / demo_q["image"], f"{demo_q['question']}\n{SHORT_ANSWER_PROMPT}",
                 max_new_tokens=8)
    demo = {"image": str(data_dir / "images" / demo_q["image"]), "question": demo_q["question"],
            "prompt": f"{demo_q['question']}\n{SHORT_ANSWER_PROMPT}",
            "expected": demo_a["multiple_choice_answer"], "model": raw.strip(), "raw": raw}

    timings["total"] = time.perf_counter() - t_all
    summary = {
        "seed": seed, "source": source, "data": meta["config"], "model": qc.model, "stage1": qc.stage1,
        "stage2": qc.stage2, "eval": qc.eval, "training": histories, "rows": summary_rows(results, chance),
        "demo": demo, "seconds": timings, **run_environment(),
    }
    if earlier is not None:  # (seconds: the reused steps' as they ran; total: theirs + this run's)
        timings["total"] += sum(done[k]["seconds"] for k in reused)
        summary["resumed"] = {"stopped_during": earlier.get("stage"), "reused": [STEP_NAMES[k] for k in reused]}
    write_whole(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    _write_state(out, {**state, "stage": None, "finished": True})
    return summary


STATE_FILE = "quickstart_run.json"
"""Written first into ``--out`` (seed, recipe, the stage in progress, finished or not, and under ``done`` each
step finished with its seconds and training summary): marks the folder as a quickstart's, so that ``--overwrite``
may replace it (and nothing else), says where an interrupted run stopped, and what ``--resume`` reuses."""

OUT_NAMES = ("data", "blind", "clip", "stage1", "stage2", "eval", "summary.json", STATE_FILE)
"""Everything a quickstart writes into ``--out`` (what ``--overwrite`` deletes)."""


class OutputFolderError(Exception):
    """``--out`` cannot hold this quickstart (a file, an unrelated folder, not writable, a previous run)."""


def _write_state(out: Path, state: dict) -> None:
    write_whole(out / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=1) + "\n"))


def read_state(out: Path) -> dict | None:
    """The folder's quickstart state (STATE_FILE), or None (no such file, or unreadable)."""
    try:
        doc = json.loads((Path(out) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


STEP_NAMES = {"data": "ShapesWorld", "clip": "stage 0 (CLIP)", "pretrain": "stage 1 (pretrain)",
              "finetune": "stage 2 (finetune)"}
"""The steps a quickstart records in STATE_FILE's ``done`` as each ends (what ``--resume`` may reuse), in order."""

STEP_DIRS = {"data": ("data", "blind"), "clip": ("clip",), "pretrain": ("stage1",), "finetune": ("stage2",)}


def _recipe_doc(qc: QuickstartConfig) -> dict:
    return json.loads(json.dumps(asdict(qc)))  # as STATE_FILE holds it (tuples as lists)


def resumable_state(out: Path, qc: QuickstartConfig, seed: int) -> dict | None:
    """The state of the quickstart in ``out`` that ``--resume`` continues, or None where ``out`` is absent or
    empty (a new run). Raises OutputFolderError for a folder a quickstart did not write, one without STATE_FILE,
    or a quickstart of another seed or recipe (its steps would not be this run's)."""
    _not_a_file(out)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not _is_quickstart_folder(out):
        raise OutputFolderError(f"{out} is not empty and does not look like a quickstart output; there is nothing to "
                                f"resume in it (choose another --out)")
    st = read_state(out)
    if st is None:
        raise OutputFolderError(f"{out} holds a quickstart without a readable {STATE_FILE} (which says what it "
                                f"finished), so it cannot be resumed; pass --overwrite to start it again")
    if st.get("seed") != seed:
        raise OutputFolderError(f"--resume: {out} holds the quickstart of seed {st.get('seed')}, and this command's "
                                f"--seed is {seed}; give --seed {st.get('seed')} to continue it, or --overwrite to "
                                f"start seed {seed} there")
    want, have = _recipe_doc(qc), st.get("recipe")
    if have != want:
        have = have if isinstance(have, dict) else {}
        differ = [k for k in want if have.get(k) != want[k]] or sorted(set(have) - set(want))
        raise OutputFolderError(f"--resume: {out} holds a quickstart of another recipe ({st.get('config')}; it "
                                f"differs in: {', '.join(differ)}); give the same --config (or --fast) to continue "
                                f"it, or --overwrite to start this recipe there")
    return st


def _reusable_steps(out: Path, st: dict) -> dict:
    """The leading steps of STATE_FILE's ``done`` whose files are all there: {step: its record} (a step after one
    that is not reused was built on it, so it is not reused either). Reads only."""
    recorded = st.get("done") if isinstance(st.get("done"), dict) else {}
    present = {"data": all((out / "data" / f).is_file() for f in ("meta.json", "tokenizer/tokenizer.json")),
               "clip": (recorded.get("clip") or {}).get("summary") is None or (out / "clip" / "open_clip.pt").is_file(),
               "pretrain": (out / "stage1" / "model.safetensors").is_file(),
               "finetune": (out / "stage2" / "model.safetensors").is_file()}
    done = {}
    for step in STEP_NAMES:
        if step not in recorded or not present[step]:
            break
        done[step] = recorded[step]
    return done


def _continued(out: Path, done: dict) -> tuple[str | None, Path | None]:
    """The first step after ``done`` (None: none left) and, for a training stage, the checkpoint it continues
    from (None: it starts again)."""
    from emma_mamba.training.checkpoint import latest_checkpoint

    todo = next((k for k in STEP_NAMES if k not in done), None)
    return todo, latest_checkpoint(out / STEP_DIRS[todo][0]) if todo in ("pretrain", "finetune") else None


def _clear_after(out: Path, done: dict) -> None:
    """Removes what the steps after ``done`` left, and the evaluation, except the checkpoints of the first
    training stage not done, which it continues from."""
    todo, last = _continued(out, done)
    for step in (s for s in STEP_NAMES if s not in done):
        for name in () if step == todo and last is not None else STEP_DIRS[step]:
            if (out / name).exists():
                shutil.rmtree(out / name)
    for name in ("eval", "summary.json"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _is_quickstart_folder(out: Path) -> bool:
    """Written by a quickstart: its state file, or (older versions, without one) its summary.json, or its data and
    nothing but the names a quickstart writes (an ablation's folder also has data/meta.json, and more)."""
    if (out / STATE_FILE).is_file():
        return True
    try:  # a quickstart's summary, not another command's summary.json (`eval --suite` writes one too)
        doc = json.loads((out / "summary.json").read_text())
        if isinstance(doc, dict) and {"rows", "demo", "training"} <= set(doc):
            return True
    except (OSError, ValueError):
        pass
    return (out / "data" / "meta.json").is_file() and all(p.name in OUT_NAMES for p in out.iterdir())


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` ready for a new quickstart: create it, or (with ``overwrite``) empty a previous quickstart's
    folder of what it wrote. Refuses, with OutputFolderError, anything else."""
    _not_a_file(out)
    try:
        if out.is_dir() and any(out.iterdir()):
            if not _is_quickstart_folder(out):
                raise OutputFolderError(f"{out} is not empty and does not look like a quickstart output; refusing "
                                        f"to {'delete' if overwrite else 'write into'} it (choose another --out)")
            if not overwrite:
                st = read_state(out)
                if st is None:
                    what = "a previous quickstart"
                elif st.get("finished"):
                    what = f"a finished quickstart (seed {st.get('seed')}, {st.get('config')})"
                else:
                    what = (f"an unfinished quickstart (seed {st.get('seed')}, {st.get('config')}), stopped during "
                            f"{st.get('stage')}")
                hint = "pass --resume to continue it, or " if st is not None and not st.get("finished") else "pass "
                raise OutputFolderError(f"{out} holds {what}; {hint}--overwrite to replace it (it starts again from "
                                        f"the data), or choose another --out")
            for sub in OUT_NAMES:
                p = out / sub
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    except OutputFolderError:
        raise
    except OSError as e:  # not writable, a file on the way, ...
        raise _unwritable(out, e) from None
    _check_writable(out)


def _not_a_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder; choose another --out")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / (STATE_FILE + ".tmp")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise _unwritable(out, e) from None


def _unwritable(out: Path, e: OSError) -> OutputFolderError:
    return OutputFolderError(f"cannot write into --out {out}: {e.strerror or e}"
                             + (f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""))


def _score_subset(task: str, blind: tuple[Path, Path], answered: Path) -> dict:
    """The blind baseline scored on the questions the model answered (when eval.limit cut the files)."""
    from emma_mamba.eval.scorers import score

    ids = {json.loads(line)["question_id"] for line in text_lines(answered.read_text(encoding="utf-8")) if line.strip()}
    ans, gold = blind
    doc = json.loads(ans.read_text()) if ans.suffix == ".json" else \
        [json.loads(line) for line in text_lines(ans.read_text(encoding="utf-8")) if line.strip()]
    key = "questionId" if task == "gqa" else "question_id"
    sub = [r for r in doc if r[key] in ids]
    tmp = answered.with_name("blind_subset.jsonl")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in sub))
    return score(task, tmp, gold, allow_missing=True)


def format_table(summary: dict) -> str:
    """The summary as a fixed-width table (percentages)."""
    lines = [f"{'held-out task':<18}{'n':>6}{'chance acc':>12}{'model acc':>11}{'chance F1':>11}{'model F1':>10}"]
    for r in summary["rows"]:
        f1 = f"{100 * r['chance_f1']:>11.1f}{100 * r['f1']:>10.1f}" if "f1" in r else f"{'':>11}{'':>10}"
        lines.append(f"{r['task']:<18}{r['n']:>6}{100 * r['chance_accuracy']:>12.1f}{100 * r['accuracy']:>11.1f}{f1}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI

def quiet_logs() -> None:
    """Logging of the pipeline commands (quickstart, ablate and its worker processes): stage logs at INFO would
    interleave with the progress bars; instruction-fusion truncation warnings (the tiny preset's short text
    context) are counted in the trainer's final line instead; "stage1 holds no alignment head" is expected."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("emma_mamba").setLevel(logging.WARNING)
    for name in ("emma_mamba.models.fusion", "emma_mamba.training.trainer", "emma_mamba.models.vlm"):
        logging.getLogger(name).setLevel(logging.ERROR)


def set_threads(n: int) -> None:
    """torch intra-op threads. Measured on the shared 2-core CPU: stage 2 of the quickstart ran at ~11 steps/s
    with 1 thread next to another busy process, and at 0.5-2 steps/s with torch's default 2-thread pool."""
    import torch

    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from emma_mamba.cli import positive_int

    p.add_argument("--out", default="runs/quickstart", help="output folder (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model init and the data order")
    p.add_argument("--fast", action="store_true",
                   help=f"smoke run in seconds ({FAST_CONFIG}): checks the pipeline, its numbers mean nothing")
    p.add_argument("--config", default=None,
                   help=f"quickstart recipe YAML (default {DEFAULT_CONFIG}, or {FAST_CONFIG} with --fast)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace a previous quickstart in --out")
    again.add_argument("--resume", action="store_true",
                       help="continue the unfinished quickstart in --out (same recipe and --seed): the steps it "
                            "finished are reused, a stage stopped by Ctrl-C or SIGTERM continues from its "
                            "checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (default 1: the tiny model's ops are too small to gain from a "
                        "thread pool, and a 2-thread pool stalls badly when another process holds a core)")


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training stage (whose trainer checkpoints and stops on its own): ends the command as
    Ctrl-C does, through the same clean-up, with exit code 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


def sigterm_as_interrupt():
    """Install the SIGTERM handler of the pipeline commands (main thread only); returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def interrupted_exit(e: BaseException) -> tuple[str, int]:
    """(what stopped the command, exit code) for Ctrl-C, SIGTERM, or a training stage they stopped."""
    from emma_mamba.training import TrainingInterrupted

    if isinstance(e, TrainingInterrupted):
        return str(e).split(". ")[0], e.exit_code  # "interrupted at step 3 of 400" (its hint is --resume's)
    if isinstance(e, Terminated):
        return "stopped by SIGTERM", 143
    return "interrupted", 130


def _resume_says(out: Path, st: dict) -> str:
    """What ``--resume`` would reuse of the quickstart in ``out``, in a few words."""
    done = _reusable_steps(out, st)
    todo, last = _continued(out, done)
    reuse = [STEP_NAMES[k] for k in done]
    said = f"reusing {', '.join(reuse)}" if reuse else "nothing is reused"
    return said + (f"; {STEP_NAMES[todo]} from its checkpoint {last.name}" if last is not None else "")


def run(args: argparse.Namespace) -> int:
    from emma_mamba.config import ConfigError
    from emma_mamba.data.llava import DataError
    from emma_mamba.training import TrainingError, TrainingInterrupted

    quiet_logs()
    set_threads(args.threads)
    previous = sigterm_as_interrupt()
    try:
        path = recipe_path(args.config, args.fast)
        qc = load_quickstart_config(path)
        summary = run_pipeline(qc, args.out, args.seed, source=str(path), overwrite=args.overwrite,
                               resume=args.resume, progress=not args.no_progress,
                               echo=lambda line: print(line, flush=True))
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, ValueError, OutputFolderError) as e:
        print(f"emma-mamba quickstart: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TrainingInterrupted) as e:
        what, code = interrupted_exit(e)
        st = read_state(Path(args.out))
        if st is None or st.get("finished"):
            print(f"emma-mamba quickstart: {what}", file=sys.stderr)
        else:
            print(f"emma-mamba quickstart: {what} during {st.get('stage')}; {args.out} holds an unfinished "
                  f"quickstart: rerun with --resume to continue it ({_resume_says(Path(args.out), st)}), or with "
                  f"--overwrite to start it again", file=sys.stderr)
        return code
    except TrainingError as e:  # a stage that cannot go on (a non-finite loss, a checkpoint write that failed)
        print(f"emma-mamba quickstart: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    d = summary["demo"]
    print()
    print(f"demo  image {d['image']}")
    print(f"      Q: {d.get('prompt', d['question'])!r}   (VQAv2's short-answer prompt, as the eval asks it)")
    print(f"      A: {d['model']!r}   (ground truth: {d['expected']!r})")
    if not d["model"]:  # say why, rather than show a blank answer as if it were one
        print(f"         an empty answer: the model's reply {d.get('raw', '')!r} is white space only" +
              (" (a --fast run trains a few steps, too few to answer; the full quickstart learns to)"
               if args.fast else ""))
    print()
    print(format_table(summary))
    print("chance = the blind (question-only) baseline: the training-answer prior, no image")
    s = summary["seconds"]
    print(f"time: data {s['data']:.0f}s, stage 0 {s.get('clip', 0):.0f}s, stage 1 {s['pretrain']:.0f}s, "
          f"stage 2 {s['finetune']:.0f}s, eval {s['eval']:.0f}s, total {s['total']:.0f}s; summary in {Path(args.out) / 'summary.json'}")
    print(f"ask it more: emma-mamba chat --checkpoint {Path(args.out) / 'stage2'} --image {d['image']}")
    print(f"training curves (held-out loss dashed): emma-mamba plot {Path(args.out) / 'stage1'} "
          f"{Path(args.out) / 'stage2'}")
    return 0
