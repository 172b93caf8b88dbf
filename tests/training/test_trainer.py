"""The training loop on the tiny preset: exact resume, stage freezing and init_from, the step objective against
an independent per-sample computation (and padding == packing), bad images at run time, metrics files."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import emma_mamba
from emma_mamba.config import ConfigError, get_preset
from emma_mamba.data.llava import DataError, collate, plan_rows
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training import TrainingError
from emma_mamba.training.config import load_run_config
from emma_mamba.training.optim import lr_lambda
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg, subset


def test_resume_equals_uninterrupted_run_bitwise(shapes, tmp_path):
    kw = dict(train={"max_steps": 4}, checkpoint={"every_steps": 2})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    b1 = Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=3)  # "crashes" after step 3
    assert [m["loss"] for m in b1] == [m["loss"] for m in a[:3]]
    # a new process: auto picks step 2 (the interrupted run's step 3 is redone from the checkpoint)
    b2 = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto")
    assert (b2.global_step, b2.step_in_epoch) == (2, 2)
    rest = b2.fit()
    for key in ("loss", "lm_loss", "align_loss", "grad_norm", "lr", "tokens"):
        assert [m[key] for m in rest] == [m[key] for m in a[2:]], key  # bitwise: same threads, same CPU
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the metrics file reads as one uninterrupted run
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert [m["loss"] for m in lines] == [m["loss"] for m in a]
    # every checkpoint and the final directory are self-describing and loadable
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000004"
    for d in (ckpt, tmp_path / "b"):
        model = emma_mamba.load(d)
        assert isinstance(model, EmmaMamba) and model.align_head is None
        cfg = load_run_config(d / "train_config.yaml")
        assert cfg.train.max_steps == 4 and cfg.model == get_preset("tiny")
    # a fresh run refuses an output_dir holding a run
    with pytest.raises(FileExistsError, match="--resume auto"):
        Trainer(make_cfg(shapes, tmp_path / "b", **kw))


def test_a_resume_reads_no_pretrained_file_again(shapes, tmp_path):
    """A stage-1 run from a local LM folder (model.lm.pretrained), interrupted and resumed after the folder has
    moved: the checkpoint holds every weight and the tokenizer, so the resume neither needs nor reads the folder
    (it failed with "does not exist"; at 2.8B it read ~11 GB again), and equals the uninterrupted run bitwise."""
    torch.manual_seed(5)
    lm_dir = tmp_path / "lm"
    EmmaMamba(get_preset("tiny"), for_training=False).lm.save_pretrained(lm_dir)
    model = {"preset": "tiny", "lm": {"pretrained": str(lm_dir)}}
    kw = dict(stage="pretrain", model=model, train={"max_steps": 3}, checkpoint={"every_steps": 1})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=1)
    lm_dir.rename(tmp_path / "moved")
    b = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto")
    assert b.global_step == 1
    assert [m["loss"] for m in b.fit()] == [m["loss"] for m in a[1:]]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_stage2_resume_reads_no_init_from_model_again(shapes, tmp_path, monkeypatch):
    """A stage-2 run (init_from: the stage-1 model) resumed: the checkpoint holds every weight, so init_from's model
    is not loaded again (at 2.8B ~11 GB read to be overwritten), and the run equals the uninterrupted one bitwise."""
    import emma_mamba.models.vlm as vlm

    cap = subset(shapes, tmp_path, 4, stage=1, name="cap.json")
    Trainer(make_cfg(shapes, tmp_path / "s1", cap, stage="pretrain", train={"max_steps": 1})).fit()
    kw = dict(init_from=str(tmp_path / "s1"), model=None, train={"max_steps": 3}, checkpoint={"every_steps": 1})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=1)

    def no_load(*args, **kwargs):
        raise AssertionError("init_from's model read again on resume")

    monkeypatch.setattr(vlm, "load", no_load)
    b = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto")
    assert b.global_step == 1 and b.model.align_head is not None
    assert [m["loss"] for m in b.fit()] == [m["loss"] for m in a[1:]]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _named(model, prefix):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def test_pretrain_trains_only_the_bridge_and_finetune_starts_from_it(shapes, tmp_path):
    cap = subset(shapes, tmp_path, 8, stage=1)
    cfg = make_cfg(shapes, tmp_path / "s1", cap, stage="pretrain", train={"weight_decay": 0.0})
    torch.manual_seed(cfg.train.seed)
    init = EmmaMamba(cfg.model, for_training=False)  # the trainer builds the same init from the same seed
    t1 = Trainer(cfg)
    assert t1.model.align_head is None  # stage 1 neither builds nor trains the alignment head
    t1.fit()
    s1 = emma_mamba.load(tmp_path / "s1")
    before, after = dict(init.named_parameters()), dict(s1.named_parameters())
    for name, p in after.items():
        moved = not torch.equal(p, before[name])
        top = name.split(".")[0]
        if top in ("vision", "lm") or name.startswith("instruction.text_model"):
            assert not moved, name
    for prefix in ("mff.", "projector.", "instruction.token_mixer", "instruction.text_proj"):
        assert any(not torch.equal(p, before[n]) for n, p in after.items() if n.startswith(prefix)), prefix

    cfg2 = make_cfg(shapes, tmp_path / "s2", stage="finetune", init_from=str(tmp_path / "s1"), model=None,
                    train={"max_steps": 1})
    assert cfg2.model.vision == s1.config.vision and cfg2.model.lm.d_model == s1.config.lm.d_model
    t2 = Trainer(cfg2)
    assert t2.model.align_head is not None
    lm_before = _named(t2.model, "lm.")
    t2.fit()
    s2 = emma_mamba.load(tmp_path / "s2", for_training=True)
    lm_after = _named(s2, "lm.")
    assert any(not torch.equal(lm_after[n], lm_before[n]) for n in lm_before)
    assert all(torch.equal(p, after[n]) for n, p in s2.named_parameters() if n.startswith("vision."))
    assert any(n.startswith("align_head.") for n in load_file(str(tmp_path / "s2" / "model.safetensors")))


def _oracle_loss(model, dataset):
    """(lm, align, answer-token accuracy) with each sample of ``dataset`` run alone through ``model`` (no
    packing, no batching): lm = sum of per-sample CE sums / sum of targets; align = mean over images."""
    ce, n, right, aligns = 0.0, 0, 0, []
    with torch.no_grad():
        for s in dataset.samples:
            px = dataset.load_images(s)
            b = collate([[(s, px)]], model.tokenizer.pad_token_id, False, dataset.N)
            out = model(b["input_ids"], b["pixel_values"], b["labels"], model.tokenize_instructions(b["instructions"]),
                        b["image_counts"])
            tgt = out.labels[0, 1:]
            ce += float(F.cross_entropy(out.logits[0, :-1].float(), tgt, ignore_index=-100, reduction="sum"))
            n += int((tgt != -100).sum())
            right += int((out.logits[0, :-1].argmax(-1) == tgt)[tgt != -100].sum())
            aligns.append(float(out.loss["align"]))
    return ce / n, sum(aligns) / len(aligns), right / n


def _oracle_step_loss(cfg, dataset):
    """The first step's objective, each sample run alone through a freshly initialised model (the trainer's
    init, from the same seed)."""
    torch.manual_seed(cfg.train.seed)
    model = EmmaMamba(cfg.model, for_training=True).train()
    lm, align, _ = _oracle_loss(model, dataset)
    return lm, align, lm + cfg.model.align.loss_weight * align


def test_step_objective_matches_per_sample_oracle_and_packing_equals_padding(shapes, tmp_path):
    data = subset(shapes, tmp_path, 6)
    pad = make_cfg(shapes, tmp_path / "pad", data, data={"max_length": 256},
                   train={"global_batch_size": 6, "micro_batch_size": 3, "max_steps": 1})
    tp = Trainer(pad)
    rows = plan_rows(tp.dataset.lengths, 0, 0, True, pad.data.max_length)
    assert len(rows) < 6  # packing really packs
    pack = make_cfg(shapes, tmp_path / "pack", data, data={"packing": True, "max_length": 256},
                    train={"global_batch_size": len(rows), "micro_batch_size": 1, "max_steps": 1})
    mp = tp.fit()[0]
    mk = Trainer(pack).fit()[0]
    lm, align, total = _oracle_step_loss(pad, tp.dataset)
    for m in (mp, mk):
        assert m["samples"] == 6 and m["images"] == 6
        assert m["lm_loss"] == pytest.approx(lm, rel=1e-5)
        assert m["align_loss"] == pytest.approx(align, rel=1e-5)
        assert m["loss"] == pytest.approx(total, rel=1e-5)
    assert mk["grad_norm"] == pytest.approx(mp["grad_norm"], rel=1e-4)
    assert mk["positions"] < mp["positions"] and mk["tokens"] == mp["tokens"]


def test_group_by_length_pads_less_and_keeps_the_steps_objective(shapes, tmp_path):
    """Padding, data.group_by_length (the default) against off: the same step (samples, tokens, loss to rounding),
    its micro-batches padded to the hand count of the step's lengths sorted longest first, in pairs."""
    data = subset(shapes, tmp_path, 8)
    kw = dict(train={"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 1}, data={"max_length": 256})
    on = Trainer(make_cfg(shapes, tmp_path / "on", data, **kw))
    lengths = on.dataset.lengths
    step = sorted((lengths[r[0]] for r in plan_rows(lengths, 0, 0, False, 256)[:8]), reverse=True)
    m_on = on.fit()[0]
    off_cfg = make_cfg(shapes, tmp_path / "off", data, **kw)
    off_cfg.data.group_by_length = False
    m_off = Trainer(off_cfg).fit()[0]
    assert len(set(step)) > 2  # lengths differ: grouping has something to do
    assert m_on["positions"] == sum(2 * step[k] for k in range(0, 8, 2)) < m_off["positions"]
    for k in ("samples", "tokens", "label_tokens", "images"):
        assert m_on[k] == m_off[k], k
    for k in ("lm_loss", "align_loss", "grad_norm"):
        assert m_on[k] == pytest.approx(m_off[k], rel=1e-5), k


def test_a_resumed_run_writes_the_uninterrupted_runs_metrics_lines(shapes, tmp_path):
    """log.every_steps 3, a checkpoint every 2 steps, resumed from step 4 (off the logging grid, as a SIGTERM's
    checkpoint is): the step-6 line averages steps 5, 6 and the checkpoint's step 4, as the uninterrupted run's
    does (it averaged 5 and 6 only, and step 4 was in no line)."""
    kw = dict(train={"max_steps": 6}, checkpoint={"every_steps": 2}, log={"every_steps": 3})
    Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=5)  # "crashes" after step 5: resumes at 4
    t = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto")
    assert t.global_step == 4
    t.fit()
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    assert [m["step"] for m in b] == [3, 6] and [m["steps"] for m in b] == [3, 3]
    for k in ("lm_loss", "align_loss", "loss", "grad_norm", "label_tokens", "samples", "tokens", "lr"):
        assert [m[k] for m in b] == [m[k] for m in a], k


def test_a_fraction_of_an_epoch_rounds_down_and_says_so(shapes, tmp_path, caplog):
    """epochs 1.5 of 3 steps an epoch: 3 + floor(1.5) = 4 steps, the rounding said (it was silent)."""
    data = subset(shapes, tmp_path, 6)
    with caplog.at_level("INFO", logger="emma_mamba.training.trainer"):
        t = Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 0, "epochs": 1.5}))
    assert t._steps_in_epoch(0) == 3 and t.total_steps == 4
    assert "train.epochs 1.5: the last 0.5 epoch is 1 of its 3 steps (rounded down)" in caplog.text


def test_group_by_length_deals_sorted_micro_batches_to_the_ranks_in_turn():
    from emma_mamba.data.llava import group_by_length

    lengths = [5, 1, 4, 2, 3, 6, 8, 7]
    rows = [[i] for i in range(8)]  # row i is sample i; sorted longest first: 6, 7, 5, 0, 2, 4, 3, 1
    got = group_by_length(rows, lengths, 2, 2)
    assert got == [[[[6], [7]], [[2], [4]]], [[[5], [0]], [[3], [1]]]]
    packed = group_by_length([[0, 1], [2], [3, 4]], lengths, 1, 1)  # a row's length: its samples' sum
    assert packed == [[[[0, 1]], [[3, 4]], [[2]]]]


def test_corrupt_image_during_training_is_skipped_and_counted_or_raises(shapes, tmp_path, caplog):
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    records = json.loads((shapes / "train" / "stage2_instruct.json").read_text())[:4]
    (images / records[1]["image"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    kw = dict(train={"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 1})
    cfg = make_cfg(shapes, tmp_path / "skip", data, data={"image_folder": str(images), "on_error": "skip"}, **kw)
    m = Trainer(cfg).fit()[0]
    assert m["samples"] == 3 and m["skipped_records"] == 1
    assert "corrupt_image" in caplog.text and records[1]["image"] in caplog.text
    line = json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["skipped_records"] == 1
    cfg = make_cfg(shapes, tmp_path / "raise", data, data={"image_folder": str(images)}, **kw)
    with pytest.raises(DataError, match=r"data\.json: record 1 \(id '.*'\): image .*cannot read image file"):
        Trainer(cfg).fit()


def test_metrics_jsonl_has_the_documented_fields(shapes, tmp_path):
    data = subset(shapes, tmp_path, 4)
    Trainer(make_cfg(shapes, tmp_path / "m", data, data={"packing": True})).fit()
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("lm_loss", "align_loss", "loss", "lr", "grad_norm", "tokens_per_s", "fill", "samples"):
            assert isinstance(r[k], (int, float)) and r[k] == r[k], k
        assert 0 < r["fill"] <= 1 and r["tokens_per_s"] > 0
    assert rows[0]["lr"] == pytest.approx(1e-3)  # warmup_steps=1: the first update already at peak
    assert rows[1]["lr"] == pytest.approx(0.5e-3 * (1 + 1))  # cosine at progress 0 of a 1-step decay


def test_a_metrics_line_averages_the_steps_since_the_last_one(shapes, tmp_path):
    """log.every_steps 2 over 5 steps: lines at steps 2, 4 and 5, each the steps since the last line, averaged by
    hand from the per-step history (losses over answer tokens / images, rates over the summed time); lr is the
    schedule's even when every trained module has an lr multiplier (stage 1: the first group's lr is 10x it)."""
    data = subset(shapes, tmp_path, 12, stage=1)
    mult = {"mff": 10.0, "instruction": 10.0, "projector": 10.0}
    cfg = make_cfg(shapes, tmp_path / "m", data, stage="pretrain", log={"every_steps": 2},
                   train={"max_steps": 5, "lr_multipliers": mult})
    t = Trainer(cfg)
    hist = t.fit()
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5] and [r["steps"] for r in rows] == [2, 2, 1]
    w = t.model.config.align.loss_weight
    for r, steps in zip(rows, (hist[0:2], hist[2:4], hist[4:5])):
        lab = sum(s["label_tokens"] for s in steps)
        lm = sum(s["lm_loss"] * s["label_tokens"] for s in steps) / lab
        img = sum(s["images"] for s in steps)
        al = sum(s["align_loss"] * s["images"] for s in steps) / img
        assert r["lm_loss"] == pytest.approx(lm, rel=1e-12) and r["align_loss"] == pytest.approx(al, rel=1e-12)
        assert r["loss"] == pytest.approx(lm + w * al, rel=1e-12) and r["label_tokens"] == lab
        assert r["grad_norm"] == pytest.approx(sum(s["grad_norm"] for s in steps) / len(steps), rel=1e-12)
        dt = sum(s["step_time"] for s in steps)
        assert r["tokens_per_s"] == pytest.approx(sum(s["tokens"] for s in steps) / dt, rel=1e-9)
        assert r["lr"] == steps[-1]["lr"] and r["total_tokens"] == steps[-1]["total_tokens"]
    assert rows[0]["lm_loss"] != pytest.approx(hist[1]["lm_loss"], rel=1e-9)  # not the interval's last step
    # the schedule's lr (warm-up 1 step, then cosine from 1e-3 over 4 steps), not the groups' 10x
    want = [1e-3 * lr_lambda(k, 5, 1) for k in range(5)]
    assert [m["lr"] for m in hist] == pytest.approx(want, rel=1e-9)
    assert t.scheduler.base_lrs[0] == pytest.approx(1e-2)  # the first group is a multiplied one


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_train_like_eager(shapes, tmp_path, backend):
    """train.compile: each LM block one compiled graph with the kernels inside; aot_eager runs the traced graphs
    as they are (the same losses as eager to rounding), Inductor generates fused code around the kernels."""
    kw = dict(train={"max_steps": 3})
    eager = Trainer(make_cfg(shapes, tmp_path / "eager", **kw)).fit()
    torch._dynamo.reset()
    t = Trainer(make_cfg(shapes, tmp_path / backend, train={"max_steps": 3, "compile": True,
                                                             "compile_backend": backend}))
    assert all(b._compiled_call_impl is not None for b in t.model.lm.layers)
    compiled = t.fit()
    rtol = 1e-5 if backend == "aot_eager" else 1e-4
    for key in ("loss", "lm_loss", "align_loss", "grad_norm"):
        torch.testing.assert_close([m[key] for m in compiled], [m[key] for m in eager], rtol=rtol, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")
    # the checkpoint of a compiled run has the eager run's names and loads as usual
    wa, wb = load_file(str(tmp_path / "eager" / "model.safetensors")), load_file(str(tmp_path / backend / "model.safetensors"))
    assert wa.keys() == wb.keys()


def test_unknown_compile_backend_is_an_error_naming_the_key(shapes, tmp_path):
    with pytest.raises(ValueError, match="train.compile_backend: 'inductr'"):
        Trainer(make_cfg(shapes, tmp_path / "x", train={"compile": True, "compile_backend": "inductr"}))


def test_mixer_recompute_off_trains_like_the_default(shapes, tmp_path):
    """train.mixer_recompute (default true: the mixers recompute their conv output and delta in the backward,
    ops.mamba_inner) reaches every mixer; turned off, the separate ops keep them, and 3 steps give the same
    losses and gradient norms to rounding."""
    kw = dict(train={"max_steps": 3})
    default = Trainer(make_cfg(shapes, tmp_path / "default", **kw))
    assert all(b.mixer.recompute_activations for b in default.model.lm.layers)
    off = Trainer(make_cfg(shapes, tmp_path / "off", train={"max_steps": 3, "mixer_recompute": False}))
    assert not any(b.mixer.recompute_activations for b in off.model.lm.layers)
    a, b = default.fit(), off.fit()
    for key in ("loss", "lm_loss", "align_loss", "grad_norm"):
        torch.testing.assert_close([m[key] for m in a], [m[key] for m in b], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")


def test_gradient_checkpointing_reaches_an_unfrozen_vit(shapes, tmp_path):
    """train.gradient_checkpointing checkpoints an unfrozen ViT's blocks as well as the LM's (it reached the LM
    only, and the ViT kept every block's activations); a frozen ViT is left alone (nothing to recompute). The
    first step's objective and gradient norm are those of the run without it."""
    model = {"preset": "tiny", "vision": {"freeze": False}}
    runs = {}
    for gc in (False, True):
        t = Trainer(make_cfg(shapes, tmp_path / f"gc{gc}", model=model,
                             train={"max_steps": 1, "gradient_checkpointing": gc}))
        assert t.model.vision.visual.transformer.grad_checkpointing is gc and t.model.lm.gradient_checkpointing is gc
        runs[gc] = t.fit()[0]
    for key in ("loss", "grad_norm"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-5), key
    frozen = Trainer(make_cfg(shapes, tmp_path / "frozen", train={"gradient_checkpointing": True}))
    assert frozen.model.lm.gradient_checkpointing and not frozen.model.vision.visual.transformer.grad_checkpointing


def test_align_loss_weight_zero_is_said(shapes, tmp_path, caplog):
    """model.align.loss_weight 0 trains but misleads (the head is still built, run and trained: weight decay alone
    moves it): said once at the start, and not for the default weight."""
    with caplog.at_level("WARNING", logger="emma_mamba.training"):
        Trainer(make_cfg(shapes, tmp_path / "default"))
    assert "loss_weight is 0" not in caplog.text
    with caplog.at_level("WARNING", logger="emma_mamba.training"):
        Trainer(make_cfg(shapes, tmp_path / "w0", model={"preset": "tiny", "align": {"loss_weight": 0.0}}))
    assert "model.align.loss_weight is 0: the alignment head is still built" in caplog.text


def test_a_runs_chat_format_is_carried_by_the_model_it_writes(shapes, tmp_path):
    """data.prompt_template / turn_end / turn_sep trained the model, but the model did not carry them: generate,
    chat, serve and eval prompted it in the default format. Now the run writes them into the model (config.chat):
    the loaded model's prompts are the training data's, its generation stops at the turn_end, and a stage 2 from
    it (data.* left at the defaults) trains in the same format."""
    from emma_mamba.config import ChatConfig
    from emma_mamba.inference.generate import GenerationConfig

    fmt = {"prompt_template": "### Human: {prompt}\n### Assistant:", "turn_end": "\n###", "turn_sep": "\n"}
    t = Trainer(make_cfg(shapes, tmp_path / "s1", data=fmt, train={"max_steps": 1}))
    t.fit()
    s = t.dataset.samples[0]
    trained = t.model.tokenizer.decode(s.input_ids)
    assert trained.startswith("### Human: ") and "\n### Assistant:" in trained and trained.endswith("\n###")
    model = emma_mamba.load(tmp_path / "s1")
    assert model.config.chat == ChatConfig(**fmt)
    assert model.build_prompt("Is there a circle?", 1) == "### Human: <image>\nIs there a circle?\n### Assistant:"
    assert "\n###" in model.stops(GenerationConfig()).stop_strings
    nxt = Trainer(make_cfg(shapes, tmp_path / "s2", json_path=None, init_from=str(tmp_path / "s1"),
                           model=None, train={"max_steps": 1}))
    assert (nxt.cfg.data.prompt_template, nxt.cfg.data.turn_end) == (fmt["prompt_template"], fmt["turn_end"])
    assert nxt.model.config.chat == ChatConfig(**fmt)
    # the default run: the default format, in the data and in the model
    d = Trainer(make_cfg(shapes, tmp_path / "d", train={"max_steps": 1}))
    assert d.model.config.chat == ChatConfig() and d.cfg.data.turn_end == ChatConfig().turn_end


def test_validation_loss_matches_per_sample_oracle_and_leaves_training_unchanged(shapes, tmp_path):
    """val.json: the logged losses and answer-token accuracy equal each held-out sample run alone through the
    model at that step (packed rows, 3 per forward, a shorter last micro-batch); the training run is the same bit for
    bit with and without validation (no RNG drawn, train mode restored)."""
    data = subset(shapes, tmp_path, 4)
    records = json.loads((shapes / "train" / "stage2_instruct.json").read_text())
    val = tmp_path / "val.json"
    val.write_text(json.dumps(records[10:17]))
    kw = dict(data={"packing": True, "max_length": 160}, train={"max_steps": 3})
    plain = Trainer(make_cfg(shapes, tmp_path / "plain", data, **kw))
    plain_hist = plain.fit()
    cfg = make_cfg(shapes, tmp_path / "val", data, val={"json": str(val), "image_folder": str(shapes / "images"),
                                                       "every_steps": 2, "micro_batch_size": 3}, **kw)
    t = Trainer(cfg)
    snapshots = {}
    orig = t.validate
    t.validate = lambda **kw: snapshots.setdefault(t.global_step, orig(**kw))  # after steps 2 and 3 (the last)
    hist = t.fit()
    assert [m["loss"] for m in hist] == [m["loss"] for m in plain_hist]  # bitwise
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), plain.model.state_dict().values()))
    assert sorted(snapshots) == [2, 3] and t.model.training
    assert len(plan_rows(t.val_dataset.lengths, 0, 0, True, 160)) % 3 != 0  # a last, shorter micro-batch
    lm, align, acc = _oracle_loss(t.model.eval(), t.val_dataset)  # the final model: the step-3 record's
    v = snapshots[3]
    assert v["val_samples"] == 7 and v["val_images"] == 7
    assert v["val_lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert v["val_align_loss"] == pytest.approx(align, rel=1e-5)
    assert v["val_loss"] == pytest.approx(lm + cfg.model.align.loss_weight * align, rel=1e-5)
    assert v["val_token_acc"] == pytest.approx(acc, abs=1e-9)
    assert snapshots[2]["val_lm_loss"] != v["val_lm_loss"]  # measured on the weights of its step
    lines = [json.loads(x) for x in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], "val_loss" in m) for m in lines] == [(1, False), (2, False), (2, True), (3, False),
                                                               (3, True)]
    assert lines[-1]["val_lm_loss"] == v["val_lm_loss"]


def test_validation_config_errors_name_the_key(shapes, tmp_path):
    with pytest.raises(ConfigError, match=r"val\.every_steps .* val\.json"):
        make_cfg(shapes, tmp_path / "x", val={"every_steps": 10})
    with pytest.raises(ConfigError, match=r"val\.micro_batch_size must be >= 1"):
        make_cfg(shapes, tmp_path / "x", val={"json": "v.json", "micro_batch_size": 0})
    with pytest.raises(ConfigError, match=r"unknown key.*val\.evry_steps|val\.evry_steps"):
        make_cfg(shapes, tmp_path / "x", val={"json": "v.json", "evry_steps": 10})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "q", "image": "nope.png", "conversations": []}]))
    with pytest.raises(DataError, match=r"bad\.json: record 0 \(id 'q'\): 'conversations' is missing"):
        Trainer(make_cfg(shapes, tmp_path / "y", subset(shapes, tmp_path, 2), val={"json": str(bad)}))


def test_dual_encoder_trains_end_to_end_with_an_unfrozen_second_tower(shapes, tmp_path):
    # vision.second_encoder (a timm DINOv2 beside the open_clip tower) through the trainer: the first step's
    # objective equals each sample run alone through the same init, both towers train in stage 2 when
    # vision.freeze is false, and the run's output loads back with the second tower's trained weights.
    data = subset(shapes, tmp_path, 4)
    model = {"preset": "tiny", "vision": {"freeze": False, "second_encoder": {
        "timm_model": "vit_small_patch14_reg4_dinov2", "taps": [1, 2],
        "timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 2}}}}
    cfg = make_cfg(shapes, tmp_path / "run", data, model=model,
                   train={"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2})
    torch.manual_seed(cfg.train.seed)
    init = EmmaMamba(cfg.model, for_training=True)
    t = Trainer(cfg)
    metrics = t.fit()
    lm, align, total = _oracle_step_loss(cfg, t.dataset)
    assert metrics[0]["samples"] == 4 and metrics[0]["loss"] == pytest.approx(total, rel=1e-5)
    out = emma_mamba.load(tmp_path / "run")
    assert out.vision.second is not None and out.vision.width == 32 + 24
    before, after = _named(init, "vision."), _named(out, "vision.")
    for prefix in ("vision.second.", "vision.visual."):
        assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith(prefix)), prefix


def test_resume_at_another_cpu_thread_count_says_it_is_not_bitwise(shapes, tmp_path, caplog):
    """A CPU run is bitwise only at one thread count (the matrix products' sums split by thread: measured, a stage-2
    run at 1 and 2 threads differs from step 3 on by ~1e-7): the checkpoint records the count, and a resume under
    another one says so (nothing did); the same count resumes without a word."""
    import logging

    kw = dict(train={"max_steps": 2}, checkpoint={"every_steps": 1})
    threads = torch.get_num_threads()
    Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=1)
    assert torch.load(tmp_path / "b" / "checkpoints" / "step_00000001" / "trainer_state.pt",
                      weights_only=False)["cpu_threads"] == threads
    with caplog.at_level(logging.WARNING, logger="emma_mamba.training.resume"):
        Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto")
    assert not [r for r in caplog.records if "CPU threads" in r.getMessage()]
    other = 1 if threads > 1 else 2
    import emma_mamba.cli as cli
    from emma_mamba.quickstart import quiet_logs

    levels = cli._log_levels()
    try:
        torch.set_num_threads(other)
        quiet_logs()  # as quickstart and ablate run (they quiet the trainer's logger): still said
        with caplog.at_level(logging.WARNING, logger="emma_mamba.training.resume"):
            Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto")
    finally:
        torch.set_num_threads(threads)
        cli._restore_log_levels(levels)
    said = [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()]
    assert len(said) == 1 and f"written at {threads} CPU threads, with {other}" in said[0]
    assert f"OMP_NUM_THREADS={threads}, or --threads {threads} for quickstart" in said[0]


def test_resume_reads_the_position_keyed_optimizer_state_of_earlier_versions(shapes, tmp_path):
    # checkpoints now key the optimizer state by parameter name (any strategy resumes any other); the files of
    # earlier versions keyed it by position (torch's optimizer.state_dict()) and must still resume exactly
    kw = dict(train={"max_steps": 4}, checkpoint={"every_steps": 2})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    b1 = Trainer(make_cfg(shapes, tmp_path / "b", **kw))
    b1.fit(stop_after=2)
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert all(isinstance(n, str) for g in state["optimizer"]["param_groups"] for n in g["params"])
    state["optimizer"] = b1.optimizer.state_dict()  # the old layout: integer positions
    assert all(isinstance(n, int) for g in state["optimizer"]["param_groups"] for n in g["params"])
    torch.save(state, ckpt / "trainer_state.pt")
    rest = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume=str(ckpt)).fit()
    assert [m["loss"] for m in rest] == [m["loss"] for m in a[2:]]
    assert [m["grad_norm"] for m in rest] == [m["grad_norm"] for m in a[2:]]


def test_lr_multipliers_scale_each_modules_first_adamw_step(shapes, tmp_path, caplog):
    # AdamW's first update is lr * g / (|g| + eps): with eps ~0 a step of exactly the group's lr for every
    # element with a gradient, whatever the gradient, so each module's step size shows its learning rate
    mult = {"projector": 10.0, "lm": 0.5}
    cfg = make_cfg(shapes, tmp_path / "run", train={"max_steps": 1, "weight_decay": 0.0, "lr": 1e-3, "eps": 1e-30,
                                                    "lr_multipliers": mult})
    t = Trainer(cfg)
    assert len(t.optimizer.param_groups) == 6  # (default, projector, lm) x (decayed, not)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.fit()
    after = dict(t.model.named_parameters())
    seen = set()
    for name, p0 in before.items():
        module = name.split(".")[0]
        want = 1e-3 * mult.get(module, 1.0)
        step = (after[name].detach() - p0).abs().flatten()
        step = step[step > 0.01 * want]  # elements with a gradient (the others do not move)
        if step.numel():
            seen.add(module)
            torch.testing.assert_close(step, torch.full_like(step, want), rtol=1e-3, atol=0, msg=name)
    assert {"projector", "lm", "mff"} <= seen
    with caplog.at_level("WARNING", logger="emma_mamba.training.optim"):  # a frozen module's multiplier: said
        Trainer(make_cfg(shapes, tmp_path / "frozen", train={"max_steps": 1, "lr_multipliers": {"vision": 0.1}}))
    assert "train.lr_multipliers.vision: no parameter of 'vision' is trained" in caplog.text
    with pytest.raises(ConfigError, match=r"train.lr_multipliers: unknown module 'vit'; valid: vision, mff"):
        make_cfg(shapes, tmp_path / "x", train={"lr_multipliers": {"vit": 0.1}})
    with pytest.raises(ConfigError, match=r"train.lr_multipliers.lm: expected a number > 0, got 0"):
        make_cfg(shapes, tmp_path / "x", train={"lr_multipliers": {"lm": 0}})


def test_init_from_run_may_unfreeze_the_vit_and_reweight_the_alignment_loss(shapes, tmp_path):
    # a stage-2 run from a stage-1 output takes the model from the checkpoint, but may still change how it trains
    # (INIT_FROM_MODEL_KEYS): unfreeze the ViT, reweight the alignment loss; nothing that changes the model
    from emma_mamba.training.config import run_config_from_dict, run_config_to_dict

    torch.manual_seed(0)
    EmmaMamba(get_preset("tiny")).save(tmp_path / "s1")
    d = run_config_to_dict(make_cfg(shapes, tmp_path / "s2", train={"max_steps": 1}))
    del d["model"]
    d["init_from"] = str(tmp_path / "s1")
    over = {"model": {"vision": {"freeze": False}, "align": {"loss_weight": 0.5}}}
    cfg = run_config_from_dict(d, source="test", overrides=over)
    t = Trainer(cfg)
    assert not t.model.vision.frozen and t.model.vision.visual.training
    before = _named(t.model, "vision.")
    m = t.fit()[0]
    assert m["loss"] == pytest.approx(m["lm_loss"] + 0.5 * m["align_loss"], rel=1e-6)
    out = emma_mamba.load(tmp_path / "s2")
    assert out.config.vision.freeze is False and out.config.align.loss_weight == 0.5
    # the run's resolved config (model and init_from both in it) reads back, e.g. to resume from it
    again = load_run_config(tmp_path / "s2" / "train_config.yaml")
    assert again.model.vision.freeze is False and again.model.align.loss_weight == 0.5
    moved = [n for n, p in _named(out, "vision.").items() if not torch.equal(p, before[n])]
    assert moved and all(n.startswith("vision.visual.") for n in moved)
    with pytest.raises(ConfigError, match=r"--model.lm.d_state cannot change a model loaded by init_from .*only how "
                                          r"it trains can: model.vision.freeze, model.align.loss_weight"):
        run_config_from_dict(d, source="test", overrides={"model": {"lm": {"d_state": 4}}})


class _FakeWandb:
    """Stands in for the wandb package: records init arguments and logged values."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            id = kw.get("id") or f"run{len(fake.inits)}"

            def log(self, values, step):
                fake.logs.append((step, values))

            def finish(self):
                fake.finished += 1
        return Run()


def test_wandb_logs_what_metrics_jsonl_holds_and_a_resume_continues_the_run(shapes, tmp_path, monkeypatch):
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    val = {"json": str(shapes / "heldout" / "instruct.json"), "image_folder": str(shapes / "images"),
           "every_steps": 2, "max_samples": 4}
    kw = dict(train={"max_steps": 3}, checkpoint={"every_steps": 1}, log={"wandb": "emma-test"}, val=val)
    Trainer(make_cfg(shapes, tmp_path / "run", **kw)).fit(stop_after=2)
    init = fake.inits[0]
    assert init["project"] == "emma-test" and init["name"] == "run" and init["id"] is None
    assert init["config"]["train"]["max_steps"] == 3 and init["dir"] == str(tmp_path / "run")
    Trainer(make_cfg(shapes, tmp_path / "run", **kw), resume="auto").fit()
    assert fake.inits[1]["id"] == "run1" and fake.inits[1]["resume"] == "allow"  # the same W&B run
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_logs = {s: v for s, v in fake.logs if "train/loss" in v}
    val_logs = {s: v for s, v in fake.logs if "val/loss" in v}
    for m in lines:
        got = val_logs[m["step"]] if "val_loss" in m else train_logs[m["step"]]
        for k in ("loss", "lm_loss", "lr", "grad_norm", "val_loss", "val_token_acc"):
            if k in m:
                assert got[f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"] == m[k], (m["step"], k)
    assert sorted(train_logs) == [1, 2, 3] and sorted(val_logs) == [2, 3] and fake.finished == 2
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: an error before the model is built
    with pytest.raises(ConfigError, match="log.wandb is set but the wandb package is not installed"):
        Trainer(make_cfg(shapes, tmp_path / "other", **kw))


def test_sharded_checkpoint_resumes_bitwise_and_loads_as_the_full_one(shapes, tmp_path):
    """checkpoint.format sharded (DCP files in state/): the resumed run equals the uninterrupted full-format run
    bit for bit, the checkpoint loads for inference with the full checkpoint's weights, and it is refused by
    name for a run whose model differs."""
    kw = dict(train={"max_steps": 3}, checkpoint={"every_steps": 2})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    skw = dict(train={"max_steps": 3}, checkpoint={"every_steps": 2, "format": "sharded"})
    Trainer(make_cfg(shapes, tmp_path / "b", **skw)).fit(stop_after=2)
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000002"
    names = {p.name for p in ckpt.iterdir()}
    assert "model.safetensors" not in names and (ckpt / "state" / ".metadata").is_file()
    assert {"config.yaml", "tokenizer.json", "train_config.yaml", "trainer_state.pt", "rng_rank0.pt"} <= names
    assert "optimizer" not in torch.load(ckpt / "trainer_state.pt", weights_only=True)
    full = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000002" / "model.safetensors"))
    from emma_mamba.models.vlm import weight_names

    assert set(weight_names(ckpt)) == set(full)  # what visualize --reconstruction and export ask a checkpoint
    for for_training in (False, True):  # inference skips the alignment head; training reads it
        got = emma_mamba.load(ckpt, for_training=for_training).state_dict()
        assert any(k.startswith("align_head.") for k in got) == for_training
        for k, v in got.items():
            assert torch.equal(v, full[k]), k
    # resumed by a run configured for the full layout: the checkpoint's own layout is read
    rest = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto").fit()
    for key in ("loss", "lm_loss", "align_loss", "grad_norm", "lr", "tokens"):
        assert [m[key] for m in rest] == [m[key] for m in a[2:]], key
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # init_from a sharded step checkpoint
    t = Trainer(make_cfg(shapes, tmp_path / "c", init_from=str(ckpt), model=None, train={"max_steps": 1}))
    assert all(torch.equal(v, full[k]) for k, v in t.model.state_dict().items() if k in full)
    # a model that is not the checkpoint's: refused, naming what differs (from the checkpoint's config.yaml, and
    # without it from the shards themselves)
    other = make_cfg(shapes, tmp_path / "d", model={"preset": "tiny", "lm": {"d_model": 48}}, **skw)
    with pytest.raises(ConfigError, match=r"model\.lm\.d_model: 64 there, 48 here"):
        Trainer(other, resume=str(ckpt))
    (ckpt / "config.yaml").rename(ckpt / "config.yaml.bak")
    with pytest.raises(TrainingError, match="does not match the model of this run"):
        Trainer(other, resume=str(ckpt))
    (ckpt / "config.yaml.bak").rename(ckpt / "config.yaml")


def test_async_sharded_checkpoints_equal_the_synchronous_ones(shapes, tmp_path):
    """checkpoint.async_save: the shards are copied to host memory before training goes on and written in the
    background; every checkpoint equals the synchronous run's (training kept changing the weights while they were
    written), keep_last prunes, no .tmp is left, and a resume continues as the synchronous run does."""
    from emma_mamba.training.checkpoint import read_sharded_model

    skw = dict(train={"max_steps": 4}, checkpoint={"every_steps": 1, "format": "sharded"})
    akw = dict(train={"max_steps": 4}, checkpoint={"every_steps": 1, "format": "sharded", "async_save": True})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **skw)).fit()
    b = Trainer(make_cfg(shapes, tmp_path / "b", **akw)).fit()
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    for step in (1, 2, 3, 4):
        ca, cb = (tmp_path / r / "checkpoints" / f"step_{step:08d}" for r in "ab")
        wa, wb = read_sharded_model(ca), read_sharded_model(cb)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), step
        sa, sb = (torch.load(c / "trainer_state.pt", weights_only=True) for c in (ca, cb))
        assert sa["global_step"] == sb["global_step"] == step and (cb / "rng_rank0.pt").is_file()
    # interrupted after step 2 (its checkpoint still being written when fit returns: fit waits), resumed
    kw = dict(akw, checkpoint={**akw["checkpoint"], "keep_last": 2})
    Trainer(make_cfg(shapes, tmp_path / "c", **kw)).fit(stop_after=2)
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    rest = Trainer(make_cfg(shapes, tmp_path / "c", **kw), resume="auto").fit()
    assert [m["loss"] for m in rest] == [m["loss"] for m in a[2:]]
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    wa, wc = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "c" / "model.safetensors"))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    # the copy is taken before save_checkpoint returns: weights zeroed right after do not reach the files
    t = Trainer(make_cfg(shapes, tmp_path / "e", **akw))
    t.fit(stop_after=1)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.global_step = 7
    path = t.save_checkpoint()
    with torch.no_grad():
        for prm in t.model.parameters():
            prm.zero_()
    assert t.wait_for_checkpoint() == path and path.name == "step_00000007"
    got = read_sharded_model(path)
    assert got.keys() <= before.keys() and all(torch.equal(got[k], before[k]) for k in got)
    with pytest.raises(ConfigError, match="checkpoint.async_save needs checkpoint.format: sharded"):
        make_cfg(shapes, tmp_path / "d", checkpoint={"every_steps": 1, "async_save": True})


@pytest.mark.parametrize("kind", ["OSError", "CheckpointException"])
def test_a_failed_background_checkpoint_write_stops_the_run_and_is_never_resumed(shapes, tmp_path, monkeypatch,
                                                                                 kind):
    from concurrent.futures import Future

    import torch.distributed.checkpoint as dcp

    def failing(state, checkpoint_id, **kw):
        f = Future()
        err = OSError(28, "No space left on device")
        # DCP wraps every rank's error in CheckpointException, a BaseException
        f.set_exception(err if kind == "OSError" else
                        dcp.api.CheckpointException("save failed", {0: dcp.api._wrap_exception(err)}))
        return f

    monkeypatch.setattr(dcp, "async_save", failing)
    kw = dict(train={"max_steps": 3}, checkpoint={"every_steps": 1, "format": "sharded", "async_save": True})
    with pytest.raises(TrainingError, match=r"step_00000001 in the background failed .*stays step_00000001.tmp"):
        Trainer(make_cfg(shapes, tmp_path / "run", **kw)).fit()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001.tmp"]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_resuming_an_earlier_step_keeps_its_own_checkpoints_and_warns_of_later_ones(shapes, tmp_path, caplog):
    """keep_last counts the steps of the run being written: resumed from step 2 of a run that reached step 4, its
    new step 3 does not make the stale steps 3-4 push out step 2 (they are overwritten as the run reaches them)."""
    import logging

    Trainer(make_cfg(shapes, tmp_path / "r", train={"max_steps": 4}, checkpoint={"every_steps": 1})).fit()
    ck = tmp_path / "r" / "checkpoints"
    kw = dict(train={"max_steps": 4}, checkpoint={"every_steps": 1, "keep_last": 2})
    with caplog.at_level(logging.WARNING, logger="emma_mamba.training.trainer"):
        t = Trainer(make_cfg(shapes, tmp_path / "r", **kw), resume=str(ck / "step_00000002"))
    assert "holds checkpoints after step 2 (step_00000003, step_00000004)" in caplog.text
    t.fit(stop_after=1)
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002", "step_00000003", "step_00000004"]
    t = Trainer(make_cfg(shapes, tmp_path / "r", **kw), resume="auto")  # step 4 (the stale one: warned above)
    assert t.global_step == 4


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_is_built(shapes, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="output_dir .*a_file/run: cannot write there"):
        Trainer(make_cfg(shapes, tmp_path / "a_file" / "run"))


class _Opens:
    """Unpickling this creates a file: the stand-in for code run by reading a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_sharded_checkpoint_never_runs_code_from_its_files(shapes, tmp_path):
    """DCP unpickles its metadata and non-tensor entries without restriction; ours first reads them as plain
    data, so a tampered checkpoint is refused by name and its payload never runs (neither on resume nor on
    emma_mamba.load)."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from emma_mamba.training.checkpoint import _dcp

    kw = dict(train={"max_steps": 1}, checkpoint={"every_steps": 1, "format": "sharded"})
    Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000001"
    marker = tmp_path / "ran"
    meta = ckpt / "state" / ".metadata"
    good = meta.read_bytes()
    meta.write_bytes(pickle.dumps(_Opens(marker)))
    with pytest.raises(RuntimeError, match=r"\(io.open is not part of a checkpoint.s metadata\)"):
        emma_mamba.load(ckpt)
    with pytest.raises(RuntimeError, match="loading never runs code from a file"):
        Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume=str(ckpt))
    meta.write_bytes(good)
    # a non-tensor entry (as the optimizer's hyperparameters are stored) that is not plain data
    evil = tmp_path / "evil"
    _dcp(dcp.save, {"lr": _Opens(marker), "w": torch.zeros(2)}, evil, True)
    with pytest.raises(RuntimeError, match="the checkpoint entry lr is not plain data"):
        _dcp(dcp.load, {"lr": 0.0, "w": torch.ones(2)}, evil, True)
    assert not marker.exists()
    state = {"lr": 0.0, "w": torch.ones(2)}  # what DCP itself would have done
    with warnings.catch_warnings():  # (its "assuming ... a single process")
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(evil), no_dist=True)
    assert marker.exists()
    # a shard file lost in a copy: named, for a load and a resume alike
    (ckpt / "state" / "__0_0.distcp").unlink()
    with pytest.raises(RuntimeError, match=r"reading the checkpoint failed \(FileNotFoundError.*__0_0.distcp"):
        emma_mamba.load(ckpt)
    with pytest.raises(RuntimeError, match="it is incomplete or corrupt"):
        Trainer(make_cfg(shapes, tmp_path / "c", **kw), resume=str(ckpt))


def test_profile_writes_a_trace_of_the_chosen_steps_and_changes_no_result(shapes, tmp_path, caplog):
    """profile.steps 2 from step 2 of 3: one trace and op table per rank for steps 2-3, holding the training step's
    ops (the mixer's among them) and its data loading; the metrics mark steps 2-3 as profiled and are the unprofiled run's bit for
    bit."""
    kw = dict(train={"max_steps": 3})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    b = Trainer(make_cfg(shapes, tmp_path / "b", profile={"steps": 2, "start_step": 2, "memory": True},
                         **kw)).fit()
    assert [m.get("profiled", False) for m in b] == [False, True, True]
    for key in ("loss", "lm_loss", "align_loss", "grad_norm", "lr", "tokens"):
        assert [m[key] for m in b] == [m[key] for m in a], key
    prof = tmp_path / "b" / "profile"
    assert sorted(p.name for p in prof.iterdir()) == ["rank0_steps2-3.json", "rank0_steps2-3_ops.txt"]
    names = {e.get("name", "") for e in json.loads((prof / "rank0_steps2-3.json").read_text())["traceEvents"]}
    assert "MambaInnerFn" in names  # the mixer's fused op (its scan kernel inside)
    assert any(n.startswith("Optimizer.step#AdamW") for n in names)
    assert any(n.startswith("enumerate(DataLoader)") for n in names)  # the step's data loading is in the window
    assert "Self CPU" in (prof / "rank0_steps2-3_ops.txt").read_text()
    assert "memory snapshots are CUDA only" in caplog.text
    with pytest.raises(ConfigError, match="profile.steps must be >= 0"):
        make_cfg(shapes, tmp_path / "c", profile={"steps": -1})


def test_stage1_micro_batch_without_an_image_trains_and_resumes(shapes, tmp_path):
    """Stage 1 (LM frozen): a micro-batch without an image (a text-only record, or a stand-in for one whose only
    sample was skipped) reaches the trainable bridge through the blank-image path with weight 0, so the step runs
    (it raised "element 0 of tensors does not require grad"), changes nothing the images' steps would not, and a
    resume passes it too."""
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    records = json.loads((shapes / "train" / "stage1_captions.json").read_text())[:4]
    (images / records[1]["image"]).write_bytes(b"")  # an empty file: skipped under on_error skip
    text_only = {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
    data = tmp_path / "s1.json"
    data.write_text(json.dumps(records + [text_only]))
    kw = dict(stage="pretrain", train={"global_batch_size": 1, "micro_batch_size": 1, "max_steps": 5},
              checkpoint={"every_steps": 1}, data={"image_folder": str(images), "on_error": "skip"})
    hist = Trainer(make_cfg(shapes, tmp_path / "run", data, **kw)).fit()
    assert len(hist) == 5 and all(math.isfinite(m["loss"]) for m in hist)
    assert sorted(m["images"] for m in hist) == [0, 0, 1, 1, 1]  # the skipped image's step and the text step
    # resuming at each checkpoint runs the remaining steps, the image-less ones included
    for step in (1, 2, 3):
        (tmp_path / "run" / "model.safetensors").unlink(missing_ok=True)
        rest = Trainer(make_cfg(shapes, tmp_path / "run", data, **kw),
                       resume=str(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")).fit()
        assert [m["loss"] for m in rest] == [m["loss"] for m in hist[step:]]


def test_non_finite_values_are_refused_and_a_diverging_step_stops_the_run(shapes, tmp_path):
    data = subset(shapes, tmp_path, 4)
    for section, key, value in (("train", "lr", float("nan")), ("train", "weight_decay", float("nan")),
                                ("train", "lr", float("inf")), ("train", "epochs", float("nan")),
                                ("model", "align", {"loss_weight": float("nan")})):
        over = {key: value}
        with pytest.raises(ConfigError, match=rf"{section}\.{key}.* must be a finite number"):
            make_cfg(shapes, tmp_path / "x", data, **{section: over})
    with pytest.raises(ConfigError, match=r"train\.eps must be > 0"):
        make_cfg(shapes, tmp_path / "x", data, train={"eps": -1.0})
    # a learning rate that makes the weights blow up: the run stops at the first non-finite gradient, before
    # that update, writes no final model, and names the step and the last checkpoint
    cfg = make_cfg(shapes, tmp_path / "div", data, train={"lr": 1e30, "grad_clip": 0.0, "max_steps": 6,
                                                          "warmup_steps": 0}, checkpoint={"every_steps": 1})
    t = Trainer(cfg)
    with pytest.raises(TrainingError, match=r"step \d+: the loss .* is not finite .*The last checkpoint is "
                                            r".*step_\d+ \(--resume auto"):
        t.fit()
    assert not (tmp_path / "div" / "model.safetensors").exists()
    assert all(torch.isfinite(p).all() for p in t.model.parameters())  # the failing step changed nothing


def test_resume_names_a_corrupt_checkpoint_and_a_model_that_differs(shapes, tmp_path, caplog):
    data = subset(shapes, tmp_path, 4)
    kw = dict(train={"max_steps": 3}, checkpoint={"every_steps": 1})
    Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit(stop_after=3)
    ck = tmp_path / "r" / "checkpoints"
    step3 = ck / "step_00000003"
    weights = step3 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TrainingError, match=r"step_00000003/model.safetensors cannot be read .*incomplete or "
                                            r"corrupt; the other checkpoints of this run: .*step_00000002"):
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto")
    (ck / "step_00000002" / "rng_rank0.pt").write_bytes(b"")
    with pytest.raises(TrainingError, match=r"rng_rank0.pt cannot be read"):
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume=str(ck / "step_00000002"))
    step1 = str(ck / "step_00000001")
    other = make_cfg(shapes, tmp_path / "r", data, **kw)
    other.model.lm.d_model = 32
    with pytest.raises(ConfigError, match=r"the checkpoint's model differs from this run's \(model\.lm\.d_model: 64 "
                                          r"there, 32 here"):
        Trainer(other, resume=step1)
    # optimizer settings the checkpoint's optimizer state fixes: kept from it, said, and recorded truthfully
    with caplog.at_level("WARNING", logger="emma_mamba.training.trainer"):  # (the quickstart's tests quiet it)
        t = Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 3, "lr": 0.5}), resume=step1)
    assert "train.lr 0.001 (asked: 0.5)" in caplog.text and t.cfg.train.lr == 1e-3
    assert t.fit()[0]["lr"] != 0.5
    assert load_run_config(tmp_path / "r" / "train_config.yaml").train.lr == 1e-3


def _group_of(trainer, name):
    p = dict(trainer.model.named_parameters())[name]
    return next(g for g in trainer.optimizer.param_groups if any(q is p for q in g["params"]))


@pytest.mark.parametrize("change", [{"decay_embeddings": False}, {"lr_multipliers": {"projector": 10.0}}])
def test_resume_builds_the_optimizer_groups_from_the_checkpoints_settings(shapes, tmp_path, change, caplog):
    """Optimizer settings asked differently on resume are the checkpoint's (its state holds them): the parameter
    groups too, not only the recorded config (the embedding stays decayed; the projector keeps the base lr)."""
    data = subset(shapes, tmp_path, 4)
    kw = dict(train={"max_steps": 3, "decay_embeddings": True}, checkpoint={"every_steps": 1})
    Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit(stop_after=1)
    with caplog.at_level("WARNING", logger="emma_mamba.training.trainer"):
        t = Trainer(make_cfg(shapes, tmp_path / "r", data, train={**kw["train"], **change}), resume="auto")
    assert "continues with the checkpoint's settings" in caplog.text
    emb = _group_of(t, "lm.embeddings.weight")
    assert emb["weight_decay"] == 0.1  # decay_embeddings: true, as the checkpoint was written
    proj = next(n for n, q in t.model.named_parameters() if n.startswith("projector.") and q.ndim == 2)
    assert _group_of(t, proj)["lr"] == _group_of(t, "lm.layers.0.mixer.in_proj.weight")["lr"]
    rows = t.fit()  # the restored optimizer state fits the groups: both remaining steps run
    assert [m["step"] for m in rows] == [2, 3]


def test_a_changed_schedule_sets_the_lr_of_the_first_resumed_step(shapes, tmp_path):
    import math

    data = subset(shapes, tmp_path, 4)
    kw = dict(checkpoint={"every_steps": 2})
    Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 4, "warmup_steps": 1}, **kw)).fit(stop_after=2)
    t = Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 8, "warmup_steps": 1}, **kw),
                resume="auto")
    rows = [m for m in t.fit(stop_after=2) if m["step"] > 2]
    assert [m["step"] for m in rows] == [3, 4]
    # the lr logged for step k is the one its update used: the new schedule's from step 3 on, cosine from 1e-3
    # to 0 over the 7 steps after the 1 warm-up step (the old 4-step schedule's step 3: 0.75e-3)
    assert [m["lr"] for m in rows] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 7))
                                                     for k in (3, 4)])
    assert rows[0]["lr"] != pytest.approx(0.75e-3)


def test_finetune_without_align_head_in_trainable_builds_no_head(shapes, tmp_path, caplog):
    """A frozen head's loss would train the LM towards a fixed (here random) decoder's pixels: no head is built,
    the loss is the LM's alone, and the warning says so."""
    data = subset(shapes, tmp_path, 4)
    with caplog.at_level("WARNING", logger="emma_mamba.training.trainer"):
        t = Trainer(make_cfg(shapes, tmp_path / "f", data, train={"trainable": ["mff", "projector", "lm"]}))
    assert t.model.align_head is None
    assert "train.trainable leaves out align_head" in caplog.text
    (row,) = t.fit(stop_after=1)
    assert row["loss"] == row["lm_loss"]


def test_max_length_below_one_images_tokens_and_a_warmup_past_the_run_are_named(shapes, tmp_path, caplog):
    data = subset(shapes, tmp_path, 4)
    with pytest.raises(ConfigError, match=r"data\.max_length 16 is not more than one image's 16 visual tokens"):
        Trainer(make_cfg(shapes, tmp_path / "a", data, data={"max_length": 16}))
    with caplog.at_level("WARNING", logger="emma_mamba.training.trainer"):
        Trainer(make_cfg(shapes, tmp_path / "b", data, train={"warmup_steps": 10, "max_steps": 2}))
    assert "train.warmup_steps 10 is more than the run's 2 steps" in caplog.text


def test_bench_packing_times_the_three_layouts_of_the_same_samples(shapes, tmp_path, capsys):
    """emma_mamba.training.bench_packing: padded in the shuffled order, padded grouped by length (the trainer's
    default), packed; the same real tokens in each; the grouped layout's positions by hand (the samples' lengths
    sorted, each micro-batch of 4 padded to its longest)."""
    from emma_mamba.training import bench_packing

    assert bench_packing.main(["--json", str(shapes / "train" / "stage2_instruct.json"), "--image-folder",
                               str(shapes / "images"), "--samples", "8", "--pad-rows", "4", "--reps", "1",
                               "--max-length", "96"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    real = {out[k]["real_tokens"] for k in ("padding", "padding_grouped", "packing")}
    assert len(real) == 1
    t = Trainer(make_cfg(shapes, tmp_path / "lengths", data={"max_length": 96}))
    lengths = t.dataset.lengths
    ids = [r[0] for r in plan_rows(lengths, 0, 0, False, 96)][:8]
    srt = sorted((lengths[i] for i in ids), reverse=True)
    assert out["padding_grouped"]["positions"] == 4 * srt[0] + 4 * srt[4] <= out["padding"]["positions"]
