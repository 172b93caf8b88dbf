"""`emma-mamba` argument handling: every command's --help renders (argparse %-formats help strings: one stray % breaks
it); a mistyped option is named with the closest real one."""
import pytest

from emma_mamba.cli import COMMANDS, main


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_help_renders(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: emma-mamba " + " ".join(path))


def test_mistyped_option_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", "configs/train_tiny_stage1.yaml", "--train.lrr", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --train.lrr 1 (did you mean --train.lr?)" in err
    with pytest.raises(SystemExit):
        main(["generate", "--random-init", "tiny", "--prompt", "hi", "--zzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzz" in err and "did you mean" not in err


def test_a_bad_config_file_is_one_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "model.yaml"
    bad.write_text("preset: tiny\nlm: {d_modell: 64}\n")
    assert main(["info", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emma-mamba info: {bad}: unknown config key 'd_modell' at 'lm.d_modell' (did you mean "
                          f"'d_model'?)") and "Traceback" not in err
