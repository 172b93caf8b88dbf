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


def test_mistyped_command_gets_a_suggestion(capsys):
    assert main(["pretrian"]) == 2
    assert "unknown command 'pretrian' (did you mean 'pretrain'?)" in capsys.readouterr().err
    assert main(["zzzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data", "check", "--config", "x.yaml", "--workers", "0"],
                                  ["quickstart", "--threads", "0"], ["ablate", "--threads", "two"]])
def test_counts_below_one_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}:" in err and ("must be >= 1" in err or "expected an integer >= 1" in err)


def test_a_closed_pipe_ends_the_command_quietly():
    """`emma-mamba configs | head -0`: the reader is gone before the first line; no BrokenPipeError traceback,
    exit 141 (the pipe's read end is closed before the command starts, so its first write fails every time)."""
    import os
    import subprocess
    import sys

    for argv in (["configs"], ["--version"]):  # a long output and one short enough to sit in the buffer
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([sys.executable, "-c", f"import sys; from emma_mamba.cli import main; "
                                f"sys.exit(main({argv!r}))"], stdout=w, stderr=subprocess.PIPE, timeout=120)
        finally:
            os.close(w)
        err = p.stderr.decode()
        assert p.returncode == 141 and "Traceback" not in err and "BrokenPipeError" not in err, (argv, err)


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch):
    """A BrokenPipeError from elsewhere (an HTTP peer gone) while stdout is fine is raised, not a silent 141."""
    import emma_mamba.cli as cli

    def boom(argv):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_main", boom)
    with pytest.raises(BrokenPipeError):
        cli.main(["configs"])


@pytest.mark.parametrize("argv,needle", [
    (["data", "shapes", "--out", "{tmp}/s", "--colours", "red,blue,purpel"],
     "--colours: unknown name(s) ['purpel']"),
    (["data", "shapes", "--out", "{tmp}/s", "--n-train", "-1"], "--n-train: expected an integer >= 0"),
    (["generate", "--random-init", "tiny", "--prompt", "hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["pretrain", "--config", "train_tiny_stage1", "--train.max_steps", "-3"], "train.max_steps must be >= 0"),
])
def test_messages_name_the_option_typed(argv, needle, tmp_path, capsys):
    """Errors name what the user typed (--n-train, --top-p), not the dataclass field behind it."""
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Config." not in err, err


def test_configs_copy_onto_a_file_is_a_message(tmp_path, capsys):
    """`emma-mamba configs --copy DIR` where DIR is a file (or cannot be made): one line and exit 2, not an
    OSError traceback."""
    f = tmp_path / "afile"
    f.write_text("x")
    for target in (f, f / "sub"):
        assert main(["configs", "--copy", str(target), "model_tiny"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"emma-mamba configs: cannot copy into {target}: ") and "Traceback" not in err, err
    assert main(["configs", "--copy", str(tmp_path / "ok"), "model_tiny"]) == 0
    assert (tmp_path / "ok" / "model_tiny.yaml").is_file()


def test_data_shapes_out_on_a_file_is_a_message(tmp_path, capsys):
    """`data shapes --out` naming a file, or a path under one: one line naming it and exit 2, not a traceback."""
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["data", "shapes", "--out", str(f), "--n-train", "2", "--n-heldout", "1"]) == 2
    assert f"--out {f} is a file, not a folder" in capsys.readouterr().err
    assert main(["data", "shapes", "--out", str(f / "sub"), "--n-train", "2", "--n-heldout", "1"]) == 2
    err = capsys.readouterr().err
    assert "emma-mamba data shapes: cannot write " in err and str(f) in err and "Traceback" not in err, err
    assert f.read_text() == "x"


@pytest.mark.parametrize("flag", ["--max-batch", "--max-prompt-positions", "--max-tokens-limit"])
def test_serve_limits_below_one_are_named_before_the_model_loads(flag, tmp_path, capsys):
    """A limit of 0 would refuse every request (or never decode): named, exit 2, before any checkpoint is read
    (the checkpoint named here does not exist)."""
    assert main(["serve", "--checkpoint", str(tmp_path / "none"), flag, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be >= 1, got 0" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,key,first,second", [
    (["pretrain", "--config", "train_tiny_stage1", "--print-config", "--train.lr", "1e-4", "--train.lr=2e-4"],
     "--train.lr", "1e-4", "2e-4"),
    (["finetune", "--config", "train_tiny_stage2", "--model.lm.d_model", "32", "--print-config",
      "--model.lm.d_model", "64"], "--model.lm.d_model", "32", "64"),
    (["data", "check", "--config", "train_tiny_stage1", "--train.max_steps", "3", "--train.max_steps", "3"],
     "--train.max_steps", "3", "3"),
])
def test_a_config_override_given_twice_is_refused_naming_both_values(argv, key, first, second, capsys):
    """argparse keeps the last of an option given twice: `--train.lr 2e-4` appended to a command that set
    `--train.lr 1e-4` earlier silently won (or lost, by its position). Refused, naming the key and both values."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {key}: given twice, {first!r} and {second!r}" in err, err


def test_a_non_finite_number_in_a_model_config_alone_is_refused(tmp_path, capsys):
    """`emma-mamba info --config MODEL.yaml` (a model config without a run config) took `rms_norm_eps: .nan`;
    a run config already refused it. Named with the file and the key, exit 2."""
    bad = tmp_path / "model.yaml"
    bad.write_text("preset: tiny\nlm: {rms_norm_eps: .nan}\n")
    assert main(["info", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emma-mamba info: {bad}: lm.rms_norm_eps must be a finite number, got nan"), err


def test_a_forced_backend_that_cannot_run_is_one_line_naming_the_variable(monkeypatch, capsys):
    """EMMA_MAMBA_BACKEND=cuda on CPU tensors: the command ends with exit 2 and one line naming the variable,
    not a traceback (the ops raise BackendUnavailableError deep inside the model)."""
    import torch

    from emma_mamba.cli import main

    if torch.cuda.is_available():
        pytest.skip("cuda can run here")
    monkeypatch.setenv("EMMA_MAMBA_BACKEND", "cuda")
    assert main(["generate", "--random-init", "tiny", "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("emma-mamba: backend 'cuda' was requested (EMMA_MAMBA_BACKEND=cuda) but "
                                            "cannot run on cpu tensors")
    assert "Traceback" not in err


def test_an_unknown_cpu_instruction_set_is_one_line_naming_the_variable(monkeypatch, capsys):
    """EMMA_CPU_ISA=sse: the compiled kernels refuse it on their first call, deep inside the model; the command
    ends with exit 2 and the kernels' one line, not a traceback; `env` shows the same as a warning."""
    from emma_mamba import ops
    from emma_mamba.cli import main

    if "cpu" not in ops.available_backends():
        pytest.skip("the CPU kernels are not built")
    monkeypatch.setenv("EMMA_MAMBA_BACKEND", "cpu")
    monkeypatch.setenv("EMMA_CPU_ISA", "sse")
    assert main(["generate", "--random-init", "tiny", "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("emma-mamba: EMMA_CPU_ISA=sse is not an instruction set of "
                                                   "this build; use auto, scalar"), err
    assert "Traceback" not in err
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels    FAIL: EMMA_CPU_ISA=sse is not an instruction set" in out
    assert "WARNING: EMMA_CPU_ISA=sse is not an instruction set of this build" in out
    from emma_mamba import _C

    monkeypatch.delenv("EMMA_CPU_ISA")  # this CPU's best, as the kernels pick it
    assert main(["env"]) == 0 and f"CPU kernels    {_C.cpu_isa()} (this CPU's best)" in capsys.readouterr().out
    monkeypatch.setenv("EMMA_CPU_ISA", "scalar")  # a set every CPU has: named as the variable's
    assert main(["env"]) == 0 and "CPU kernels    scalar (EMMA_CPU_ISA=scalar)" in capsys.readouterr().out


def test_ctrl_c_where_a_command_has_no_handling_is_one_line(monkeypatch, capsys):
    """Ctrl-C while a command starts (torch importing, before its own handling) printed a KeyboardInterrupt
    traceback; it is one line and exit code 130, as the commands that handle it themselves end."""
    import emma_mamba.cli as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["info", "--preset", "tiny"]) == 130
    assert capsys.readouterr().err == "emma-mamba: interrupted\n"


def test_prompt_ids_beyond_the_embedding_name_its_rows_and_the_vocabulary():
    from emma_mamba.inference.cli_generate import UsageError, check_ids
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=100, pad_vocab_size_multiple=8), device="meta")
    assert lm.embeddings.weight.shape[0] == 104  # the rows the check counts (100 padded to a multiple of 8)
    check_ids([0, 99, 103], lm)  # inside the embedding
    with pytest.raises(UsageError, match=r"id 104, beyond the model's embedding \(ids 0\.\.103: vocab_size 100, "):
        check_ids([5, 104], lm)
    with pytest.raises(UsageError, match="the prompt encodes to no tokens"):
        check_ids([], lm)


def test_under_torchrun_a_failure_goes_into_the_error_file_torchrun_reads(monkeypatch, tmp_path, capsys):
    """torchrun gives each process TORCHELASTIC_ERROR_FILE and shows that file's contents in its summary of failed
    processes (else "<N/A>" and a docs link): a command's one-line error, argparse's usage error and an uncaught
    exception's traceback are recorded in torch's ErrorHandler format (read back by torchrun's own ProcessFailure);
    a command that succeeds writes nothing, and stderr is put back."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    import emma_mamba.cli as cli

    def recorded(path):
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(path))
        return failure.message["message"], failure.message["extraInfo"]["py_callstack"]

    stderr = sys.stderr
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    bad = tmp_path / "model.yaml"
    bad.write_text("preset: tiny\nlm: {d_modell: 64}\n")
    assert cli.main(["info", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    message, stack = recorded(error_file)
    assert message == stack == err.strip() and err.startswith(f"emma-mamba info: {bad}: unknown config key")
    assert sys.stderr is stderr

    error_file.unlink()
    with pytest.raises(SystemExit):
        cli.main(["info", "--zzz"])
    assert recorded(error_file)[0] == capsys.readouterr().err.strip().splitlines()[-1]
    assert "unrecognized arguments: --zzz" in recorded(error_file)[0]

    def broken(argv):
        sys.stderr.write("some progress\r")  # what a progress bar leaves: not the error
        raise ValueError("a bug")

    error_file.unlink()
    monkeypatch.setattr(cli, "_main", broken)
    with pytest.raises(ValueError):
        cli.main(["info"])
    message, stack = recorded(error_file)
    assert message == "ValueError: a bug" and "Traceback (most recent call last)" in stack and "in broken" in stack
    assert sys.stderr is stderr

    error_file.unlink()
    monkeypatch.undo()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert cli.main(["configs"]) == 0 and not error_file.exists()


def test_a_missing_optional_package_is_one_line_naming_what_to_install(monkeypatch, capsys):
    """`bench latency` without transformers (a base install has no peers): one line naming the pip command, exit 2,
    not a ModuleNotFoundError traceback; a module that is not an optional package is still raised."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    assert main(["bench", "latency", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("emma-mamba: this command needs transformers, which is not installed: pip install "
                           "transformers")
    import emma_mamba.cli as cli

    def broken(argv):
        raise ModuleNotFoundError("No module named 'emma_mamba.nope'", name="emma_mamba.nope")

    monkeypatch.setattr(cli, "_main", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["env"])


def test_a_command_run_through_main_leaves_the_log_levels_as_it_found_them(tmp_path, capsys):
    """Commands set their loggers' levels (eval and training: emma_mamba at INFO; quickstart and ablate: some at
    ERROR); run through main() in a longer process (the tests, a notebook) they leaked them, so a later caplog
    test saw another test's INFO lines or missed its own warnings. main() puts every emma_mamba logger back."""
    import logging

    from emma_mamba.quickstart import quiet_logs

    pkg, trainer = logging.getLogger("emma_mamba"), logging.getLogger("emma_mamba.training.trainer")
    before = (pkg.level, trainer.level)
    assert main(["eval", "--task", "pope", "--questions", str(tmp_path / "q.jsonl"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert (pkg.level, trainer.level) == before  # eval had set emma_mamba to INFO
    import emma_mamba.cli as cli

    root = logging.getLogger()
    root_before = (root.level, list(root.handlers))
    saved = root.handlers[:]
    root.handlers.clear()  # as in a notebook: no handler yet, so basicConfig adds one
    try:
        levels = cli._log_levels()
        quiet_logs()  # what quickstart and ablate call (logging.basicConfig(level=WARNING) among it)
        assert trainer.level == logging.ERROR and len(root.handlers) == 1
        cli._restore_log_levels(levels)
        assert (pkg.level, trainer.level) == before and root.handlers == []
    finally:
        root.handlers[:] = saved
    assert (root.level, list(root.handlers)) == root_before
