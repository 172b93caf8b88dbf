"""Model configs: presets, strict YAML overrides (unknown keys and wrong types are errors naming them),
lossless round trip, and the shipped configs/*.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from emma_mamba.config import (PRESETS, ConfigError, ModelConfig, apply_overrides, config_from_dict, get_preset,
                               load_config, save_config)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="model.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_presets():
    big = get_preset("emma-mamba-2.8b")
    assert (big.lm.d_model, big.lm.n_layer, big.lm.vocab_size) == (2560, 64, 50280)  # mamba-2.8b-zephyr
    assert big.vision.model_name == "ViT-L-14-336-quickgelu" and big.vision.preprocess_tag == "openai"
    assert big.instruction.enabled and big.align.enabled and big.mff.mode == "cross_attn"
    cobra = get_preset("cobra-like")
    assert cobra.mff.mode == "none" and cobra.vision.taps == [-2]
    assert not cobra.instruction.enabled and not cobra.align.enabled
    assert cobra.lm == big.lm and cobra.vision.model_name == big.vision.model_name
    get_preset("tiny").validate()
    assert get_preset("tiny") is not get_preset("tiny")  # fresh copies: mutating one never leaks
    with pytest.raises(ConfigError, match="unknown preset 'huge'; valid presets: tiny, emma-mamba-2.8b, "
                                          "emma-mamba-2.8b-dinosiglip, cobra-like"):
        get_preset("huge")


@pytest.mark.parametrize("name", list(PRESETS))
def test_yaml_round_trip_is_lossless(tmp_path, name):
    cfg = get_preset(name)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_apply_on_the_named_preset(tmp_path):
    p = write(tmp_path, "preset: emma-mamba-2.8b\nmff:\n  mode: concat\nlm:\n  n_layer: 4\n  rms_norm_eps: 1\n"
                        "vision:\n  taps: [3, -2]\n")
    cfg = load_config(p)
    assert cfg.mff.mode == "concat" and cfg.lm.n_layer == 4 and cfg.vision.taps == [3, -2]
    assert cfg.lm.rms_norm_eps == 1.0 and isinstance(cfg.lm.rms_norm_eps, float)  # int accepted for a float
    assert cfg.lm.d_model == 2560  # untouched fields keep the preset's values
    assert load_config(write(tmp_path, "", "empty.yaml")) == get_preset("tiny")  # default preset


def test_unknown_key_names_key_path_file_and_valid_keys(tmp_path):
    p = write(tmp_path, "preset: tiny\nlm:\n  d_modle: 128\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'d_modle'" in msg and "'lm.d_modle'" in msg and str(p) in msg
    assert "(did you mean 'd_model'?)" in msg and "valid keys of 'lm': d_model, n_layer" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'projection' at 'projection' \(did you mean "
                                          r"'projector'\?\); valid keys: name, vision, mff"):
        load_config(write(tmp_path, "projection: {depth: 2}\n"))


@pytest.mark.parametrize("text,match", [
    ("lm:\n  d_model: '64'\n", r"lm.d_model: expected int, got '64' \(str\)"),
    ("lm:\n  n_layer: true\n", r"lm.n_layer: expected int, got True \(bool\)"),
    ("align:\n  enabled: 1\n", r"align.enabled: expected bool, got 1 \(int\)"),
    ("mff:\n  mode: sum\n", r"mff.mode: expected 'none' \| 'weighted' \| 'concat' \| 'cross_attn', got 'sum'"),
    ("vision:\n  taps: [1, x]\n", r"vision.taps\[1\]: expected int, got 'x'"),
    ("vision:\n  taps: 3\n", r"vision.taps: expected list\[int\], got 3"),
    ("lm:\n  dt_rank: automatic\n", r"lm.dt_rank: expected int \| 'auto', got 'automatic'"),
    ("lm: 5\n", r"lm must be a mapping, got int"),
    ("vision:\n  pretrained: 3\n", r"vision.pretrained: expected str \| null, got 3"),
])
def test_wrong_types_are_errors_naming_the_field(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_cross_field_validation_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"mff.mode 'none' uses a single tap, but vision.taps has 2"):
        load_config(write(tmp_path, "mff:\n  mode: none\nvision:\n  taps: [0, 1]\n"))
    with pytest.raises(ConfigError, match="projector.depth must be 2 or 3, got 4"):
        load_config(write(tmp_path, "projector:\n  depth: 4\n"))
    with pytest.raises(ConfigError, match="vision.taps: duplicate"):
        config_from_dict({"vision": {"taps": [1, 1]}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "lm: [\n"))
    with pytest.raises(ConfigError, match="preset must be a string"):
        config_from_dict({"preset": 3})


def test_yaml_loading_is_safe(tmp_path):
    # python-object tags are never constructed (yaml.safe_load)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))


def test_apply_overrides_works_on_any_dataclass():
    cfg = apply_overrides(ModelConfig(), {"align": {"loss_weight": 0.5}}, source="cli")
    assert cfg.align.loss_weight == 0.5
    with pytest.raises(ConfigError, match=r"cli: unknown config key 'weight' at 'align.weight'"):
        apply_overrides(ModelConfig(), {"align": {"weight": 0.5}}, source="cli")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("model_*.yaml")), ids=lambda p: p.name)
def test_shipped_model_configs_load(path):
    cfg = load_config(path)
    assert cfg.name == path.stem.removeprefix("model_")


@pytest.mark.parametrize("text,field,want", [
    ("lm:\n  rms_norm_eps: 1e-6\n", "rms_norm_eps", 1e-6),     # PyYAML (YAML 1.1) reads these as text:
    ("lm:\n  rms_norm_eps: 1.0e6\n", "rms_norm_eps", 1e6),     # an exponent without a dot, or without a sign
    ("lm:\n  initializer_range: 2E-2\n", "initializer_range", 2e-2),
])
def test_exponent_floats_in_yaml_are_numbers(tmp_path, text, field, want):
    # YAML 1.2, JSON, Python and the command line (`--train.lr 1e-3`) all read 1e-6 as a number; a float field
    # given it in a file was refused as "expected float, got '1e-6' (str)"
    cfg = load_config(write(tmp_path, text))
    got = getattr(cfg.lm, field)
    assert got == float(text.split(": ")[1]) == want and isinstance(got, float)
    cfg = load_config(write(tmp_path, "preset: emma-mamba-2.8b-dinosiglip\nvision:\n  second_encoder:\n"
                                      "    mean: [0.5, 5e-1, 1e0]\n    std: [1e-1, 0.2, 3e-1]\n"))
    assert cfg.vision.second_encoder.mean == [0.5, 0.5, 1.0] and cfg.vision.second_encoder.std == [0.1, 0.2, 0.3]
    with pytest.raises(ConfigError, match=r"lm.n_layer: expected int, got '1e3' \(str\)"):  # ints stay strict
        load_config(write(tmp_path, "lm:\n  n_layer: 1e3\n"))
    with pytest.raises(ConfigError, match=r"lm.rms_norm_eps: expected float, got 'small' \(str\)"):
        load_config(write(tmp_path, "lm:\n  rms_norm_eps: small\n"))


@pytest.mark.parametrize("over,match", [
    ({"align": {"num_heads": 0}}, r"align.num_heads must be >= 1, got 0"),  # was a ZeroDivisionError
    ({"align": {"enabled": False, "num_heads": 0}}, r"align.num_heads must be >= 1, got 0"),
    ({"align": {"d_model": -4}}, r"align.d_model must be >= 1, got -4"),
    ({"align": {"n_layer": -1}}, r"align.n_layer must be >= 0, got -1"),
    ({"projector": {"hidden_dim": 0}}, r"projector.hidden_dim must be >= 1 \(or null\), got 0"),
    ({"projector": {"hidden_dim": -5}}, r"projector.hidden_dim must be >= 1 \(or null\), got -5"),
])
def test_bad_sizes_are_named(over, match):
    # these reached the model build as a ZeroDivisionError / "negative dimension" traceback, or were taken
    # silently (a negative layer count built no layer, hidden_dim 0 meant the default)
    with pytest.raises(ConfigError, match=match):
        config_from_dict(over)


@pytest.mark.parametrize("text,match", [
    ("lm:\n  rms_norm_eps: .nan\n", r"lm\.rms_norm_eps must be a finite number, got nan"),
    ("lm:\n  initializer_range: .inf\n", r"lm\.initializer_range must be a finite number, got inf"),
    ("align:\n  loss_weight: .inf\n", r"align\.loss_weight must be a finite number, got inf"),
    ("preset: emma-mamba-2.8b-dinosiglip\nvision:\n  second_encoder:\n    mean: [0.5, .nan, 0.5]\n",
     r"vision\.second_encoder\.mean\[1\] must be a finite number, got nan"),
    ("vision:\n  open_clip_overrides: {vision_cfg: {ls_init_value: .nan}}\n",
     r"vision\.open_clip_overrides\.vision_cfg\.ls_init_value must be a finite number, got nan"),
])
def test_non_finite_numbers_in_a_model_config_are_refused_naming_the_key(tmp_path, text, match):
    # a run config refused them; a model config read on its own (emma-mamba info --config, convert --config,
    # EmmaMamba(cfg)) took them: NaN passes every `< 0` check (nan < 0 is False)
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: ")
    with pytest.raises(ConfigError, match=r"lm\.rms_norm_eps must be a finite number, got nan"):
        config_from_dict({"lm": {"rms_norm_eps": float("nan")}})
    cfg = get_preset("tiny")
    cfg.align.loss_weight = float("nan")
    with pytest.raises(ConfigError, match=r"align\.loss_weight must be a finite number, got nan"):
        cfg.validate()


def test_a_model_config_inside_another_names_its_keys_by_their_full_path():
    # the model section of a run config (or the --model.* options): the key as the user wrote it there
    with pytest.raises(ConfigError, match=r"^run\.yaml: model\.lm\.d_model must be >= 1, got 0$"):
        config_from_dict({"lm": {"d_model": 0}}, source="run.yaml", path="model")
    with pytest.raises(ConfigError, match=r"^run\.yaml: model\.align\.d_model \(30\) must be divisible by "
                                          r"model\.align\.num_heads \(4\)$"):
        config_from_dict({"align": {"d_model": 30, "num_heads": 4}}, source="run.yaml", path="model")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key 'd_modle' at 'model\.lm\.d_modle'"):
        config_from_dict({"lm": {"d_modle": 0}}, source="run.yaml", path="model")
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.preset must be a string"):
        config_from_dict({"preset": 3}, source="run.yaml", path="model")
    # a model file of its own: the keys as written in it
    with pytest.raises(ConfigError, match=r"^model\.yaml: lm\.d_model must be >= 1, got 0$"):
        config_from_dict({"lm": {"d_model": 0}}, source="model.yaml")


def test_a_dotted_override_given_twice_is_refused_naming_both_values():
    from emma_mamba.config import apply_dotted_overrides

    cfg = get_preset("tiny")
    with pytest.raises(ConfigError, match=r"--override: lm\.n_layer is given twice, '3' and '5'; give it once"):
        apply_dotted_overrides(cfg, ["lm.n_layer=3", "lm.d_state=4", "lm.n_layer=5"])
    assert cfg == get_preset("tiny")  # refused before any of them applied
    assert apply_dotted_overrides(cfg, ["lm.n_layer=3", "lm.d_state=4"]).lm.n_layer == 3
