"""`emma-mamba export`: the exported weights are the checkpoint's (or their half-precision rounding, the SSM
parameters kept fp32), the alignment head is left out unless asked for, the LM alone loads in transformers'
MambaForCausalLM with our logits and tokenizer, and nothing is overwritten."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import emma_mamba
from emma_mamba.cli import main
from emma_mamba.config import get_preset
from emma_mamba.export import KEEP_FP32
from emma_mamba.models.vlm import EmmaMamba


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    EmmaMamba(get_preset("tiny"), for_training=True).save(d)  # with the alignment head's weights
    return d


def _dtypes(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_export_keeps_the_weights_and_drops_the_alignment_head(ckpt, tmp_path, capsys):
    want = emma_mamba.load(ckpt, for_training=True).state_dict()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert not any(k.startswith("align_head.") for k in _dtypes(tmp_path / "a" / "model.safetensors"))
    got = emma_mamba.load(tmp_path / "a").state_dict()
    assert got.keys() == {k for k in want if not k.startswith("align_head.")}
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--keep-align-head"]) == 0
    got = emma_mamba.load(tmp_path / "b", for_training=True).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_half_precision_export_rounds_all_but_the_ssm_parameters(ckpt, tmp_path):
    want = emma_mamba.load(ckpt).state_dict()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "h"), "--dtype", "bf16"]) == 0
    stored = _dtypes(tmp_path / "h" / "model.safetensors")
    kept = [k for k in stored if k.endswith(KEEP_FP32)]
    assert kept and any(k.endswith("A_log") for k in kept)
    assert all(stored[k] == ("F32" if k.endswith(KEEP_FP32) else "BF16") for k in stored if want[k].is_floating_point())
    got = emma_mamba.load(tmp_path / "h").state_dict()
    for k, v in got.items():
        assert v.dtype == want[k].dtype  # cast back to the model's dtype on load
        ref = want[k] if k.endswith(KEEP_FP32) or not v.is_floating_point() else want[k].bfloat16().float()
        assert torch.equal(v, ref), k
    full = (ckpt / "model.safetensors").stat().st_size
    assert (tmp_path / "h" / "model.safetensors").stat().st_size < 0.6 * full


def test_the_lm_alone_loads_in_transformers_with_our_logits_and_tokenizer(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = emma_mamba.load(ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "lm"), "--lm-only"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert type(hf).__name__ == "MambaForCausalLM"
    ids = torch.randint(0, model.lm.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.lm(ids).logits, rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    text = "What is in the image? <image> A red circle."
    assert tok(text)["input_ids"] == model.tokenizer.encode(text)
    assert tok.eos_token_id == hf.config.eos_token_id == model.tokenizer.eos_token_id
    # in bf16: the SSM parameters kept fp32, the rest rounded; transformers reads it as a bf16 model
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "lm16"), "--lm-only",
                 "--dtype", "bf16"]) == 0
    stored = _dtypes(tmp_path / "lm16" / "model.safetensors")
    assert all(v == ("F32" if k.endswith(KEEP_FP32) else "BF16") for k, v in stored.items())
    assert any(k.endswith("A_log") for k in stored)
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "lm16")
    assert hf16.config.dtype == torch.bfloat16
    want = model.lm.state_dict()["embeddings.weight"].bfloat16()
    assert torch.equal(hf16.get_input_embeddings().weight.detach().to(torch.bfloat16), want)


def test_export_errors(ckpt, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "full")]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    emma_mamba.load(ckpt).save(tmp_path / "inference")  # saved for inference: no alignment head
    assert main(["export", "--checkpoint", str(tmp_path / "inference"), "--out", str(tmp_path / "x"),
                 "--keep-align-head"]) == 2
    assert "holds no alignment-head weights" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "missing" in capsys.readouterr().err
    big = emma_mamba.load(ckpt)
    with torch.no_grad():
        big.projector.mlp[0].weight.mul_(1e6)  # beyond fp16's 65504
    big.save(tmp_path / "big")
    assert main(["export", "--checkpoint", str(tmp_path / "big"), "--out", str(tmp_path / "z"), "--dtype", "fp16"]) == 2
    assert "1 tensors overflow fp16 (projector.mlp.0.weight); use --dtype bf16 or fp32" in capsys.readouterr().err
    assert not any((tmp_path / "z").iterdir())  # nothing written


def test_a_checkpoint_with_part_of_the_alignment_head_or_an_integer_weight_is_refused(ckpt, tmp_path):
    """A head with one tensor missing loaded 23 tensors from the file and one from its initialisation, saying the
    folder held no head weights; an int64 weight was cast to float. Both are refused, naming the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from emma_mamba.config import ConfigError

    def edited(name, change):
        d = tmp_path / name
        shutil.copytree(ckpt, d)
        sd = load_file(d / "model.safetensors")
        change(sd)
        save_file(sd, d / "model.safetensors")
        return d

    head = sorted(k for k in load_file(ckpt / "model.safetensors") if k.startswith("align_head."))
    assert len(head) > 2
    part = edited("part", lambda sd: sd.pop(head[1]))
    with pytest.raises(ConfigError, match=rf"missing \[{head[1]!r}\]"):
        emma_mamba.load(part, for_training=True)
    emma_mamba.load(part)  # for inference the head is not read: loads
    none = edited("none", lambda sd: [sd.pop(k) for k in head])  # no head at all: initialised, as before
    assert emma_mamba.load(none, for_training=True).align_head is not None
    ints = edited("ints", lambda sd: sd.__setitem__("lm.norm_f.weight", torch.ones_like(sd["lm.norm_f.weight"],
                                                                                       dtype=torch.int64)))
    with pytest.raises(ConfigError, match=r"lm\.norm_f\.weight has dtype torch\.int64, the model's is torch\.float32"):
        emma_mamba.load(ints)


def test_written_weight_files_get_the_default_file_mode(tmp_path):
    """safetensors writes 0600 whatever the umask; a model meant to be shared is readable as any new file is."""
    import os

    from emma_mamba.fileio import default_file_mode, save_safetensors
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
        MambaLM(MambaConfig.from_preset("tiny")).save_pretrained(tmp_path / "lm")
        for f in (tmp_path / "w.safetensors", tmp_path / "lm" / "model.safetensors"):
            assert os.stat(f).st_mode & 0o777 == 0o644, f
    finally:
        os.umask(old)


def test_write_whole_leaves_no_temporary_file_and_two_writers_of_one_path_do_not_share_one(tmp_path):
    """write_whole's temporary file was named by the process id: two threads writing one path wrote into the same
    temporary file (one's rename then moved the other's half-written bytes, or failed), and the name could be
    guessed (a link put there in a shared folder was written through). Each call has its own (mkstemp)."""
    import threading
    import time

    from emma_mamba.fileio import write_whole

    target = tmp_path / "out.json"
    errors, seen = [], []

    def writer(text):
        def write(tmp):
            seen.append(tmp.name)
            with open(tmp, "w") as f:
                for ch in text:  # slowly, so that the two writes overlap
                    f.write(ch)
                    f.flush()
                    time.sleep(0.002)
        try:
            write_whole(target, write)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c * 40,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(seen)) == 2
    assert target.read_text() in ("a" * 40, "b" * 40)
    with pytest.raises(RuntimeError):
        write_whole(target, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("fail"))))
    assert target.read_text() in ("a" * 40, "b" * 40) and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_the_model_card_says_what_the_files_and_the_run_record_say(ckpt, tmp_path):
    """README.md: each part's parameter count (counted here from the loaded modules), the storage dtype, and the
    run's stage, data, optimisation and last losses read from a run directory written by hand; a step
    checkpoint's card stops at its step; a metrics line cut by a crash is passed over."""
    import json
    import shutil

    import yaml

    from emma_mamba.info import _fmt

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000020"
    shutil.copytree(ckpt, step)
    (run / "train_config.yaml").write_text(yaml.safe_dump({
        "stage": "finetune", "init_from": "runs/stage1",
        "data": {"json": "/data/llava_v1_5_mix665k.json", "max_length": 2048, "packing": True},
        "train": {"lr": 2e-5, "schedule": "cosine", "global_batch_size": 128, "weight_decay": 0.0}}))
    rows = [{"step": 10, "loss": 2.5, "lm_loss": 2.25, "total_tokens": 1000},
            {"step": 20, "loss": 1.5, "lm_loss": 1.25, "total_tokens": 2000},
            {"step": 20, "val_loss": 1.75, "val_token_acc": 0.5},
            {"step": 30, "loss": 0.5, "lm_loss": 0.25, "total_tokens": 3000}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "lo')
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "card"), "--dtype", "bf16"]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: emma-mamba\npipeline_tag: image-text-to-text\n")
    assert "weights stored as bf16 (the SSM's A_log, D and dt bias in fp32)" in card
    model = emma_mamba.load(ckpt)
    numel = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
    for part, module in (("lm", model.lm), ("projector", model.projector), ("mff", model.mff)):
        line = next(x for x in card.splitlines() if x.startswith(f"| {part} |"))
        assert line.endswith(f"| {_fmt(numel(module))} |"), line
    assert "| align_head |" not in card and "The alignment head, a training-time loss, is not included." in card
    assert "- stage: `finetune`, from `runs/stage1`" in card
    assert "- data: `llava_v1_5_mix665k.json`; max_length 2048, packing True" in card
    assert "lr 2e-05 (cosine), global batch 128" in card
    assert "trained 20 steps (2000 tokens); last logged loss 1.5 (lm 1.25)" in card  # not step 30's
    assert "validation at step 20: loss 1.75, token accuracy 0.5" in card
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bare"), "--lm-only"]) == 0
    card = (tmp_path / "bare" / "README.md").read_text()
    assert "library_name: transformers" in card and "No training record" in card
    assert f"{_fmt(numel(model.lm))} parameters" in card


@pytest.mark.parametrize("keep", [0, 1000, "half"])
def test_a_cut_weight_file_is_named_not_a_traceback(ckpt, tmp_path, capsys, keep):
    """model.safetensors cut short (empty, inside its header, inside its data): export, generate and eval name
    the file and say it is incomplete, exit 2, no traceback."""
    import shutil

    from PIL import Image

    bad = tmp_path / "cut"
    shutil.copytree(ckpt, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2 if keep == "half" else keep])
    Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "im.png")
    commands = [["export", "--checkpoint", str(bad), "--out", str(tmp_path / "out")],
                ["generate", "--checkpoint", str(bad), "--image", str(tmp_path / "im.png"), "--prompt", "hi"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{f}: not a readable safetensors file" in err and "incomplete or corrupt" in err, err
        assert "Traceback" not in err


def test_a_step_checkpoint_holding_its_own_train_config_still_reads_the_runs_metrics(ckpt, tmp_path):
    """The trainer writes train_config.yaml into every step checkpoint too (emma_mamba.training.checkpoint), while
    metrics.jsonl lives in the run directory above it: the card still says the run's steps and losses up to the
    checkpoint's step (the hand-written rows below), not nothing."""
    import json
    import shutil

    import yaml

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000020"
    shutil.copytree(ckpt, step)
    cfg = yaml.safe_dump({"stage": "finetune", "train": {"lr": 1e-3}})
    (run / "train_config.yaml").write_text(cfg)
    (step / "train_config.yaml").write_text(cfg)  # as save_checkpoint writes it
    rows = [{"step": 10, "loss": 2.5, "total_tokens": 1000}, {"step": 20, "loss": 1.5, "total_tokens": 2000},
            {"step": 20, "val_loss": 1.75}, {"step": 30, "loss": 0.5, "total_tokens": 3000}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert "- stage: `finetune`" in card
    assert "trained 20 steps (2000 tokens); last logged loss 1.5" in card  # not step 30's
    assert "validation at step 20: loss 1.75" in card


def test_lm_only_half_precision_export_refuses_an_overflowing_weight(tmp_path, capsys):
    """--lm-only --dtype fp16 refuses a weight fp16 cannot hold, by name, as the full export does (not a file of
    inf weights)."""
    torch.manual_seed(0)
    model = EmmaMamba(get_preset("tiny"), for_training=False)
    with torch.no_grad():
        model.lm.layers[0].mixer.out_proj.weight[0, 0] = 1e6  # beyond fp16's 65504
    model.save(tmp_path / "big")
    for extra in ([], ["--lm-only"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["export", "--checkpoint", str(tmp_path / "big"), "--out", str(out), "--dtype", "fp16",
                     *extra]) == 2
        err = capsys.readouterr().err
        assert "overflow fp16" in err and "layers.0.mixer.out_proj.weight" in err, err
        assert not (out / "model.safetensors").exists()


def test_lm_only_leaves_out_a_placeholder_past_the_lms_rows(tmp_path, capsys):
    """An LM of exactly the tokenizer's 50277 rows (no padding): the VLM's <image> placeholder has id 50277, no
    embedding row of the exported LM; transformers' forward on any text holding "<image>" indexed out of range.
    The exported tokenizer leaves it out (its text tokenised as words) and says so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = get_preset("tiny")
    cfg.lm.vocab_size, cfg.lm.pad_vocab_size_multiple = 50277, 1
    torch.manual_seed(0)
    model = EmmaMamba(cfg.validate(), for_training=False)
    assert model.image_token_id == 50277 and model.lm.embeddings.weight.shape[0] == 50277
    model.save(tmp_path / "m")
    assert main(["export", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "lm"), "--lm-only"]) == 0
    err = capsys.readouterr().err
    assert "left <image> out of the tokenizer: the LM's 50277 embedding rows have none for it" in err
    hf, tok = AutoModelForCausalLM.from_pretrained(tmp_path / "lm"), AutoTokenizer.from_pretrained(tmp_path / "lm")
    ids = tok("Describe <image> please", return_tensors="pt").input_ids
    assert int(ids.max()) < 50277 and len(tok) == 50277
    from emma_mamba.models.tokenizer import load_tokenizer

    assert ids[0].tolist() == load_tokenizer().encode("Describe <image> please")  # GPT-NeoX's own, no placeholder
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.lm(ids).logits, rtol=1e-4, atol=1e-4)
