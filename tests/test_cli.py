"""The pyro-vae command line: end to end, --help, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from pyro_vae.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def exit_code(argv):
    """main's return value, or the code of argparse's SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_train_evaluate_sample_end_to_end_on_digits(tmp_path):
    run = tmp_path / "run"
    trained = run_cli(
        "train", "--epochs", "3", "--hidden", "64", "--latent-dim", "8", "--out", str(run)
    )
    assert trained.returncode == 0, trained.stderr
    epoch_lines = [line for line in trained.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 3 and "test ELBO" in epoch_lines[0]

    evaluated = run_cli("evaluate", str(run), "--iw-samples", "50")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["iw_samples"] == 50
    assert result["log_px"] >= result["test_elbo"] - 0.5
    assert json.loads((run / "summary.json").read_text())["iw_samples"] == 50

    sampled = run_cli("sample", str(run), "-n", "16", "--out", str(tmp_path / "s.png"))
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["sample"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    assert "usage: pyro-vae" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'; choose from: digits"),
        (["train", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "does not exist"),
        (["train", "--prior", "mog:x"], "prior 'mog:x': K='x' must be a whole number >= 1"),
        (["train", "--epochs", "0"], "train.epochs must be >= 1"),
        (["train", "--set", "train.lr=fast"], "train.lr must be of type float"),
        (["train", "missing.toml"], "config file missing.toml does not exist"),
        (["train", "--hidden", "4x"], "expected sizes like 400,200"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["evaluate", "/no/such/run"], "no checkpoint at"),
        (["sample", "/no/such/run"], "no checkpoint at"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(args, message, capsys, tmp_path):
    out = ["--out", str(tmp_path / "run")] if args[0] == "train" else []
    assert exit_code([*args, *out]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_console_error_from_a_real_process_has_no_traceback(tmp_path):
    result = run_cli("train", "--dataset", "nope", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("pyro-vae train: error: unknown dataset 'nope'")
    assert result.stderr.count("\n") == 1
