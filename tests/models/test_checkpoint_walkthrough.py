"""Loading public-layout Mamba checkpoints as a researcher would (a walkthrough): folders built here with random
weights under the real files' names, shapes, config fields and dtypes, read by ``MambaLM.from_pretrained``,
``emma-mamba generate --lm`` and ``emma-mamba export``. The oracle is transformers' model on the same folder
(fp32, CPU). Each test names the defect it guards against.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from emma_mamba import ops
from emma_mamba.cli import main
from emma_mamba.models.mamba import CheckpointError, MambaLM

transformers = pytest.importorskip("transformers")

transformers.logging.set_verbosity_error()


def _hf_mamba(seed=0, scale=0.1, **kw):
    """A random transformers Mamba whose every parameter is perturbed."""
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _logits(model, ids):
    with torch.no_grad(), ops.use_backend("torch"):
        return model(ids).logits.float()


def _assert_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# the fields mamba-ssm's config carries that the state-spaces/mamba-*-hf config.json files hold beside
# transformers' own (state-spaces/mamba-130m-hf: "d_model": 768, "n_layer": 24, "ssm_cfg": {}, "d_inner": 1536,
# "pad_vocab_size_multiple": 8, "rms_norm": true, "fused_add_norm": true); transformers keeps them as extra
# attributes, so every model saved from one of those checkpoints carries them too
LEGACY = dict(ssm_cfg={}, pad_vocab_size_multiple=8, rms_norm=True, fused_add_norm=True)


@pytest.mark.parametrize("kw", [
    # shapes the legacy fields would change: vocabulary not a multiple of 8, d_state 8 (ssm_cfg {} = 16), untied
    dict(vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=2, tie_word_embeddings=False),
    # every shape the legacy fields agree with, but an epsilon only transformers' field holds: silently other logits
    dict(vocab_size=96, hidden_size=32, state_size=16, num_hidden_layers=2, layer_norm_epsilon=0.5),
], ids=["shapes", "silent-epsilon"])
def test_a_hf_config_carrying_mamba_ssm_fields_reads_as_transformers_reads_it(tmp_path, kw):
    """Defect: config.json holding ``d_model`` was read as the state-spaces layout even when it is a transformers
    config (the real ``*-hf`` files hold both), ignoring hidden_size / state_size / layer_norm_epsilon /
    tie_word_embeddings: a refused tied head, a shape error, or other logits without a word."""
    hf = _hf_mamba(**kw, d_model=kw["hidden_size"], n_layer=kw["num_hidden_layers"],
                   d_inner=2 * kw["hidden_size"], **LEGACY)
    hf.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert {"d_model", "n_layer", "ssm_cfg", "hidden_size"} <= set(conf)
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    lm = MambaLM.from_pretrained(tmp_path).eval()
    assert lm.checkpoint_layout == "hf"
    assert lm.config.rms_norm_eps == kw.get("layer_norm_epsilon", 1e-5)
    ids = torch.randint(0, kw["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))
    ref = _logits(theirs, ids)
    _assert_close(_logits(lm, ids), ref)
    _assert_close(ref, _logits(hf, ids))


def test_a_folder_with_a_stale_shard_index_reads_the_file_transformers_reads(tmp_path):
    """Defect: with model.safetensors and a model.safetensors.index.json (a stale sharded save) in one folder we
    read the shards, transformers model.safetensors: other weights than the oracle's, without a word."""
    base = dict(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2)
    new, old = _hf_mamba(seed=0, **base), _hf_mamba(seed=1, **base)
    old.save_pretrained(tmp_path / "old", max_shard_size="8KB")
    new.save_pretrained(tmp_path / "d")
    for f in (tmp_path / "old").glob("model*.safetensors*"):
        shutil.copy(f, tmp_path / "d")
    assert (tmp_path / "d" / "model.safetensors").is_file()
    assert (tmp_path / "d" / "model.safetensors.index.json").is_file()
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path / "d").eval()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = _logits(theirs, ids)
    _assert_close(ref, _logits(new, ids))  # transformers read model.safetensors
    _assert_close(_logits(MambaLM.from_pretrained(tmp_path / "d").eval(), ids), ref)


def test_malformed_shard_indexes_and_weight_paths_are_named(tmp_path):
    """Defect: a shard index whose weight_map is not an object of file names raised AttributeError / TypeError
    from inside the reader; a weight name that is a directory read as "no weights found" while listing it."""
    hf = _hf_mamba(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)
    d = tmp_path / "sh"
    hf.save_pretrained(d, max_shard_size="8KB")
    index = d / "model.safetensors.index.json"
    for text in ('{"weight_map": ["a"]}', '{"weight_map": {"backbone.norm_f.weight": 3}}', "[1]",
                 '{"weight_map": {}}', "{"):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid shard index"):
            MambaLM.from_pretrained(d)
    w = tmp_path / "dirw"
    w.mkdir()
    shutil.copy(d / "config.json", w)
    (w / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a directory"):
        MambaLM.from_pretrained(w)


def test_unreadable_bin_files_say_why_without_torchs_advice_to_drop_weights_only(tmp_path):
    """Defect: a corrupt or truncated pytorch_model.bin was reported with torch's text ("Re-running torch.load with
    weights_only set to False will likely succeed ...", "[Errno 22] Invalid argument"): advice to run the
    file's code, for a file that is merely cut or not a torch file."""
    hf = _hf_mamba(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)
    d = tmp_path / "b"
    hf.save_pretrained(d)
    (d / "model.safetensors").unlink()
    sd = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, d / "pytorch_model.bin")
    whole = (d / "pytorch_model.bin").read_bytes()
    assert torch.equal(MambaLM.from_pretrained(d).layers[0].mixer.D, hf.backbone.layers[0].mixer.D)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    for content, words in ((whole[: len(whole) // 2], "truncated or corrupt"), (b"garbage" * 9, "truncated or corrupt"),
                           (None, "objects other than tensors")):
        if content is None:
            torch.save({**sd, "x": Boom()}, d / "pytorch_model.bin")
        else:
            (d / "pytorch_model.bin").write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            MambaLM.from_pretrained(d)
        msg = str(e.value)
        assert words in msg and "weights-only" in msg, msg
        assert "set to `False`" not in msg and "Errno" not in msg.split(";")[0], msg


def test_a_hub_id_or_a_file_path_gets_a_hint(tmp_path, capsys, monkeypatch):
    """Defect: ``from_pretrained("state-spaces/mamba-130m")`` / ``generate --lm state-spaces/mamba-130m`` said only
    that the directory does not exist (nothing is downloaded here), and a file of the folder gave no folder."""
    for hub_id in ("state-spaces/mamba-130m", "state-spaces/mamba2-2.7b"):
        with pytest.raises(CheckpointError, match=f"{hub_id} does not exist .*Hugging Face Hub id.*nothing is "
                                                  f"downloaded.*huggingface-cli download {hub_id}"):
            MambaLM.from_pretrained(hub_id)
    with pytest.raises(CheckpointError) as e:
        MambaLM.from_pretrained(tmp_path / "no" / "such")
    assert "Hub id" not in str(e.value)
    (tmp_path / "models").mkdir()  # a relative path of two parts whose first is a local folder: a typo, not an id
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        MambaLM.from_pretrained("models/mamba-130m")
    assert "does not exist" in str(e.value) and "Hub id" not in str(e.value)
    assert main(["generate", "--lm", "state-spaces/mamba-130m", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "huggingface-cli download state-spaces/mamba-130m" in err
    _hf_mamba(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=f"is not a directory.*here perhaps {tmp_path / 'm'}"):
        MambaLM.from_pretrained(tmp_path / "m" / "model.safetensors")


def test_export_of_a_language_model_folder_is_refused_by_name(tmp_path, capsys):
    """Defect: ``emma-mamba export --checkpoint LM_DIR`` said the folder "has no config.yaml (expected ...
    written by EmmaMamba.save)", not that it is a Mamba LM folder nor what converts one."""
    _hf_mamba(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1).save_pretrained(tmp_path / "lm")
    assert main(["export", "--checkpoint", str(tmp_path / "lm"), "--out", str(tmp_path / "out"), "--lm-only"]) == 2
    err = capsys.readouterr().err
    assert "language-model folder (config.json)" in err and 'save_pretrained(OUT, layout="hf")' in err, err
    assert not (tmp_path / "out").exists()
    # emma_mamba.load (and every --checkpoint command through it) says the same, and what loads it
    import emma_mamba

    with pytest.raises(FileNotFoundError, match=r"lm is a language-model folder \(config.json.*MambaLM\."
                                                r"from_pretrained, or the commands' --lm option"):
        emma_mamba.load(tmp_path / "lm")
    assert main(["eval", "--checkpoint", str(tmp_path / "lm"), "--task", "pope", "--questions", "q.jsonl",
                 "--images", str(tmp_path), "--out", str(tmp_path / "ev")]) != 0
    assert "language-model folder" in capsys.readouterr().err


def _original_layout(hf, path, dtype, vocab_size, pad):
    """mamba-ssm's files for ``hf``'s weights: config.json as state-spaces/mamba-130m's, pytorch_model.bin with
    ``backbone.embedding.weight`` and the tied head's copy, stored in ``dtype``."""
    path.mkdir()
    c = hf.config
    (path / "config.json").write_text(json.dumps({
        "d_model": c.hidden_size, "n_layer": c.num_hidden_layers, "vocab_size": vocab_size,
        "ssm_cfg": {"d_state": c.state_size}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": pad}))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().to(dtype).clone()
          for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, path / "pytorch_model.bin")


def test_fp16_original_layout_padded_vocabulary_dtype_and_round_trip(tmp_path):
    """Checked fine (a guard): mamba-ssm's layout stored in fp16 with 97 tokens padded to 104 rows, as 50277 ->
    50280: fp32 by default, fp16 when asked with A_log / D in fp32; our transformers-layout copy loads in
    transformers with the same logits, and back into ours bit for bit."""
    hf = _hf_mamba(vocab_size=104, hidden_size=32, state_size=8, num_hidden_layers=2).half()
    _original_layout(hf, tmp_path / "orig", torch.float16, vocab_size=97, pad=8)
    lm = MambaLM.from_pretrained(tmp_path / "orig").eval()
    assert lm.checkpoint_layout == "original" and lm.dtype == torch.float32 and lm.lm_head is None
    assert (lm.config.vocab_size, lm.config.padded_vocab_size) == (97, 104)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = _logits(hf.float(), ids)
    _assert_close(_logits(lm, ids), ref)
    half = MambaLM.from_pretrained(tmp_path / "orig", dtype=torch.float16)
    dtypes = {k: v.dtype for k, v in half.state_dict().items()}
    assert dtypes["layers.0.mixer.A_log"] == dtypes["layers.0.mixer.D"] == torch.float32
    assert dtypes["embeddings.weight"] == dtypes["layers.1.mixer.in_proj.weight"] == torch.float16
    lm.save_pretrained(tmp_path / "hf", layout="hf")
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _assert_close(_logits(theirs, ids), ref)
    back = MambaLM.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in back.state_dict().items())


def test_generate_lm_on_a_hf_folder_continues_as_transformers_greedy(tmp_path, capsys):
    """Checked fine (a guard): ``emma-mamba generate --lm DIR`` on a transformers-layout folder of the real
    vocabulary (50280 rows, the shipped GPT-NeoX-20B tokenizer) prints transformers' greedy continuation."""
    from emma_mamba.models.tokenizer import load_tokenizer

    hf = _hf_mamba(seed=3, scale=1.0, vocab_size=50280, hidden_size=16, state_size=4, num_hidden_layers=2)
    hf.save_pretrained(tmp_path / "lm")
    tok = load_tokenizer(None)
    prompt = "The capital of France is"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert main(["generate", "--lm", str(tmp_path / "lm"), "--prompt", prompt, "--max-new-tokens", "6",
                 "--backend", "torch"]) == 0
    out = capsys.readouterr()
    assert "shipped GPT-NeoX-20B tokenizer" in out.err
    assert out.out == prompt + tok.decode([t for t in want if t != tok.eos_token_id]) + "\n"


@pytest.mark.parametrize("kw, says", [
    (dict(time_step_rank=7), "dt_rank=7 but the config says lm.dt_rank=auto (2)"),
    (dict(use_bias=True), "bias=True but the config says lm.bias=False"),
    (dict(use_conv_bias=False), "conv_bias=False but the config says lm.conv_bias=True"),
    (dict(layer_norm_epsilon=0.1), "rms_norm_eps=0.1 but the config says lm.rms_norm_eps=1e-05"),
    (dict(residual_in_fp32=False), "residual_in_fp32=False but the config says lm.residual_in_fp32=True"),
], ids=["dt_rank", "bias", "conv_bias", "eps", "residual_in_fp32"])
def test_lm_pretrained_differing_in_a_non_shape_field_is_refused_and_info_says_what_takes_it(tmp_path, capsys, kw,
                                                                                             says):
    """Defect: lm.pretrained was compared with the model config on its shape only; an LM differing in dt_rank,
    bias, conv_bias, rms_norm_eps or residual_in_fp32 was taken (built from its own config.json), and the model
    saved with the config's values then failed to load (dt_rank, biases) or loaded as another network (eps,
    residual_in_fp32: logits off by up to 4.7). Now refused naming the field; `info --config DIR` lists the option
    that takes it, and with its options the model builds, its LM is transformers', and its save reloads the same."""
    import re

    import yaml

    from emma_mamba.config import ConfigError, get_preset
    from emma_mamba.models.vlm import EmmaMamba, load

    hf = _hf_mamba(vocab_size=50280, hidden_size=32, state_size=4, num_hidden_layers=2, **kw)
    hf.save_pretrained(tmp_path / "lm")
    cfg = get_preset("tiny")
    cfg.lm.d_model, cfg.lm.d_state, cfg.lm.n_layer, cfg.lm.pretrained = 32, 4, 2, str(tmp_path / "lm")
    with pytest.raises(ConfigError, match=re.escape(says)):
        EmmaMamba(cfg)
    assert main(["info", "--config", str(tmp_path / "lm")]) == 2
    opts = dict(re.findall(r"--model\.lm\.(\w+) (\S+)", capsys.readouterr().err))
    for k, v in opts.items():
        if k != "pretrained":
            setattr(cfg.lm, k, yaml.safe_load(v))
    torch.manual_seed(0)
    m = EmmaMamba(cfg, for_training=False)
    ids = torch.randint(0, 50277, (2, 9), generator=torch.Generator().manual_seed(1))
    _assert_close(_logits(m.lm, ids), _logits(hf, ids))
    m.save(tmp_path / "ckpt")
    _assert_close(_logits(load(tmp_path / "ckpt").lm, ids), _logits(hf, ids))


@pytest.mark.parametrize("first, then", [("hf", "original"), ("original", "hf"), ("hf-sharded", "original")])
def test_save_pretrained_over_an_earlier_save_loads_what_it_wrote(tmp_path, first, then):
    """Defect: layout="original" into a folder holding an earlier "hf" save left its model.safetensors, which the
    loader (as transformers) prefers: the folder loaded the old weights under the new config (logits off by 0.47),
    the only trace an INFO line. Oracle: the model just saved, its logits."""
    from emma_mamba.models.mamba import MambaConfig

    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=64, d_state=4)
    torch.manual_seed(0)
    old, new = MambaLM(cfg), MambaLM(cfg)
    d = tmp_path / "lm"
    old.save_pretrained(d, layout="hf", max_shard_size=2000) if first == "hf-sharded" else \
        old.save_pretrained(d, layout=first)
    new.save_pretrained(d, layout=then)
    ids = torch.randint(0, 64, (1, 7))
    _assert_close(_logits(MambaLM.from_pretrained(d), ids), _logits(new, ids))
    weights = sorted(f.name for f in d.iterdir() if f.name != "config.json")
    assert weights == (["pytorch_model.bin"] if then == "original" else ["model.safetensors"]), weights


def test_a_tied_config_with_a_head_of_another_shape_is_refused(tmp_path):
    """Defect: tie set, a (120, 32) lm_head.weight beside a (97 -> 104, 32) embedding was dropped without a word
    (transformers refuses the file: a size mismatch)."""
    hf = _hf_mamba(vocab_size=104, hidden_size=32, state_size=4, num_hidden_layers=1)
    hf.save_pretrained(tmp_path / "lm")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "lm" / "model.safetensors"))
    sd["lm_head.weight"] = torch.randn(120, 32)
    save_file(sd, str(tmp_path / "lm" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"ties the LM head to the embedding but tensor 'lm_head.weight' in "
                                              r"'.*model.safetensors' has shape \(120, 32\) and tensor "
                                              r"'backbone.embeddings.weight' in '.*' \(104, 32\)"):
        MambaLM.from_pretrained(tmp_path / "lm")


@pytest.mark.parametrize("content", ["empty", "int-only"])
def test_a_weight_file_without_a_float_tensor_is_named_not_a_max_error(tmp_path, content):
    """Defect: an empty safetensors or one holding only an int tensor failed with "max() arg is an empty sequence"
    (the dtype of "auto" looked for the largest float tensor first); now the missing tensors are named."""
    from safetensors.torch import save_file

    hf = _hf_mamba(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)
    hf.save_pretrained(tmp_path / "lm")
    sd = {} if content == "empty" else {"step": torch.tensor([3])}
    save_file(sd, str(tmp_path / "lm" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor"):
        MambaLM.from_pretrained(tmp_path / "lm")
