"""`emma-mamba quickstart --fast` end to end, the word tokenizer it builds, its config checking, and the
ablation's aggregation (mean ± sample std) and variant models against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from emma_mamba.ablation import VARIANTS, aggregate, markdown_table, stage_overrides_for, summarise, variant_model
from emma_mamba.config import ConfigError, config_from_dict
from emma_mamba.quickstart import EVAL_TASKS, build_word_tokenizer, load_quickstart_config


def test_quickstart_fast_runs_end_to_end(tmp_path, capsys):
    from emma_mamba.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert [r["task"] for r in s["rows"]] == list(EVAL_TASKS)
    for r in s["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["chance_accuracy"] <= 1 and r["n"] > 0
        assert r["task"] in printed
    # the model's numbers are those of the answer files it wrote, scored on their own
    from emma_mamba.eval.scorers import score

    pope = score("pope", out / "eval" / "pope_random" / "answers.jsonl", out / "data" / "heldout" / "pope_random.jsonl",
                 allow_missing=True)
    assert s["rows"][2]["accuracy"] == pope["accuracy"]
    assert s["training"]["pretrain"]["steps"] == 2 and s["training"]["finetune"]["steps"] == 2
    # each stage validated on the held-out images' captions / conversations after its last step
    for stage, file in (("pretrain", "captions.json"), ("finetune", "instruct.json")):
        val = [json.loads(x) for x in (out / ("stage1" if stage == "pretrain" else "stage2") / "metrics.jsonl")
               .read_text().splitlines() if "val_loss" in x]
        assert [v["step"] for v in val] == [2] and val[0]["val_samples"] == 6  # the 6 held-out images
        assert s["training"][stage]["val_lm_loss"] == {"2": round(val[0]["val_lm_loss"], 4)}
        assert len(json.loads((out / "data" / "heldout" / file).read_text())) == 6
    # the plot command it prints draws both stages with their validation points
    cmd = next(line for line in printed.splitlines() if "emma-mamba plot" in line).split("emma-mamba ")[1].split()
    assert cmd == ["plot", str(out / "stage1"), str(out / "stage2")]
    assert main([*cmd, "--out", str(out / "curves.png")]) == 0 and (out / "curves.png").is_file()
    # stage 0 ran and stage 1 started from its CLIP: the stage-1 model's ViT holds the stage-0 weights
    assert s["training"]["clip"]["steps"] == 3 and (out / "clip" / "clip_metrics.jsonl").is_file()
    import torch

    from emma_mamba.models.vlm import load

    clip_state = torch.load(out / "clip" / "open_clip.pt", weights_only=True)
    vit = load(out / "stage1", for_training=False).vision.visual.state_dict()
    assert all(torch.equal(v, clip_state["visual." + k]) for k, v in vit.items())
    assert s["demo"]["question"] in printed
    # the demo's answer is the reply stripped; a blank one is said to be blank, with the reply as generated
    assert s["demo"]["model"] == s["demo"]["raw"].strip()
    assert (f"the model's reply {s['demo']['raw']!r} is white space only" in printed) == (not s["demo"]["model"])
    from emma_mamba import ops

    # where it ran: the kernel backend the training's ops dispatched to on this machine
    assert s["device"] == "cpu" and s["backend"] == ops.get_backend("cpu") and s["torch"] == torch.__version__
    assert (out / "stage2" / "tokenizer.json").is_file()
    # a second run into the same folder must be asked for explicitly
    assert main(["quickstart", "--fast", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_word_tokenizer_round_trips_training_text(tmp_path):
    from emma_mamba.data.shapes import ShapesConfig, generate
    from emma_mamba.models.tokenizer import load_tokenizer
    from emma_mamba.models.vlm import CHAT_TEMPLATE

    d = tmp_path / "d"
    generate(ShapesConfig(seed=1, n_train=12, n_heldout=2, image_size=96), d)
    tok = load_tokenizer(build_word_tokenizer(d, tmp_path / "tok"))
    assert tok.eos_token_id == tok.token_to_id("<|endoftext|>") and tok.pad_token_id == tok.token_to_id("<|padding|>")
    unk = tok.token_to_id("[UNK]")
    rec = json.loads((d / "train" / "stage2_instruct.json").read_text())[0]
    text = CHAT_TEMPLATE.format(prompt=rec["conversations"][0]["value"].replace("<image>\n", ""))
    ids = tok.encode(text + rec["conversations"][1]["value"] + "<|endoftext|>")
    assert unk not in ids
    assert ids[0] == tok.token_to_id("<|user|>") and ids[-1] == tok.eos_token_id
    # decode gives the words back (spacing aside)
    assert tok.decode(ids).split()[-1] == rec["conversations"][1]["value"].split()[-1]
    assert tok.encode("zebra") == [unk]


def test_quickstart_config_is_strict(tmp_path):
    p = tmp_path / "q.yaml"
    p.write_text("stage3: {}\n")
    with pytest.raises(ConfigError, match="stage3"):
        load_quickstart_config(p)
    p.write_text("eval: {batch: 3}\n")
    with pytest.raises(ConfigError, match="eval.batch"):
        load_quickstart_config(p)
    for name in ("quickstart.yaml", "quickstart_fast.yaml"):
        load_quickstart_config(Path(__file__).resolve().parent.parent / "configs" / name)


def test_a_bad_model_value_is_named_by_its_key_in_the_recipe():
    # stage 0 reads the recipe's `model:` section first: its errors name the key as written there
    from emma_mamba.quickstart import QuickstartConfig, clip_vision_config

    with pytest.raises(ConfigError, match=r"^quickstart config: model\.lm\.d_model must be >= 1, got 0$"):
        clip_vision_config(QuickstartConfig(model={"preset": "tiny", "lm": {"d_model": 0}}))


def test_aggregate_mean_and_sample_std_by_hand():
    m, s = aggregate([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7)
    assert s == pytest.approx(math.sqrt(((0.2) ** 2 + 0 + 0.2 ** 2) / 2))  # ddof = 1: 0.2
    assert aggregate([0.25]) == (0.25, 0.0)
    with pytest.raises(ValueError):
        aggregate([])


def test_summarise_and_table_by_hand():
    def run(seed, acc):
        met = {t: {"accuracy": acc, "f1": acc / 2} for t in EVAL_TASKS}
        return {"seed": seed, "metrics": met}

    summ = summarise({"a": [run(0, 0.6), run(1, 0.8)], "b": [run(0, 0.5)]})
    st = summ["a"]["stats"]["VQAv2 acc"]
    assert st["mean"] == pytest.approx(0.7) and st["std"] == pytest.approx(math.sqrt(0.02))  # 0.1414
    assert summ["a"]["stats"]["POPE-adv F1"]["mean"] == pytest.approx(0.35)
    assert summ["b"]["n_seeds"] == 1 and summ["b"]["stats"]["GQA acc"]["std"] == 0.0
    table = markdown_table(summ)
    assert "| a | 2 | 70.0 ± 14.1 |" in table and "| b | 1 | 50.0 |" in table  # one seed: no spread (was ± 0.0)


def test_variant_models_switch_exactly_one_component():
    base = {"preset": "tiny"}
    cfgs = {v: config_from_dict(variant_model(base, on)) for v, on in VARIANTS.items()}
    cobra = cfgs["cobra-like"]
    assert cobra.mff.mode == "none" and cobra.vision.taps == [-2]
    assert not cobra.instruction.enabled and not cobra.align.enabled
    full = cfgs["all (EMMA)"]
    assert full.mff.mode == "weighted" and full.vision.taps == [0, 1] and full.instruction.enabled and full.align.enabled
    assert cfgs["+MFF"].vision.taps == [0, 1] and not cfgs["+MFF"].instruction.enabled
    assert cfgs["+align"].align.enabled and cfgs["+align"].mff.mode == "none"
    assert cfgs["+instruction"].instruction.enabled and not cfgs["+instruction"].align.enabled
    # everything else (LM, projector, ViT) is the same in every variant
    for c in cfgs.values():
        assert c.lm == cobra.lm and c.projector == cobra.projector and c.vision.open_clip_overrides == \
            cobra.vision.open_clip_overrides


def test_variant_stage_overrides_drop_absent_modules():
    stage = {"train": {"trainable": ["mff", "instruction", "projector", "lm", "align_head"], "lr": 1e-3}}
    cobra = stage_overrides_for(stage, VARIANTS["cobra-like"])
    assert cobra["train"] == {"trainable": ["mff", "projector", "lm"], "lr": 1e-3}
    assert stage_overrides_for(stage, VARIANTS["all (EMMA)"]) == stage
    assert stage_overrides_for(stage, VARIANTS["+instruction"])["train"]["trainable"] == \
        ["mff", "instruction", "projector", "lm"]
    assert stage_overrides_for({"data": {"max_length": 64}}, VARIANTS["cobra-like"]) == {"data": {"max_length": 64}}
    assert stage["train"]["trainable"][1] == "instruction"  # the recipe itself is left alone


def test_ablate_two_variants_in_two_worker_processes(tmp_path, capsys):
    from emma_mamba.cli import main
    res = tmp_path / "ablation.json"
    argv = ["ablate", "--config", "quickstart_fast", "--seeds", "0", "--variants",
            "cobra-like", "all (EMMA)", "--out", str(tmp_path / "runs"), "--results", str(res), "--plot", "",
            "--jobs", "2"]
    assert main(argv) == 0
    doc = json.loads(res.read_text())
    assert set(doc["summary"]) == {"cobra-like", "all (EMMA)"} and doc["jobs"] == 2
    from emma_mamba import ops

    assert doc["device"] == "cpu" and doc["backend"] == ops.get_backend("cpu")
    runs = {r["variant"]: r for rs in doc["runs"].values() for r in rs}
    # one stage-0 CLIP for the seed, shared by both variants
    assert runs["cobra-like"]["clip_checkpoint"] == runs["all (EMMA)"]["clip_checkpoint"]
    assert Path(runs["cobra-like"]["clip_checkpoint"]).is_file()
    for r in runs.values():  # the summary is the runs' own metrics
        assert doc["summary"][r["variant"]]["stats"]["POPE-rand acc"]["mean"] == r["metrics"]["pope_random"]["accuracy"]
    # a rerun finds every run done and trains nothing
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done earlier") == 2
    # resuming with a recipe whose data differ is refused, naming the key (not silently reusing the old data)
    import yaml

    from emma_mamba.ablation import run_ablation

    from emma_mamba.config import shipped_configs

    recipe = yaml.safe_load(shipped_configs()["quickstart_fast"].read_text())
    recipe["data"]["question_mix"] = {"existence": 1}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"different ShapesWorld \(question_mix: \{'existence': 4\} there"):
        run_ablation(changed, tmp_path / "runs", seeds=[0], variants=["cobra-like"], results=tmp_path / "x.json",
                     plot_path=None)


def test_ablate_never_deletes_a_data_folder_it_did_not_write(tmp_path, capsys, monkeypatch):
    """`ablate --out DIR` with a folder DIR/data of the user's (`--out .` in a project): it was deleted and replaced
    by ShapesWorld, exit 0. Refused now, nothing touched; a data folder this command began (its marker beside it,
    an interrupted ablation) is still replaced."""
    import emma_mamba.quickstart as qs
    from emma_mamba.ablation import PARTIAL_DATA_MARKER
    from emma_mamba.cli import main

    proj = tmp_path / "proj"
    (proj / "data" / "precious").mkdir(parents=True)
    (proj / "data" / "precious" / "labels.json").write_text("[1, 2, 3]")
    argv = ["ablate", "--config", "quickstart_fast", "--seeds", "0", "--variants", "cobra-like", "--out", str(proj),
            "--results", str(tmp_path / "r.json"), "--plot", ""]
    assert main(argv) == 2
    assert "holds files that no ablation wrote" in capsys.readouterr().err
    assert (proj / "data" / "precious" / "labels.json").read_text() == "[1, 2, 3]"
    # an interrupted ablation's own partial data: replaced (make_data stopped here: the folder was emptied first)
    (proj / PARTIAL_DATA_MARKER).write_text("")
    seen = []

    def stop(qc, data_dir, seed, blind_dir):
        seen.append(data_dir.exists())
        raise ValueError("stopped here")

    monkeypatch.setattr(qs, "make_data", stop)
    assert main(argv) == 2 and seen == [False]
    assert "stopped here" in capsys.readouterr().err


def test_ablate_refuses_a_seed_or_variant_given_twice(tmp_path, capsys):
    """`--seeds 0 0 1` would train seed 0 twice into the same folder and count it twice: n_seeds 3 and a standard
    deviation over a repeated value (aggregate([a, a, b]) is not the ddof=1 spread of seeds 0 and 1). Refused up
    front, naming the repeat, before any data or run is made."""
    from emma_mamba.cli import main

    out = tmp_path / "runs"
    base = ["ablate", "--config", "configs/quickstart_fast.yaml", "--out", str(out), "--results",
            str(tmp_path / "r.json"), "--plot", ""]
    assert main(base + ["--seeds", "0", "0", "1", "--variants", "cobra-like"]) == 2
    assert "--seeds: 0 is given twice" in capsys.readouterr().err
    assert main(base + ["--seeds", "0", "--variants", "+MFF", "cobra-like", "+MFF"]) == 2
    assert "--variants: '+MFF' is given twice" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.json").exists()
