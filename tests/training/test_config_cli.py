"""Run configs and the pretrain/finetune commands: strict keys (YAML and command line), value parsing, stage
checks, the shipped recipes (paper hyperparameters), the optimizer's parameter groups and the LR schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from emma_mamba.config import ConfigError, get_preset, save_config
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.training import cli_train
from emma_mamba.training.config import load_run_config, parse_cli_value, run_config_to_dict
from emma_mamba.training.optim import lr_lambda, param_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, d, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


BASE = {"stage": "pretrain", "output_dir": "runs/x", "model": "tiny", "data": {"json": "d.json"}}


def test_unknown_key_in_yaml_names_key_path_and_file(tmp_path):
    p = write(tmp_path, {**BASE, "train": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key 'lrr' at 'train\.lrr' \(did you mean 'lr'\?\); "
                                          r"valid keys of 'train': lr, min_lr_ratio"):
        load_run_config(p)
    p = write(tmp_path, {**BASE, "model": {"preset": "tiny", "lm": {"d_modle": 3}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'd_modle' at 'model\.lm\.d_modle' \(did you mean "
                                          r"'d_model'\?\)"):
        load_run_config(p)
    p = write(tmp_path, {**BASE, "train": {"micro_batch_size": "four"}})
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: expected int, got 'four'"):
        load_run_config(p)
    p = write(tmp_path, {**BASE, "data": {"json": "d.json", "on_error": "ignore"}})
    with pytest.raises(ConfigError, match=r"data\.on_error: expected 'raise' \| 'skip'"):
        load_run_config(p)

    p = write(tmp_path, {**BASE, "train": {"trainable": ["lm", "decoder"]}})
    with pytest.raises(ConfigError, match=r"train\.trainable must be a non-empty list of distinct module names "
                                          r"from vision, mff, instruction, projector, lm, align_head"):
        load_run_config(p)
    p = write(tmp_path, {**BASE, "train": {"trainable": []}})
    with pytest.raises(ConfigError, match=r"train\.trainable must be a non-empty list"):
        load_run_config(p)


@pytest.mark.parametrize("module,model,key", [
    ("vision", "tiny", "model.vision.freeze is true"),
    ("instruction", "cobra-like", "model.instruction.enabled is false"),
    ("align_head", "cobra-like", "model.align.enabled is false")])
def test_trainable_naming_a_module_the_model_lacks_is_a_config_error(tmp_path, module, model, key):
    """Said when the config is read, naming the model key (the model's own check was a ValueError traceback
    once the model was built); the same list on a model that has the module is accepted."""
    p = write(tmp_path, {**BASE, "model": model, "train": {"trainable": ["lm", module]}})
    with pytest.raises(ConfigError, match=rf"run\.yaml: train\.trainable lists {module} but {key}"):
        load_run_config(p)
    fixed = {"preset": model, "vision": {"freeze": False}} if module == "vision" else "tiny"
    assert load_run_config(write(tmp_path, {**BASE, "model": fixed, "train": {"trainable": ["lm", module]}}))


def test_cli_overrides_are_parsed_and_validated(tmp_path, capsys):
    p = write(tmp_path, BASE)
    rc = cli_train.main(["--config", str(p), "--print-config", "--train.lr", "2e-5", "--data.packing", "true",
                         "--model.lm.d_state", "4", "--train.betas", "[0.9, 0.95]", "--output_dir", "runs/y"])
    assert rc == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["train"]["lr"] == 2e-5 and d["data"]["packing"] is True and d["model"]["lm"]["d_state"] == 4
    assert d["train"]["betas"] == [0.9, 0.95] and d["output_dir"] == "runs/y" and d["stage"] == "pretrain"
    rc = cli_train.main(["--config", str(p), "--print-config", "--train.micro_batch_size", "x"])
    assert rc == 2 and "command line: train.micro_batch_size: expected int, got 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown option, and no abbreviations of real ones
        cli_train.main(["--config", str(p), "--train.lrr", "1"])
    assert "unrecognized arguments: --train.lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_train.main(["--config", str(p), "--train.l", "1"])
    assert parse_cli_value("2e-5") == 2e-5 and parse_cli_value("runs/a") == "runs/a"
    assert parse_cli_value("null") is None and parse_cli_value("3") == 3


def test_text_fields_keep_the_text_typed(tmp_path, capsys):
    # a folder or file named like a number stays that name (YAML would make it an int / float and refuse it)
    p = write(tmp_path, BASE)
    rc = cli_train.main(["--config", str(p), "--print-config", "--output_dir", "2024", "--model.lm.pretrained",
                         "1e3", "--model.vision.pretrained", "null", "--train.lr", "1e-3"])
    assert rc == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["output_dir"] == "2024" and d["model"]["lm"]["pretrained"] == "1e3"
    assert d["model"]["vision"]["pretrained"] is None and d["train"]["lr"] == 1e-3
    from emma_mamba.config import apply_dotted_overrides, get_preset

    cfg = apply_dotted_overrides(get_preset("tiny"), ["vision.pretrained=2024", "lm.n_layer=3"])
    assert cfg.vision.pretrained == "2024" and cfg.lm.n_layer == 3


def test_empty_and_numeric_text_values_are_named(tmp_path, capsys):
    # an empty --output_dir is named as empty (it was "expected str, got None"); an optional text field given ''
    # is cleared; in a YAML file a number where text belongs is refused with the quoting that fixes it
    p = write(tmp_path, BASE)
    rc = cli_train.main(["--config", str(p), "--print-config", "--output_dir", ""])
    assert rc == 2 and "output_dir is empty" in capsys.readouterr().err
    rc = cli_train.main(["--config", str(p), "--print-config", "--model.lm.pretrained", ""])
    assert rc == 0 and yaml.safe_load(capsys.readouterr().out)["model"]["lm"]["pretrained"] is None
    for value, hint in ((2024, "write it in quotes, '2024'"), (None, "the value is empty")):
        q = write(tmp_path, dict(BASE, output_dir=value))
        rc = cli_train.main(["--config", str(q), "--print-config"])
        err = capsys.readouterr().err
        assert rc == 2 and "output_dir: expected str" in err and hint in err, err


def test_model_replaced_on_the_command_line(tmp_path, capsys):
    # --model NAME|FILE swaps the recipe's model (the dual-encoder 2.8B model on the 2.8B stage-1 recipe);
    # --model.* keys then apply on top of it, nested sections included
    rc = cli_train.main(["--config", str(CONFIGS / "train_emma-mamba-2.8b_stage1.yaml"), "--print-config",
                         "--model", str(CONFIGS / "model_emma-mamba-2.8b-dinosiglip.yaml")])
    assert rc == 0
    d = yaml.safe_load(capsys.readouterr().out)
    se = d["model"]["vision"]["second_encoder"]
    assert d["model"]["name"] == "emma-mamba-2.8b-dinosiglip" and se["timm_model"] == "vit_large_patch14_reg4_dinov2"
    assert d["train"]["lr"] == 1e-3 and d["stage"] == "pretrain"  # the recipe's training settings stay
    p = write(tmp_path, BASE)
    rc = cli_train.main(["--config", str(p), "--print-config", "--model.vision.second_encoder.timm_model",
                         "vit_small_patch14_reg4_dinov2", "--model.vision.second_encoder.timm_kwargs",
                         "{img_size: 32, patch_size: 8}", "--model.vision.second_encoder.taps", "[0, 1]"])
    assert rc == 0
    se = yaml.safe_load(capsys.readouterr().out)["model"]["vision"]["second_encoder"]
    assert se["timm_kwargs"] == {"img_size": 32, "patch_size": 8} and se["taps"] == [0, 1]
    rc = cli_train.main(["--config", str(p), "--print-config", "--model", "huge"])
    assert rc == 2 and "command line: model: 'huge' is neither a preset" in capsys.readouterr().err
    rc = cli_train.main(["--config", str(p), "--print-config", "--model.vision.second_encoder.taps", "[0]"])
    assert rc == 2 and "vision.second_encoder: taps set but timm_model is null" in capsys.readouterr().err
    rc = cli_train.main(["--config", str(p), "--print-config", "--model.vision.second_encoder.taps", "[0]",
                         "--model.vision.second_encoder.timm_model", "vit_small_patch14_reg4_dinov2"])
    assert rc == 2 and "model.vision.second_encoder.taps: [0] has 1 block indices but model.vision.taps [0, 1] has 2" \
        in capsys.readouterr().err
    ck = tmp_path / "ck"
    ck.mkdir()
    save_config(get_preset("tiny"), ck / "config.yaml")
    rc = cli_train.main(["--config", str(p), "--print-config", "--init_from", str(ck), "--model", "tiny"])
    assert rc == 2 and "--model cannot replace a model loaded by init_from" in capsys.readouterr().err


def test_command_fixes_the_stage(tmp_path, capsys):
    p = write(tmp_path, BASE)
    assert cli_train.main(["--config", str(p)], stage="finetune") == 2
    assert "stage is 'pretrain'; run it with `emma-mamba pretrain`" in capsys.readouterr().err
    q = write(tmp_path, {k: v for k, v in BASE.items() if k != "stage"}, "nostage.yaml")
    assert cli_train.main(["--config", str(q), "--print-config"], stage="finetune") == 0
    assert yaml.safe_load(capsys.readouterr().out)["stage"] == "finetune"


def test_init_from_takes_the_model_config_from_the_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    cfg = get_preset("tiny")
    cfg.lm.d_state = 4
    save_config(cfg, ck / "config.yaml")
    d = {k: v for k, v in BASE.items() if k != "model"}
    got = load_run_config(write(tmp_path, {**d, "init_from": str(ck)}))
    assert got.model.lm.d_state == 4
    with pytest.raises(ConfigError, match="either `model` or `init_from`.*differ in: lm"):
        load_run_config(write(tmp_path, {**BASE, "init_from": str(ck)}))
    with pytest.raises(ConfigError, match="has no config.yaml"):
        load_run_config(write(tmp_path, {**d, "init_from": str(tmp_path)}))
    with pytest.raises(ConfigError, match="init_from: .*nothere: no such directory .*has it run yet"):
        load_run_config(write(tmp_path, {**d, "init_from": str(tmp_path / "nothere")}))
    # a file of the model directory: its directory named; a run that stopped before its final model: its newest
    # checkpoint named (a checkpoint directory holds a loadable model)
    (ck / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"init_from: .*model.safetensors is a file; give its directory: {ck}$"):
        load_run_config(write(tmp_path, {**d, "init_from": str(ck / "model.safetensors")}))
    run = tmp_path / "stopped"
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"has no config.yaml .*no final model .*--resume auto finishes it, or start "
                                          r"from its newest checkpoint, init_from: .*step_00000004$"):
        load_run_config(write(tmp_path, {**d, "init_from": str(run)}))
    # what a stage-1 run that failed at its start (its data missing) leaves: the lock only
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / ".emma_mamba.lock").write_text("")
    with pytest.raises(ConfigError, match=r"has no config.yaml .*holds no model: the run into it stopped before its "
                                          r"first checkpoint"):
        load_run_config(write(tmp_path, {**d, "init_from": str(tmp_path / "failed")}))


def test_global_batch_must_divide(tmp_path):
    cfg = load_run_config(write(tmp_path, {**BASE, "train": {"global_batch_size": 12, "micro_batch_size": 4}}))
    assert cfg.grad_accum(1) == 3 and cfg.grad_accum(3) == 1
    with pytest.raises(ConfigError, match=r"global_batch_size \(12\) must be a multiple of .*\(4\) x world size \(2\)"):
        cfg.grad_accum(2)
    # one that no world size splits is refused with the config, before any model is built
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(12\) must be a multiple of "
                                          r"train.micro_batch_size \(8\) x world size"):
        load_run_config(write(tmp_path, {**BASE, "train": {"global_batch_size": 12, "micro_batch_size": 8}}))


def test_parallel_timeout_minutes_reaches_the_process_group(tmp_path, monkeypatch):
    """parallel.timeout_minutes is init_process_group's timeout (null: torch's default, no timeout passed); a value
    that is not a finite number > 0 is a ConfigError naming the key."""
    import datetime

    import torch.distributed as dist

    from emma_mamba.training import trainer as trainer_mod
    from emma_mamba.training.parallel import init_distributed

    assert load_run_config(write(tmp_path, BASE)).parallel.timeout_minutes is None
    cfg = load_run_config(write(tmp_path, {**BASE, "parallel": {"timeout_minutes": 90}}),
                          {"parallel": {"timeout_minutes": 2.5}})
    assert cfg.parallel.timeout_minutes == 2.5
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ConfigError, match=r"run\.yaml: parallel\.timeout_minutes must be (> 0|a finite number)"):
            load_run_config(write(tmp_path, {**BASE, "parallel": {"timeout_minutes": bad}}))
    asked = []

    class Stop(Exception):
        pass

    def init_process_group(backend, **kw):
        asked.append(kw)
        raise Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for minutes in (2.5, None):
        cfg.parallel.timeout_minutes = minutes
        with pytest.raises(Stop):
            trainer_mod.Trainer(cfg, device="cpu")  # the trainer passes the config's value on
    assert asked[0]["timeout"] == datetime.timedelta(minutes=2.5) and "timeout" not in asked[1]
    with pytest.raises(Stop):
        init_distributed("cpu", 0.5)
    assert asked[2]["timeout"] == datetime.timedelta(seconds=30)


def test_an_unknown_preset_in_a_run_config_names_the_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.preset: unknown preset 'tinyy'; valid presets: .* "
                                          r"\(did you mean 'tiny'\?\)"):
        load_run_config(write(tmp_path, {**BASE, "model": {"preset": "tinyy"}}))


def test_a_seed_the_data_order_cannot_take_is_refused_at_config_time(tmp_path):
    from emma_mamba.data.llava import plan_rows

    edge = 2 ** 43  # seed * 1000003 + epoch still fits torch's 64-bit generator seed, both signs
    for seed in (edge, -edge):
        load_run_config(write(tmp_path, {**BASE, "train": {"seed": seed}}))
        assert sorted(sum(plan_rows([3, 4, 5], seed, 9, False, 8), [])) == [0, 1, 2]
    for seed in (edge + 1, -edge - 1, 2 ** 45, -2 ** 44):
        if abs(seed) >= 2 ** 44:  # what such a run failed with, after loading the data (torch's generator)
            with pytest.raises((ValueError, RuntimeError)):
                plan_rows([3, 4, 5], seed, 0, False, 8)
        with pytest.raises(ConfigError, match=rf"train.seed must be between -2\*\*43 and 2\*\*43 .*got {seed}"):
            load_run_config(write(tmp_path, {**BASE, "train": {"seed": seed}}))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train_*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    over = {}
    if raw.get("init_from"):  # stand in for the stage-1 output the recipe points at
        ck = tmp_path / "stage1"
        ck.mkdir()
        save_config(get_preset("emma-mamba-2.8b" if "2.8b" in path.name else "tiny"), ck / "config.yaml")
        over = {"init_from": str(ck)}
    cfg = load_run_config(path, over)
    assert cfg.stage == ("pretrain" if "stage1" in path.name else "finetune")
    out = tmp_path / "resolved.yaml"
    out.write_text(yaml.safe_dump(run_config_to_dict(cfg)))
    assert load_run_config(out) == cfg  # the resolved config written next to checkpoints reads back equal
    t = cfg.train
    if "stage2" in path.name and "tiny" not in path.name or "single" in path.name:
        # the EMMA-Mamba paper: 2 epochs, lr 2e-5, wd 0.1, warmup 3 %, cosine, global batch 128, bf16, 2048
        lr = 2e-5
        if "lora" in path.name:  # LLaVA-1.5's LoRA: r 128, alpha 256, lr 2e-4; the bridge keeps 2e-5
            assert (t.lora.r, t.lora.alpha, t.lora.base_dtype) == (128, 256, "bf16")
            assert t.lora.targets == ["in_proj", "x_proj", "out_proj"]  # the default of its Mamba-1 LM
            # after a Mamba-2 stage 1 (README's Mamba-2 route) the same recipe adapts the projections it has
            ck2 = tmp_path / "mamba2_stage1"
            ck2.mkdir()
            save_config(get_preset("emma-mamba2-2.7b"), ck2 / "config.yaml")
            assert load_run_config(path, {"init_from": str(ck2)}).train.lora.targets == ["in_proj", "out_proj"]
            assert cfg.parallel.strategy == "auto"
            assert all(t.lr * t.lr_multipliers[m] == pytest.approx(lr)
                       for m in ("mff", "instruction", "projector", "align_head"))
            lr = 2e-4
        # max length: 2048 text tokens; the dinosiglip single stage counts its 729 visual tokens on top, as the
        # authors' code does (data.max_length counts every position)
        text_and_visual = 2048 + (729 if "dinosiglip_single" in path.name else 0)
        assert (t.epochs, t.lr, t.weight_decay, t.warmup_ratio, t.schedule, t.global_batch_size, t.precision,
                cfg.data.max_length) == (2, lr, 0.1, 0.03, "cosine", 128, "bf16", text_and_visual)
    if "single" in path.name:
        assert cfg.model.name == ("emma-mamba-2.8b-dinosiglip" if "dinosiglip" in path.name else "cobra-like")
        assert cfg.init_from is None
    if "dinosiglip" in path.name:  # the paper's vision front: SigLIP + DINOv2 at 384 px
        se = cfg.model.vision.second_encoder
        assert cfg.model.vision.model_name == "ViT-SO400M-14-SigLIP-384" and se.timm_model.endswith("dinov2")
        assert se.timm_kwargs == {"img_size": 384} and cfg.model.instruction.tokenizer is not None


def test_no_weight_decay_on_a_log_d_norms_biases():
    lm = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64, d_state=4))
    groups = param_groups(lm, 0.1)
    decay, no_decay = set(groups[0]["names"]), set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for i in range(2):
        p = f"layers.{i}."
        assert {p + "mixer.A_log", p + "mixer.D", p + "norm.weight", p + "mixer.conv1d.bias",
                p + "mixer.dt_proj.bias"} <= no_decay
        assert {p + "mixer.in_proj.weight", p + "mixer.out_proj.weight", p + "mixer.x_proj.weight",
                p + "mixer.dt_proj.weight", p + "mixer.conv1d.weight"} <= decay
    assert "norm_f.weight" in no_decay and "embeddings.weight" in decay
    assert decay | no_decay == {n for n, _ in lm.named_parameters()} and not decay & no_decay
    assert "embeddings.weight" in set(param_groups(lm, 0.1, decay_embeddings=False)[1]["names"])
    lm.layers[0].requires_grad_(False)
    assert not any(n.startswith("layers.0.") for g in param_groups(lm, 0.1) for n in g["names"])


def test_modules_exempt_their_own_parameters_from_weight_decay():
    """Both conventions: timm's / open_clip's ``no_weight_decay()`` (names relative to the module that says it,
    a submodule's name exempting all of it) and mamba-ssm's ``_no_weight_decay`` attribute on a parameter."""

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.zeros(4, 3))
            self.proj = torch.nn.Linear(3, 3)
            self.mixer = torch.nn.Linear(3, 3)

        def no_weight_decay(self):
            return {"pos", "mixer", "absent_name"}

    model = torch.nn.Module()
    model.tower, model.head = Tower(), torch.nn.Linear(3, 3)
    model.head.weight._no_weight_decay = True
    model.other = torch.nn.Parameter(torch.zeros(2, 2))
    decay, no_decay = (set(g["names"]) for g in param_groups(model, 0.1))
    assert decay == {"tower.proj.weight", "other"}
    assert no_decay == {"tower.pos", "tower.mixer.weight", "tower.mixer.bias", "tower.proj.bias", "head.weight",
                        "head.bias"}


def test_a_trained_vits_position_embedding_is_not_decayed():
    from emma_mamba.models.vlm import EmmaMamba

    model = EmmaMamba(get_preset("tiny"))
    model.requires_grad_(True)
    decay, no_decay = (set(g["names"]) for g in param_groups(model, 0.1))
    assert "vision.visual.positional_embedding" in no_decay and "vision.visual.class_embedding" in no_decay
    assert "vision.visual.conv1.weight" in decay and "vision.visual.proj" in decay
    # the alignment head's learned position embedding alike (it was decayed, the ViT's not)
    assert "align_head.pos_embed" in no_decay and "align_head.in_proj.weight" in decay


def test_lr_schedule_by_hand():
    # warmup 2 of 10 steps, then cosine to 10 % of the peak
    got = [lr_lambda(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert got[0] == 0.5 and got[1] == 1.0 and got[2] == 1.0
    assert got[6] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi/2) = 0
    assert got[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [lr_lambda(s, 10, 2, "constant") for s in range(10)] == [0.5] + [1.0] * 9
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    from emma_mamba.training.optim import build_scheduler

    class C:
        warmup_steps, warmup_ratio, schedule, min_lr_ratio = None, 0.3, "cosine", 0.0

    sch = build_scheduler(opt, C, 10)  # warmup = ceil(0.3 * 10) = 3 steps
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 7))])


def test_resume_argument(tmp_path):
    from emma_mamba.training.checkpoint import resolve_resume

    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing to resume: a fresh start
    with pytest.raises(FileNotFoundError, match=r"--resume .*: not a checkpoint directory .*trainer_state\.pt"):
        resolve_resume(str(tmp_path), tmp_path)
    # a path that is not there is said so (and a misspelt auto suggested)
    with pytest.raises(FileNotFoundError, match=r"--resume autoo: no such file or directory .*did you mean 'auto'"):
        resolve_resume("autoo", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs/nope: no such file or directory \(--resume takes 'auto' or "
                                                r"a checkpoint directory\)$"):
        resolve_resume(str(tmp_path / "runs" / "nope"), tmp_path)
    for step in (2, 10):  # the highest complete step wins; an unfinished .tmp write is ignored
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "step_00000020.tmp").mkdir()
    assert resolve_resume("auto", tmp_path).name == "step_00000010"


def test_yaml_and_command_line_mistakes_are_named_without_a_traceback(tmp_path, capsys, monkeypatch):
    p = tmp_path / "dup.yaml"
    p.write_text("stage: pretrain\ntrain:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: not valid YAML: [\s\S]*the key 'lr' is given twice \(first at "
                                          r"line 3\)[\s\S]*dup\.yaml\", line 4"):
        load_run_config(p)
    p = tmp_path / "latin1.yaml"
    p.write_bytes("stage: pretrain\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        load_run_config(p)
    p = write(tmp_path, {**BASE, "data": {"json": "d.json", "prompt_template": "{prompt} {x}"}})
    with pytest.raises(ConfigError, match=r"data\.prompt_template may hold only the field \{prompt\}"):
        load_run_config(p)
    # through the command: one line on stderr, exit 2
    for argv, words in (([], "the key 'lr' is given twice"),
                        (["--output_dir", str(tmp_path / "afile")], "is a file, not a folder"),
                        (["--device", "cuda"], "no CUDA GPU is visible to this process"),
                        (["--model.lm.pretrained", str(tmp_path / "nope")], "checkpoint directory")):
        (tmp_path / "afile").write_text("x")
        (tmp_path / "d.json").write_text("[]")  # (the data paths are checked before the model is built)
        cfg = tmp_path / "dup.yaml" if not argv else write(tmp_path, {**BASE, "output_dir": str(tmp_path / "o"),
                                                                      "data": {"json": str(tmp_path / "d.json")}})
        if argv and argv[0] == "--device":
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
            monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        rc = cli_train.main(["--config", str(cfg), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, (argv, err)


def test_exponent_floats_are_numbers_in_files_lists_and_dicts(tmp_path, capsys):
    # PyYAML reads 1e-3 (no dot) and 1.0e3 (no sign) as text; `--train.lr 1e-3` was a float but `lr: 1e-3` in
    # the run YAML, `--train.betas [0.9,1e-3]` and `--train.lr_multipliers {vision: 1e-1}` were refused
    p = tmp_path / "run.yaml"
    p.write_text("stage: pretrain\noutput_dir: runs/x\nmodel: {preset: tiny, lm: {rms_norm_eps: 1e-6}}\n"
                 "data:\n  json: d.json\n  sources: null\n"
                 "train:\n  lr: 1e-3\n  eps: 1e-8\n  betas: [0.9, 9.99e-1]\n  lr_multipliers: {projector: 1e1}\n"
                 "log:\n  peak_tflops: 1.0e3\n")
    cfg = load_run_config(p)
    assert (cfg.train.lr, cfg.train.eps, cfg.train.betas, cfg.log.peak_tflops) == (1e-3, 1e-8, [0.9, 0.999], 1e3)
    assert cfg.train.lr_multipliers == {"projector": 10.0} and cfg.model.lm.rms_norm_eps == 1e-6
    out = tmp_path / "resolved.yaml"
    out.write_text(yaml.safe_dump(run_config_to_dict(cfg)))
    assert load_run_config(out) == cfg
    q = write(tmp_path, BASE, "base.yaml")
    rc = cli_train.main(["--config", str(q), "--print-config", "--train.betas", "[0.9, 1e-1]",
                         "--train.lr_multipliers", "{vision: 1e-1, projector: 2E1}",
                         "--data.sources", "[{json: a.json, repeat: 5e-1}]", "--data.json", "null"])
    err = capsys.readouterr()
    assert rc == 0, err.err
    d = yaml.safe_load(err.out)
    assert d["train"]["betas"] == [0.9, 0.1] and d["train"]["lr_multipliers"] == {"vision": 0.1, "projector": 20.0}
    assert d["data"]["sources"] == [{"json": "a.json", "repeat": 0.5}]
    # text fields keep the text typed; a word is still no number
    rc = cli_train.main(["--config", str(q), "--print-config", "--train.lr_multipliers", "{vision: fast}"])
    assert rc == 2 and "train.lr_multipliers.vision: expected a number > 0, got 'fast'" in capsys.readouterr().err


def test_text_options_keep_newlines_spaces_and_hashes(tmp_path, capsys):
    # a text field's value is the text typed: YAML folded the newlines of a chat template into spaces (a different
    # template, silently), cut everything after ' #' as a comment and stripped the spaces around it
    p = write(tmp_path, BASE)
    template = "<|user|>\n{prompt}</s>\n<|assistant|>\n"
    rc = cli_train.main(["--config", str(p), "--print-config", "--data.prompt_template", template,
                         "--data.turn_end", "</s> ", "--output_dir", "runs/exp #3", "--log.wandb", "proj #2",
                         "--model.name", "&x y"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = yaml.safe_load(out.out)
    assert d["data"]["prompt_template"] == template and d["data"]["turn_end"] == "</s> "
    assert d["output_dir"] == "runs/exp #3" and d["log"]["wandb"] == "proj #2" and d["model"]["name"] == "&x y"
    # null / ~ still clear an optional text field, quotes still give the text inside them
    assert parse_cli_value("null", str | None) is None and parse_cli_value("~", str | None) is None
    assert parse_cli_value("'null'", str | None) == "null" and parse_cli_value('"a #b"', str) == "a #b"
    from emma_mamba.config import apply_dotted_overrides, get_preset

    cfg = apply_dotted_overrides(get_preset("tiny"), ["vision.pretrained=w/a: b #1.pt", "image_token=<img> "])
    assert cfg.vision.pretrained == "w/a: b #1.pt" and cfg.image_token == "<img> "


def test_model_errors_name_the_key_as_the_user_wrote_it(tmp_path, capsys):
    """A model value refused by the model's validation named `lm.d_model` whether it came from `--model.lm.d_model`
    or the run YAML's `model:` section; it names the full path typed there. A model file of its own (`--model
    FILE`, `model: FILE`) names its keys as written in that file."""
    p = write(tmp_path, BASE)
    for argv, want in ((["--model.lm.d_model", "0"], "command line: model.lm.d_model must be >= 1, got 0"),
                       (["--model.align.num_heads", "3"], "command line: model.align.d_model (32) must be divisible "
                                                          "by model.align.num_heads (3)"),
                       (["--model.mff.mode", "none"], "command line: model.mff.mode 'none' uses a single tap, but "
                                                      "model.vision.taps has 2")):
        rc = cli_train.main(["--config", str(p), "--print-config", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and want in err, err
    for model, want in (({"lm": {"d_model": 0}}, "model.lm.d_model must be >= 1, got 0"),
                        ({"lm": {"d_model": "x"}}, "model.lm.d_model: expected int, got 'x'"),
                        ({"lm": {"rms_norm_eps": float("nan")}}, "model.lm.rms_norm_eps must be a finite number")):
        q = write(tmp_path, {**BASE, "model": model}, "with_model.yaml")
        with pytest.raises(ConfigError) as e:
            load_run_config(q)
        assert str(e.value).startswith(f"{q}: {want}"), str(e.value)
    m = tmp_path / "model.yaml"
    m.write_text("preset: tiny\nlm: {d_model: 0}\n")
    rc = cli_train.main(["--config", str(p), "--print-config", "--model", str(m)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{m}: lm.d_model must be >= 1, got 0" in err, err


def test_model_options_can_correct_an_invalid_value_of_the_model_file(tmp_path, capsys):
    """The model's own validation runs after the --model.* options: an option correcting the file's invalid
    value is accepted (it was refused before the option applied); an option that does not correct it gets the
    file's error, as the file writes the key; a valid file made invalid by an option names the option."""
    m = tmp_path / "model.yaml"
    m.write_text("preset: tiny\nlm: {d_model: 0}\n")
    for model in (str(m), {"preset": "tiny", "lm": {"d_model": 0}}):
        p = write(tmp_path, {**BASE, "model": model})
        cfg = load_run_config(p, {"model": {"lm": {"d_model": 48}}})
        assert cfg.model.lm.d_model == 48
        with pytest.raises(ConfigError) as e:
            load_run_config(p, {"model": {"lm": {"n_layer": 3}}})
        want = f"{m}: lm.d_model must be >= 1, got 0" if model == str(m) else f"{p}: model.lm.d_model must be >= 1"
        assert str(e.value).startswith(want), str(e.value)
        with pytest.raises(ConfigError, match=r"expected int, got 'x'"):  # keys and types still checked first
            load_run_config(p, {"model": {"lm": {"d_model": "x"}}})
    p = write(tmp_path, {**BASE, "model": str(m)})
    rc = cli_train.main(["--config", str(p), "--print-config", "--model.lm.d_model", "48"])
    out = capsys.readouterr()
    assert rc == 0 and "d_model: 48" in out.out, out.err
    # --model replaces the run YAML's invalid model: only the replacement counts
    assert load_run_config(p, model="tiny").model.lm.d_model == get_preset("tiny").lm.d_model
    good = write(tmp_path, {**BASE, "model": "tiny"})
    with pytest.raises(ConfigError, match=r"^overrides: model\.lm\.d_model must be >= 1, got 0"):
        load_run_config(good, {"model": {"lm": {"d_model": 0}}})  # from Python: not "command line"


def test_a_config_built_in_code_meets_the_files_rules(tmp_path):
    """A RunConfig / ModelConfig made or edited in Python is checked field by field as a YAML file is: a word that
    is not one of a Literal field's (LLaVA's 'pad' for vision.image_resize, 'linear' for train.schedule) trained
    with the default and the saved model then failed to load; now validate() names it, and the Trainer validates
    before it creates anything."""
    from emma_mamba.training.config import RunConfig
    from emma_mamba.training.trainer import Trainer

    cfg = get_preset("tiny")
    cfg.vision.image_resize = "pad"
    with pytest.raises(ConfigError, match=r"^vision\.image_resize: expected 'default' \| 'crop' \| 'squash' \| "
                                          r"'letterbox', got 'pad'"):
        cfg.validate()
    cfg.vision.image_resize = "letterbox"
    cfg.chat.prompt_template = "USER: {question} ASSISTANT:"  # the model's chat format (written by training)
    with pytest.raises(ConfigError, match=r"^model\.chat\.prompt_template must contain '\{prompt\}'"):
        cfg.validate("model")
    cfg.chat.prompt_template = "USER: {prompt} ASSISTANT:"
    cfg.lm.n_layer = 2.0  # a float where an int is wanted
    with pytest.raises(ConfigError, match=r"^model\.lm\.n_layer: expected int, got 2\.0"):
        cfg.validate("model")
    run = RunConfig(output_dir=str(tmp_path / "out"))
    run.data.json = str(tmp_path / "d.json")
    run.train.schedule = "linear"
    with pytest.raises(ConfigError, match=r"train\.schedule: expected 'cosine' \| 'constant', got 'linear'"):
        run.validate()
    for edit, message in ((lambda c: setattr(c.train, "schedule", "linear"), r"train\.schedule: expected"),
                          (lambda c: setattr(c.model.vision, "image_position", "before"),
                           r"model\.vision\.image_position: expected 'in_turn' \| 'before_turn'")):
        run = RunConfig(output_dir=str(tmp_path / "out"))
        run.data.json = str(tmp_path / "d.json")
        edit(run)
        with pytest.raises(ConfigError, match=message):
            Trainer(run, device="cpu")
        assert not (tmp_path / "out").exists()


def test_the_docs_training_from_python_example_runs(shapes, tmp_path, monkeypatch):
    """docs/training.md's "Training from Python" runs as written (in a folder whose data/shapes is a small
    ShapesWorld): the recipe by name with overrides, an edit in code, Trainer, fit, load."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    code = re.search(r"## Training from Python\n.*?```python\n(.*?)```", doc, re.S)
    assert code, "docs/training.md lost its Python example"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shapes").symlink_to(shapes)
    src = code.group(1).replace('"max_steps": 20', '"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 1')
    assert src != code.group(1), "the example's overrides changed: update this test's edit"
    ns: dict = {}
    exec(compile(src, "docs/training.md", "exec"), ns)
    assert len(ns["history"]) == 2 and ns["cfg"].train.lr == 5e-4
    assert (tmp_path / "runs" / "py_stage1" / "model.safetensors").is_file() and ns["model"].config.name
