"""Every `emma-mamba` command's --help renders (argparse %-formats help strings: one stray % breaks it)."""
import pytest

from emma_mamba.cli import COMMANDS, main


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_help_renders(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: emma-mamba " + " ".join(path))
