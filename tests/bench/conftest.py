"""What the bench command tests share."""

import pytest


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv) -> (exit status, stdout, stderr)`` of ``emma-mamba <argv>`` in this process: a SystemExit
    (argparse's errors, refusals) gives its code; a KeyboardInterrupt escaping the command fails the test (Ctrl-C
    must end a benchmark with 130, not a traceback)."""
    from emma_mamba.cli import main

    def run(argv):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except KeyboardInterrupt:  # pragma: no cover - the bug this guards against
            pytest.fail("KeyboardInterrupt escaped the command")
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run
