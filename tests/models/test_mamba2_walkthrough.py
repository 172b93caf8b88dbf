"""A researcher's walkthrough of the Mamba-2 path (``lm.ssm_layer: mamba2``), end to end at tiny sizes on the
CPU: what it found that tests/models/test_mamba2_lm.py (the LM against transformers) and
tests/models/test_checkpoint_walkthrough.py (public Mamba-1 folders) do not cover. Each test names the defect it
guards against. Oracles: transformers' ``Mamba2ForCausalLM`` on the same weights (its own config reader, its
parameter count, its logits), never our own output.
"""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from emma_mamba.cli import main
from emma_mamba.config import ConfigError

transformers = pytest.importorskip("transformers")

transformers.logging.set_verbosity_error()

# the shipped GPT-NeoX tokenizer (50277 ids, + <image>) fits the embedding; 50288 rows: mamba2-*'s padding to 16
HF2 = dict(vocab_size=50288, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4, head_dim=16,
           n_groups=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def hf2_dir(tmp_path_factory):
    """A random transformers Mamba2ForCausalLM (every parameter perturbed) written by its own save_pretrained."""
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**HF2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("hf2")
    model.save_pretrained(d)
    return d, model


def _tiny_vlm(**lm):
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    for k, v in lm.items():
        setattr(cfg.lm, k, v)
    return EmmaMamba(cfg)


def _assert_same_lm(ours, hf):
    ids = torch.randint(0, 50277, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_lm_pretrained_mismatch_names_every_field_by_a_key_the_config_has(hf2_dir):
    """Defect: a tiny EMMA-Mamba config given a Mamba-2 folder as lm.pretrained was refused one field at a time
    (a researcher reran once per field), the vocabulary as "lm.padded_vocab_size", which no config has. Now one
    error names every mismatch, the vocabulary by lm.vocab_size / lm.pad_vocab_size_multiple with a multiple
    that gives the checkpoint's rows; with those settings the model builds and its LM is transformers'."""
    d, hf = hf2_dir
    with pytest.raises(ConfigError) as e:
        _tiny_vlm(pretrained=str(d))
    msg = str(e.value)
    for want in ("ssm_layer=mamba2 but the config says lm.ssm_layer=mamba1", "d_model=32 but the config says "
                 "lm.d_model=64", "headdim=16 but the config says lm.headdim=64", "ngroups=2 but the config says "
                 "lm.ngroups=1", "embedding has 50288 rows", "lm.pad_vocab_size_multiple=16 gives 50288"):
        assert want in msg, msg
    assert "padded_vocab_size" not in msg, msg
    m = _tiny_vlm(pretrained=str(d), ssm_layer="mamba2", d_model=32, headdim=16, ngroups=2, pad_vocab_size_multiple=16)
    _assert_same_lm(m.lm, hf)


def test_info_on_a_mamba2_lm_folder_says_what_it_is_and_the_settings_that_take_it(hf2_dir, capsys):
    """Defect: `emma-mamba info --config DIR` on a Mamba-2 LM folder said only "config file not found:
    DIR/config.yaml". Now it names the folder's LM (its parameters counted as transformers counts them) and the
    --model.lm options that build an EMMA-Mamba model on it; applied as given, they load transformers' LM."""
    from emma_mamba.info import _fmt

    d, hf = hf2_dir
    assert main(["info", "--config", str(d)]) == 2
    err = capsys.readouterr().err
    assert "a language-model folder (config.json)" in err and "a Mamba-2 LM (hf layout)" in err, err
    assert f"{_fmt(hf.num_parameters())} parameters" in err, err
    opts = dict(re.findall(r"--model\.lm\.(\w+) (\S+)", err))
    assert opts.pop("pretrained") == str(d)
    m = _tiny_vlm(pretrained=str(d), **{k: yaml.safe_load(v) for k, v in opts.items()})
    _assert_same_lm(m.lm, hf)


def test_lm_only_export_of_a_mamba2_model_names_its_architecture(tmp_path):
    """Defect: `export --lm-only` of a model on a Mamba-2 LM wrote a model card calling it transformers'
    `MambaForCausalLM` layout (what transformers reads is `Mamba2ForCausalLM`, which the card now names, with the
    LM's heads and groups). transformers loads the folder to our logits."""
    m = _tiny_vlm(ssm_layer="mamba2", headdim=16, ngroups=2)
    with torch.no_grad():
        for p in m.lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.eval().save(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "lm"), "--lm-only"]) == 0
    arch = transformers.AutoConfig.from_pretrained(tmp_path / "lm").architectures[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert arch == type(hf).__name__ == "Mamba2ForCausalLM"
    card = (tmp_path / "lm" / "README.md").read_text()
    assert f"transformers' `{arch}` layout" in card and "`MambaForCausalLM`" not in card, card
    heads = hf.config.num_heads
    assert f"{heads} heads of {hf.config.head_dim} channels, {hf.config.n_groups} B/C groups" in card, card
    _assert_same_lm(m.lm, hf)
