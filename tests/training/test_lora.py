"""Training with ``train.lora``: only the adapters of the LM (and the other trained modules) move, the run writes
plain merged models whose logits are the adapted model's, a LoRA run resumes bit for bit, and a checkpoint that
does not match the run's adapters or base weights is refused."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import emma_mamba
from emma_mamba.config import ConfigError
from emma_mamba.models.lora import LORA_FILE, lora_modules
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg

LORA = {"lora": {"r": 4, "alpha": 8, "targets": ["in_proj", "x_proj", "out_proj"]}}


def _lora_cfg(shapes, out, **sections):
    train = {**LORA, **sections.pop("train", {})}
    return make_cfg(shapes, out, train=train, **sections)


def test_lora_run_trains_the_adapters_and_writes_a_plain_merged_model(shapes, tmp_path):
    t = Trainer(_lora_cfg(shapes, tmp_path / "run", train={"max_steps": 3}))
    lm = t.model.lm
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if "lora_" not in n}
    others = {n: p.detach().clone() for n, p in t.model.named_parameters() if n.startswith("projector.")}
    names = [n for g in t.optimizer.param_groups for n in g["names"]]
    lm_names = [n for n in names if n.startswith("lm.")]
    assert lm_names and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in lm_names)
    assert len(lm_names) == 2 * 3 * lm.config.n_layer
    assert any(n.startswith("projector.") for n in names)
    t.fit()
    # the LM's own weights did not move; its adapters and the projector did
    assert all(torch.equal(p, frozen[n]) for n, p in lm.named_parameters() if "lora_" not in n)
    assert all(m.lora_B.abs().max() > 0 for m in lora_modules(lm).values())
    assert not all(torch.equal(t.model.get_parameter(n), v) for n, v in others.items())
    # the final model is a plain model: loads without any LoRA setting, logits = the adapted model's
    out = tmp_path / "run"
    plain = emma_mamba.load(out)
    assert not lora_modules(plain)
    ids = torch.randint(0, lm.config.vocab_size, (2, 10))
    t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.lm(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)
    # the adapters are written beside it, with their settings
    adapters = load_file(str(out / LORA_FILE))
    assert set(adapters) == {f"lm.{n}.lora_{x}" for n in lora_modules(lm) for x in "AB"}
    with safe_open(str(out / LORA_FILE), framework="pt") as f:
        assert f.metadata()["r"] == "4" and f.metadata()["alpha"] == "8"
        assert f.metadata()["targets"] == "in_proj,out_proj,x_proj"


def test_lora_resume_equals_uninterrupted_run_bitwise(shapes, tmp_path):
    kw = dict(train={"max_steps": 4}, checkpoint={"every_steps": 2})
    a = Trainer(_lora_cfg(shapes, tmp_path / "a", **kw)).fit()
    Trainer(_lora_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=3)
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000002"
    assert (ckpt / LORA_FILE).is_file()
    emma_mamba.load(ckpt)  # a step checkpoint is a plain model too (eval of intermediate checkpoints)
    rest = Trainer(_lora_cfg(shapes, tmp_path / "b", **kw), resume="auto").fit()
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in rest] == [m[key] for m in a[2:]], key
    wa, wb = (load_file(str(tmp_path / d / LORA_FILE)) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # resuming that checkpoint from other base weights (here: another random init, as other pretrained files would
    # give; train.seed itself cannot change on resume) is refused
    from emma_mamba.training import trainer as trainer_mod

    seed_everything = trainer_mod._seed_everything
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "_seed_everything", lambda seed: seed_everything(seed + 1))
        with pytest.raises(RuntimeError, match="other base weights"):
            Trainer(_lora_cfg(shapes, tmp_path / "c", train={"max_steps": 4}), resume=str(ckpt))
    # ... and so is resuming it without the adapters, or with another rank
    with pytest.raises(RuntimeError, match="written by a run with train.lora"):
        Trainer(make_cfg(shapes, tmp_path / "d", train={"max_steps": 4}), resume=str(ckpt))
    with pytest.raises(ConfigError, match=r"train.lora.r 4 there, 2 here"):
        Trainer(_lora_cfg(shapes, tmp_path / "e", train={"max_steps": 4, "lora": {"r": 2}}), resume=str(ckpt))
    plain_ckpt = tmp_path / "p"
    Trainer(make_cfg(shapes, plain_ckpt, train={"max_steps": 1}, checkpoint={"every_steps": 1})).fit()
    with pytest.raises(RuntimeError, match="not written by a run with train.lora"):
        Trainer(_lora_cfg(shapes, tmp_path / "f"), resume=str(plain_ckpt / "checkpoints" / "step_00000001"))


def test_lora_sharded_checkpoint_resumes_bitwise_and_loads_merged(shapes, tmp_path):
    """checkpoint.format sharded with adapters (on a bf16 base): the state holds base weights and adapters apart;
    emma_mamba.load merges them into the full layout's weights bit for bit; the resume is the uninterrupted
    run's; a run without the adapters is refused."""
    train = {"max_steps": 3, "lora": {**LORA["lora"], "base_dtype": "bf16"}}
    a = Trainer(_lora_cfg(shapes, tmp_path / "a", train=train, checkpoint={"every_steps": 2})).fit()
    skw = dict(train=train, checkpoint={"every_steps": 2, "format": "sharded"})
    Trainer(_lora_cfg(shapes, tmp_path / "b", **skw)).fit(stop_after=2)
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000002"
    assert not (ckpt / LORA_FILE).exists()
    want = emma_mamba.load(tmp_path / "a" / "checkpoints" / "step_00000002").state_dict()
    got = emma_mamba.load(ckpt).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    rest = Trainer(_lora_cfg(shapes, tmp_path / "b", **skw), resume="auto").fit()
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in rest] == [m[key] for m in a[2:]], key
    wa, wb = (load_file(str(tmp_path / d / LORA_FILE)) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(RuntimeError, match="written by a run with train.lora"):
        Trainer(make_cfg(shapes, tmp_path / "d", train={"max_steps": 3}), resume=str(ckpt))


def test_lora_from_init_from_keeps_the_stage1_lm(shapes, tmp_path):
    """Stage 2 with LoRA from a stage-1 model: the LM under the adapters is the stage-1 model's."""
    Trainer(make_cfg(shapes, tmp_path / "s1", stage="pretrain", train={"max_steps": 1})).fit()
    s1 = emma_mamba.load(tmp_path / "s1")
    cfg = _lora_cfg(shapes, tmp_path / "s2", model=None, init_from=str(tmp_path / "s1"))
    t = Trainer(cfg)
    t.fit()
    for n, m in lora_modules(t.model.lm).items():
        assert torch.equal(m.weight, s1.lm.get_submodule(n).weight)


@pytest.mark.parametrize("train,stage,match", [
    ({"lora": {"r": -1}}, "finetune", "train.lora.r must be >= 0"),
    ({"lora": {"r": 4, "alpha": 0}}, "finetune", "train.lora.alpha must be > 0"),
    ({"lora": {"r": 4, "targets": ["conv1d"]}}, "finetune", "train.lora.targets must be a non-empty list"),
    ({"lora": {"r": 4, "targets": []}}, "finetune", "train.lora.targets must be a non-empty list"),
    ({"lora": {"r": 4}}, "pretrain", "train.lora adapts the LM, which this run does not train"),
    ({"lora": {"r": 4}, "trainable": ["projector"]}, "finetune", "does not train"),
    ({"lora": {"rank": 4}}, "finetune", "unknown config key 'rank' at 'train.lora.rank'"),
    ({"lora": {"r": 4, "dropout": 0.05}}, "finetune", "x_proj adapters are merged into the fused mixer op"),
    ({"lora": {"r": 4, "dropout": 1.0, "targets": ["in_proj"]}}, "finetune", r"dropout must be in \[0, 1\)"),
])
def test_bad_lora_settings(shapes, tmp_path, train, stage, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(shapes, tmp_path, stage=stage, train=train)


MAMBA2 = {"preset": "tiny", "lm": {"ssm_layer": "mamba2", "headdim": 16}}


@pytest.mark.parametrize("model,want", [("tiny", ["in_proj", "x_proj", "out_proj"]), (MAMBA2, ["in_proj", "out_proj"])],
                         ids=["mamba1", "mamba2"])
def test_the_default_lora_targets_follow_the_lm(shapes, tmp_path, model, want):
    """train.lora without targets on a Mamba-2 LM was refused when the run built its model (the one default
    named x_proj, which a Mamba-2 mixer lacks). The default is the LM's own: resolved when the config is read (the
    written train_config.yaml says which), and the run adapts those projections."""
    cfg = make_cfg(shapes, tmp_path / "run", model=model, train={"lora": {"r": 4, "alpha": 8}})
    assert cfg.train.lora.targets == want
    t = Trainer(cfg)
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(t.model.lm)}) == sorted(want)
    assert make_cfg(shapes, tmp_path / "off", model=model).train.lora.targets is None  # r 0: no adapters


def test_lora_targets_a_mamba2_lm_lacks_are_refused_when_the_config_is_read(shapes, tmp_path):
    with pytest.raises(ConfigError, match=r"test: train\.lora\.targets \['in_proj', 'x_proj', 'out_proj'\] names "
                                          r"x_proj, which the LM's mamba2 mixer \(model\.lm\.ssm_layer\) lacks; "
                                          r"its projections are in_proj, out_proj \(null: the default, in_proj, "
                                          r"out_proj\)"):
        make_cfg(shapes, tmp_path, model=MAMBA2, train=LORA)
    with pytest.raises(ConfigError, match=r"names x_proj, dt_proj, which the LM's mamba2 mixer"):
        make_cfg(shapes, tmp_path, model=MAMBA2, train={"lora": {"r": 4, "targets": ["x_proj", "dt_proj"]}})


def test_info_counts_what_a_lora_run_trains(shapes, tmp_path):
    """`emma-mamba info --lora R`: the adapters by hand from the LM's shapes, and stage 2's trainable count
    equal to the parameters a LoRA run's optimizer holds."""
    from emma_mamba.info import report

    cfg = _lora_cfg(shapes, tmp_path / "run")
    rep = report(cfg.model, 4, ["in_proj", "x_proj", "out_proj"])["lora"]
    c = cfg.model.lm
    d = c.d_model
    di, rank = c.expand * d, (math.ceil(d / 16) if c.dt_rank == "auto" else c.dt_rank)
    per_layer = 4 * (d + 2 * di) + 4 * (di + rank + 2 * c.d_state) + 4 * (di + d)
    assert rep["adapter_params"] == c.n_layer * per_layer
    t = Trainer(cfg)
    assert rep["finetune"] == sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])
    # with the embedding trained too (tied head: counted once)
    emb = report(cfg.model, 4, ["in_proj", "x_proj", "out_proj"], True)["lora"]
    assert emb["embedding_params"] == t.model.lm.embeddings.weight.numel()
    t2 = Trainer(_lora_cfg(shapes, tmp_path / "run2", train={"lora": {**LORA["lora"], "train_embeddings": True}}))
    assert emb["finetune"] == sum(p.numel() for g in t2.optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("extra", [{"gradient_checkpointing": True},
                                   {"compile": True, "compile_backend": "aot_eager"}],
                         ids=["checkpointing", "compiled"])
def test_lora_under_block_checkpointing_and_compiled_blocks(shapes, tmp_path, extra):
    """The merged weights are recomputed inside a checkpointed block and traced inside a compiled one: the
    losses and gradient norms of the eager LoRA run."""
    ref = Trainer(_lora_cfg(shapes, tmp_path / "ref", train={"max_steps": 3})).fit()
    got = Trainer(_lora_cfg(shapes, tmp_path / "x", train={"max_steps": 3, **extra})).fit()
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in ref], rel=1e-5), key


def test_lora_with_a_bf16_base(shapes, tmp_path):
    """train.lora.base_dtype bf16: the adapted weights are held in bf16 (half the frozen LM's memory), the merge
    is computed and written in fp32 (a bf16 merge would round the adapter away), and the run resumes exactly."""
    kw = dict(train={"max_steps": 4, "lora": {"r": 4, "alpha": 8, "base_dtype": "bf16"}},
              checkpoint={"every_steps": 2})
    t = Trainer(make_cfg(shapes, tmp_path / "a", **kw))
    mods = lora_modules(t.model.lm)
    assert all(m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32 for m in mods.values())
    a = t.fit()
    assert all(math.isfinite(m["loss"]) for m in a)
    plain = emma_mamba.load(tmp_path / "a")
    ids = torch.randint(0, t.model.lm.config.vocab_size, (2, 10))
    t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.lm(ids).logits, t.model.lm(ids).logits, rtol=1e-5, atol=1e-5)
    for name, m in mods.items():  # the merge in fp32: W (bf16) + s B A, not rounded back to bf16
        w = plain.lm.get_submodule(name).weight
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, m.weight.float() + m.scaling * (m.lora_B @ m.lora_A), rtol=0, atol=1e-6)
    Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=3)
    rest = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto").fit()
    assert [m["loss"] for m in rest] == [m["loss"] for m in a[2:]]


def test_lora_with_trained_embeddings(shapes, tmp_path):
    """train.lora.train_embeddings: the token embedding (the tied head) trains fully beside the adapters, the
    rest of the LM stays frozen; the written model carries the trained embedding and resumes exactly."""
    kw = dict(train={"max_steps": 4, "lora": {"r": 4, "train_embeddings": True}}, checkpoint={"every_steps": 2})
    t = Trainer(make_cfg(shapes, tmp_path / "a", **kw))
    lm = t.model.lm
    names = {n for g in t.optimizer.param_groups for n in g["names"] if n.startswith("lm.")}
    assert "lm.embeddings.weight" in names
    assert all(n == "lm.embeddings.weight" or n.endswith(("lora_A", "lora_B")) for n in names)
    before = lm.embeddings.weight.detach().clone()
    norm = lm.norm_f.weight.detach().clone()
    a = t.fit()
    assert not torch.equal(lm.embeddings.weight, before) and torch.equal(lm.norm_f.weight, norm)
    assert torch.equal(emma_mamba.load(tmp_path / "a").lm.embeddings.weight, lm.embeddings.weight)
    Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=3)
    rest = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto").fit()
    assert [m["loss"] for m in rest] == [m["loss"] for m in a[2:]]


def test_lora_dropout_run_resumes_bitwise(shapes, tmp_path):
    """train.lora.dropout on in_proj and out_proj: the run's losses differ from the same run without dropout, and
    a resumed run (the random state restored with the checkpoint) equals the uninterrupted one bit for bit."""
    lo = {"lora": {"r": 4, "alpha": 8, "targets": ["in_proj", "out_proj"], "dropout": 0.2}}
    kw = dict(train={**lo, "max_steps": 4}, checkpoint={"every_steps": 2})
    a = Trainer(make_cfg(shapes, tmp_path / "a", **kw)).fit()
    nodrop = {**kw, "train": {**kw["train"], "lora": {**lo["lora"], "dropout": 0.0}}}
    c = Trainer(make_cfg(shapes, tmp_path / "c", **nodrop)).fit()
    assert [m["loss"] for m in a][0] == pytest.approx(c[0]["loss"], rel=0.2)  # same model, other noise
    assert [m["loss"] for m in a] != [m["loss"] for m in c]
    Trainer(make_cfg(shapes, tmp_path / "b", **kw)).fit(stop_after=3)
    rest = Trainer(make_cfg(shapes, tmp_path / "b", **kw), resume="auto").fit()
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in rest] == [m[key] for m in a[2:]], key
