"""Mutation round 5: ``emma-mamba export``.

* A Mamba-2 LM's dt bias is named ``dt_bias`` (not ``dt_proj.bias``): a half-precision export keeps it fp32 as
  it keeps A_log and D, in both layouts (the names written out here from mamba-ssm's Mamba2 module).
* ``--lm-only``: the special-token ids transformers reads from config.json agree with the ones its tokenizer
  reads from tokenizer_config.json, and with our tokenizer's (whose padding token is not its EOS).
* The model card's note on the fp32 SSM parameters is there whenever the weight file holds them (fp16 too).
"""

from __future__ import annotations

import pytest

import emma_mamba
from emma_mamba.cli import main
from tests.models.test_mamba2_walkthrough import _tiny_vlm
from tests.test_mutation2_export_dtypes import _dtypes, ckpt  # noqa: F401 (ckpt: a fixture)


@pytest.mark.parametrize("lm_only", [False, True])
def test_half_precision_export_of_a_mamba2_lm_keeps_its_dt_bias_in_fp32(tmp_path, lm_only):
    """Guards against a KEEP_FP32 list that knows Mamba-1's ``dt_proj.bias`` but not Mamba-2's ``dt_bias``."""
    m = _tiny_vlm(ssm_layer="mamba2", headdim=16, ngroups=2)
    m.eval().save(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "bf16"]
                + (["--lm-only"] if lm_only else [])) == 0
    stored = _dtypes(out / "model.safetensors")
    n_layer = m.config.lm.n_layer
    for leaf in ("dt_bias", "A_log", "D"):  # Mamba2's SSM parameters, one of each per layer
        names = [k for k in stored if k.rsplit(".", 1)[-1] == leaf]
        assert len(names) == n_layer, (leaf, names)
        assert {stored[k] for k in names} == {"F32"}, {k: stored[k] for k in names}
    assert "BF16" in stored.values()


def test_lm_only_special_token_ids_agree_between_config_tokenizer_and_ours(ckpt, tmp_path):
    """Guards against config.json or tokenizer_config.json naming the EOS token where the padding (or BOS) token
    belongs: transformers' config, transformers' tokenizer and our tokenizer must give the same ids."""
    from transformers import AutoConfig, AutoTokenizer

    ours = emma_mamba.load(ckpt).tokenizer
    assert ours.pad_token_id != ours.eos_token_id  # GPT-NeoX's <|padding|>: the check below can tell them apart
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "lm"), "--lm-only"]) == 0
    conf = AutoConfig.from_pretrained(tmp_path / "lm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert conf.pad_token_id == tok.pad_token_id == ours.pad_token_id
    assert conf.eos_token_id == tok.eos_token_id == ours.eos_token_id
    assert conf.bos_token_id == tok.bos_token_id


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_card_mentions_the_fp32_ssm_parameters_whenever_the_file_holds_them(ckpt, tmp_path, dtype):
    """Guards against the card's fp32 note being written for one half-precision dtype only."""
    out = tmp_path / dtype
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", dtype]) == 0
    stored = set(_dtypes(out / "model.safetensors").values())
    assert "F32" in stored and ("BF16" if dtype == "bf16" else "F16") in stored
    card = (out / "README.md").read_text()
    assert f"weights stored as {dtype} (the SSM's A_log, D and dt bias in fp32)." in card
