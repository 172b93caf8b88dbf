"""Mutation round 4 (checkpoint loading): the defaults of the state-spaces layout, the shard index's own error,
and which weight file a folder holding two formats is read from.

Oracles: transformers' MambaForCausalLM / Mamba2ForCausalLM (logits, and its own choice of weight file), and
mamba-ssm's documented defaults (``MambaConfig.pad_vocab_size_multiple = 8``; ``Mamba2(d_state=128)``, which the
public ``state-spaces/mamba2-*`` config.json files rely on: their ssm_cfg is ``{"layer": "Mamba2"}`` alone).
"""

from __future__ import annotations

import json

import pytest
import torch

from emma_mamba import ops
from emma_mamba.models.mamba import CheckpointError, MambaLM, config_from_dir

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


def _perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _write_original(hf, path, config: dict):
    """The state-spaces layout by hand from a transformers model: ``config`` as given (fields left out on
    purpose), tensors renamed, the tied head stored as mamba-ssm's state_dict carries it."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().clone()
          for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    torch.save(sd, path / "pytorch_model.bin")


def _logits(model, ids):
    with torch.no_grad(), ops.use_backend("torch"):
        return model(ids).logits


def test_original_layout_without_pad_field_pads_to_mamba_ssms_default_8(tmp_path):
    """A state-spaces config.json without pad_vocab_size_multiple: mamba-ssm pads by 8 (97 -> 104 rows)."""
    torch.manual_seed(0)
    hf = _perturbed(transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=104, hidden_size=16, state_size=4, num_hidden_layers=2)), 1)
    _write_original(hf, tmp_path / "orig", {"d_model": 16, "n_layer": 2, "vocab_size": 97,
                                            "ssm_cfg": {"d_state": 4}})
    cfg, layout = config_from_dir(tmp_path / "orig")
    assert layout == "original" and (cfg.vocab_size, cfg.padded_vocab_size) == (97, 104)
    lm = MambaLM.from_pretrained(tmp_path / "orig")
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(_logits(lm, ids), _logits(hf, ids), rtol=1e-4, atol=1e-4)


def test_original_mamba2_layout_without_d_state_is_mamba_ssms_128(tmp_path):
    """ssm_cfg {"layer": "Mamba2"} without d_state (as the public mamba2-* configs): mamba-ssm's Mamba2 default
    d_state=128 (not Mamba-1's 16); the checkpoint loads with transformers' logits."""
    torch.manual_seed(0)
    hf = _perturbed(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=96, hidden_size=32, state_size=128, num_hidden_layers=1, num_heads=4, head_dim=16, n_groups=1,
        conv_kernel=4, chunk_size=8, tie_word_embeddings=True)), 2)
    _write_original(hf, tmp_path / "orig", {"d_model": 32, "n_layer": 1, "vocab_size": 96,
                                            "ssm_cfg": {"layer": "Mamba2", "headdim": 16}})
    cfg, _ = config_from_dir(tmp_path / "orig")
    assert (cfg.ssm_layer, cfg.d_state, cfg.headdim, cfg.ngroups) == ("mamba2", 128, 16, 1)
    lm = MambaLM.from_pretrained(tmp_path / "orig")
    ids = torch.randint(0, 96, (1, 11))
    torch.testing.assert_close(_logits(lm, ids), _logits(hf, ids), rtol=1e-4, atol=1e-4)


def _small_hf(seed):
    torch.manual_seed(seed)
    return _perturbed(transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=24, state_size=4, num_hidden_layers=3, conv_kernel=3, time_step_rank=5,
        use_bias=True, expand=3)), seed)


def test_a_shard_that_lacks_a_tensor_its_index_lists_is_named(tmp_path):
    """A model.safetensors.index.json naming a tensor its shard does not hold: the error names the index, the
    tensor and the shard (not a generic missing tensor)."""
    hf = _small_hf(0)
    d = tmp_path / "hf"
    hf.save_pretrained(d, max_shard_size="20KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key = "backbone.layers.1.mixer.D"
    shard = index[key]
    tensors = load_file(str(d / shard))
    del tensors[key]
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"index\.json lists '{key}' in {shard} but that shard does not "
                                              rf"contain it"):
        MambaLM.from_pretrained(d)


def test_a_folder_with_safetensors_and_bin_reads_the_safetensors_as_transformers(tmp_path):
    """model.safetensors beside a pytorch_model.bin of other weights: transformers' order of preference reads
    the safetensors; so do we (the logits of transformers loading the folder, not of the .bin's model)."""
    a, b = _small_hf(0), _small_hf(1)
    d = tmp_path / "both"
    a.save_pretrained(d)
    torch.save({k: v.detach().clone() for k, v in b.state_dict().items()}, d / "pytorch_model.bin")
    assert {"model.safetensors", "pytorch_model.bin"} <= {p.name for p in d.iterdir()}
    ids = torch.randint(0, 64, (1, 10))
    theirs = _logits(transformers.MambaForCausalLM.from_pretrained(d).eval(), ids)
    assert not torch.allclose(_logits(a, ids), _logits(b, ids), atol=1e-3)  # the two files do differ
    torch.testing.assert_close(theirs, _logits(a, ids), rtol=1e-4, atol=1e-4)  # the oracle's choice
    torch.testing.assert_close(_logits(MambaLM.from_pretrained(d), ids), theirs, rtol=1e-4, atol=1e-4)


# our field <- transformers' attribute, for both MambaConfig and Mamba2Config (their spelling is shared)
_HF_FIELDS = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "vocab_size": "vocab_size",
              "d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "bias": "use_bias",
              "conv_bias": "use_conv_bias", "rms_norm_eps": "layer_norm_epsilon",
              "residual_in_fp32": "residual_in_fp32", "tie_embeddings": "tie_word_embeddings",
              "dt_min": "time_step_min", "dt_max": "time_step_max", "dt_init_floor": "time_step_floor"}


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_a_minimal_transformers_config_reads_transformers_defaults(tmp_path, kind):
    """A transformers config.json holding only the required fields: every field left out takes the value
    transformers' own MambaConfig / Mamba2Config reads from the same file (its class defaults)."""
    conf = {"model_type": kind, "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 64}
    if kind == "mamba2":
        conf.update(num_heads=8, head_dim=16)  # 8 x 16 = expand 2 x 64; the default 8 groups divide 8 heads
    (tmp_path / "config.json").write_text(json.dumps(conf))
    theirs = (transformers.Mamba2Config if kind == "mamba2" else transformers.MambaConfig).from_pretrained(tmp_path)
    ours, layout = config_from_dir(tmp_path)
    assert layout == "hf"
    fields = dict(_HF_FIELDS)
    if kind == "mamba2":
        fields.update(headdim="head_dim", ngroups="n_groups")
    else:
        fields.update(resolved_dt_rank="time_step_rank", dt_scale="time_step_scale", dt_init="time_step_init_scheme")
    got = {k: getattr(ours, k) for k in fields}
    want = {k: getattr(theirs, v) for k, v in fields.items()}
    assert got == want
    assert ours.padded_vocab_size == theirs.vocab_size  # the *-hf layouts store the padded embedding
