"""Mutation round 2: ``emma-mamba export --dtype bf16`` keeps the SSM parameters in fp32. The list comes from the
documentation (README / export module doc: "except the SSM parameters A_log, D and the dt bias (dt_proj.bias;
Mamba-2: dt_bias)"), written out here by name rather than read from the module's own constant."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from emma_mamba.cli import main
from emma_mamba.config import get_preset
from emma_mamba.models.vlm import EmmaMamba


def _dtypes(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def _ssm_parameter(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in ("A_log", "D", "dt_bias") or name.endswith("dt_proj.bias")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    EmmaMamba(get_preset("tiny"), for_training=False).save(d)
    return d


@pytest.mark.parametrize("lm_only", [False, True])
def test_bf16_export_keeps_A_log_D_and_the_dt_bias_in_fp32(ckpt, tmp_path, lm_only):
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "bf16"]
                + (["--lm-only"] if lm_only else [])) == 0
    stored = _dtypes(out / "model.safetensors")
    ssm = [k for k in stored if _ssm_parameter(k)]
    n_layer = get_preset("tiny").lm.n_layer
    for leaf in ("A_log", "D"):  # one of each per layer: none missed by the name test above
        assert sum(k.rsplit(".", 1)[-1] == leaf for k in ssm) == n_layer, leaf
    assert sum(k.endswith("dt_proj.bias") for k in ssm) == n_layer
    assert {stored[k] for k in ssm} == {"F32"}, {k: stored[k] for k in ssm if stored[k] != "F32"}
    others = [k for k in stored if not _ssm_parameter(k) and stored[k] in ("F32", "BF16")]
    assert others and {stored[k] for k in others} == {"BF16"}
