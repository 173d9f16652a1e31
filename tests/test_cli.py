"""The pyro-vae command line: end to end, --help, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from pyro_vae.cli import build_parser, main

from .helpers import run_cli


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
    summary = json.loads((run / "summary.json").read_text())
    last = trained.stdout.splitlines()[-1]
    assert last == (
        f"test ELBO {summary['test_elbo']:.2f} (recon {summary['test_recon']:.2f}, KL "
        f"{summary['test_kl']:.2f})  log p(x) {summary['log_px']:.2f} ± "
        f"{summary['log_px_se']:.2f} (K=100) nats/image"
    )

    # Seeded like the training run's own figures: the same numbers, every time.
    evaluated = run_cli("evaluate", str(run), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert (result["test_elbo"], result["log_px"]) == (summary["test_elbo"], summary["log_px"])

    evaluated = run_cli("evaluate", str(run), "--iw-samples", "50", "--seed", "3")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.endswith("(K=50) nats/image  [seed 3]\n")
    after = json.loads((run / "summary.json").read_text())
    assert {k: after[k] for k in summary} == summary, "the training run's figures stay"
    assert [(e["iw_samples"], e["seed"]) for e in after["evaluations"]] == [(100, 0), (50, 3)]

    sampled = run_cli("sample", str(run), "-n", "16", "--out", str(tmp_path / "s.png"))
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_quiet_prints_the_final_summary_line_only_and_warnings_on_stderr(tmp_path, capsys):
    args = ["train", "--epochs", "3", "--hidden", "16", "--quiet", "--out", str(tmp_path / "r")]
    assert main([*args, "--batch-size", "100000"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert len(out) == 1 and out[0].startswith("test ELBO")
    assert "--batch-size 100000 is more than the 1500 training images" in captured.err


def test_help_imports_neither_torch_nor_pyro():
    """pyro-vae --help took 2.2 s and 0.69 GB when they were imported up front."""
    code = "import sys; from pyro_vae.cli import build_parser; build_parser(); "
    code += "print(sorted({'torch', 'pyro'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


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
        (["train", "--denormals", "slow"], "train.denormals must be one of flush, keep"),
        (["train", "--set", "train.lr=fast"], "train.lr must be of type float"),
        (["train", "missing.toml"], "config file missing.toml does not exist"),
        (["train", "--hidden", "4x"], "expected sizes like 400,200"),
        (["train", "--hidden", "400,,200"], "expected sizes like 400,200, got '400,,200'"),
        (["train", "--set", "model.hidden=400,,200"], "model.hidden must be of type list"),
        (["train", "--seed", str(2**32)], "train.seed must be in 0 .. 4294967295"),
        (["train", "--epochs", str(2**70)], "train.epochs is too large"),
        (["train", "--latent-dim", "1000000000"], "the model (--latent-dim 1000000000, "),
        (["train", "--iw-samples", str(10**12)], "samples on 297 images would take about"),
        (["train", "--prior", "studentt:5"], "(components from a plugin need --plugin FILE)"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["evaluate", "/no/such/run"], "no checkpoint at"),
        (["sample", "/no/such/run"], "no checkpoint at"),
        (["sample", "/no/such/run", "-n", "100000000000"], "-n must be between 1 and 10000"),
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


DEFAULTS = {
    "--dataset": "digits", "--binarize": "dynamic", "--model": "vae", "--arch": "mlp",
    "--hidden": "400", "--latent-dim": "50", "--prior": "normal", "--likelihood": "bernoulli",
    "--guide": "normal", "--particles": "1", "--iw-samples": "100", "--epochs": "10",
    "--batch-size": "128", "--lr": "0.001; m2, m1m2, adgm: 0.003", "--seed": "0", "--device": "cpu",
    "--checkpoint-every": "1", "--labeled": "100", "--aux-weight": "5000",
    "--labelled-schedule": "proportional", "--denormals": "flush",
}  # fmt: skip


@pytest.mark.parametrize(
    "command, expected",
    [
        ("train", {**DEFAULTS, "--elbo": "trace"}),
        ("compare", {**DEFAULTS, "--snr-repeats": "100"}),
    ],
)
def test_help_shows_every_default(command, expected):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    entries = {
        option: " ".join(parser._get_formatter()._format_action(action).split())
        for action in parser._actions
        for option in action.option_strings
    }
    for flag, default in expected.items():
        assert f"(default: {default})" in entries[flag], (command, flag, entries[flag])


def test_a_continuous_likelihood_run_says_its_elbo_is_a_density(tmp_path, capsys):
    args = ["train", "--likelihood", "cbernoulli", "--binarize", "none", "--epochs", "2"]
    assert main([*args, "--hidden", "16", "--quiet", "--out", str(tmp_path / "r")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("nats/image (densities of continuous pixel values: above 0 is possible)")
