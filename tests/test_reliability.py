"""Crash safety, exact resume, numerical faults, safe loading and bad input."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_vae import PyroVAEError, architectures, estimators, guides, likelihoods, priors, train
from pyro_vae.cli import main
from pyro_vae.components.likelihoods import BernoulliLikelihood
from pyro_vae.config import Config, apply_overrides, from_dict, to_dict, validate
from pyro_vae.inference.divergence import TrainingDiverged
from pyro_vae.training.runs import load_checkpoint, load_run, read_metrics
from pyro_vae.training.train import resume

from .helpers import small_config


def final_parameters(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def assert_same_parameters(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("elbo", ["trace", "scorefn"])
def test_two_epochs_then_resume_two_equals_four_straight(elbo, tmp_path):
    train(small_config(train={"epochs": 4}, inference={"elbo": elbo}), tmp_path / "a")
    train(small_config(train={"epochs": 2}, inference={"elbo": elbo}), tmp_path / "b")
    resume(tmp_path / "b", epochs=4)
    assert_same_parameters(final_parameters(tmp_path / "a"), final_parameters(tmp_path / "b"))
    assert [m["epoch"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]


# Run the CLI in a child process that stalls at one event and says so by creating a
# marker file: "step:E:S" (before step S of epoch E), "metrics:N" or "checkpoint:N" (inside
# the N-th fsync of metrics.jsonl, or of a checkpoint's temporary file: written, not yet
# renamed), or "-" (never).
HARNESS = """
import os, signal, sys
event, marker = sys.argv[1], sys.argv[2]

def stall():  # until killed
    open(marker, "w").close()
    signal.pause()

kind, *where = event.split(":")
if kind == "step":
    from pyro_vae.inference.divergence import Guard
    real_step = Guard.step
    def step(self, fn, *args, epoch, step):
        if (epoch, step) == tuple(map(int, where)):
            stall()
        return real_step(self, fn, *args, epoch=epoch, step=step)
    Guard.step = step
elif kind in ("metrics", "checkpoint"):
    name = {"metrics": "metrics.jsonl", "checkpoint": ".checkpoint.pt."}[kind]
    real_fsync, seen = os.fsync, [0]
    def fsync(fd):
        real_fsync(fd)
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            seen[0] += 1
            if seen[0] == int(where[0]):
                stall()
    os.fsync = fsync
from pyro_vae.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _wait_for(predicate, timeout=1800):
    """Until ``predicate()``; the limit only keeps a stuck child from hanging the suite."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the child process made no progress in 30 minutes"
        time.sleep(0.02)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to spot the writes")
def test_sigkill_at_every_kind_of_moment_leaves_a_loadable_run_that_resumes_exactly(tmp_path):
    epochs = 12
    flags = ["--epochs", str(epochs), "--hidden", "400", "--latent-dim", "16", "--quiet"]
    assert main(["train", *flags, "--out", str(tmp_path / "straight")]) == 0
    run = tmp_path / "killed"
    events = [
        "step:3:5",  # in the middle of an epoch
        "metrics:2",  # an epoch recorded, its checkpoint not yet written
        "step:6:1",  # at the start of an epoch
        "checkpoint:1",  # inside a checkpoint write
        "checkpoint:2",
    ]
    for attempt, event in enumerate(events):
        marker = tmp_path / f"stalled-{attempt}"
        first = ["train", *flags, "--out", str(run)]
        args = first if attempt == 0 else ["train", "--resume", str(run), "--quiet"]
        child = subprocess.Popen(
            [sys.executable, "-c", HARNESS, event, str(marker), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda c=child, m=marker: m.exists() or c.poll() is not None)
        assert child.poll() is None, f"the child ended before {event}"
        child.send_signal(signal.SIGKILL)
        child.wait()
        # Whatever the moment, the run folder stays loadable.
        checkpoint = load_checkpoint(run / "checkpoint.pt")
        assert checkpoint["epoch"] <= len(read_metrics(run))
        load_run(run)
    assert list(run.glob(".*.tmp")), "the last kill landed inside a checkpoint write"

    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert not list(run.glob(".*.tmp"))
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, epochs + 1))
    assert_same_parameters(final_parameters(tmp_path / "straight"), final_parameters(run))


def _poison_after(monkeypatch, calls, how):
    """Make the Bernoulli likelihood go bad from its ``calls``-th use on."""
    original = BernoulliLikelihood.forward
    count = {"n": 0}

    def forward(self, logits):
        count["n"] += 1
        if count["n"] >= calls:
            logits = how(logits)
        return original(self, logits)

    monkeypatch.setattr(BernoulliLikelihood, "forward", forward)


def _nan_gradient(logits):
    """Finite in value, NaN in gradient: d sqrt(u)/du at u = 0 is infinite, times 0."""
    return logits + 0 * torch.sqrt(logits - logits)


@pytest.mark.parametrize(
    "how, validate, message",
    [
        (
            lambda logits: logits * float("nan"),
            True,
            "the loss became NaN or infinite at epoch 3 step 5",
        ),
        # A NaN gradient makes Adam's update, so the parameters, NaN. The next step's loss
        # shows it, or with Pyro's validation on, its refusal of NaN distribution arguments.
        (_nan_gradient, False, "the loss became NaN or infinite at epoch 3 step 6"),
        (_nan_gradient, True, "the parameters became NaN or infinite before epoch 3 step 6"),
    ],
)
@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_stops_training_with_epoch_and_step_and_keeps_the_last_checkpoint(
    how, validate, message, tmp_path, monkeypatch
):
    # 1500 digits at batch 64: 24 steps per epoch, then two calls after it: the ELBO's
    # terms on 297 training images (as many as the test set has) and the test ELBO.
    _poison_after(monkeypatch, 2 * 26 + 5, how)
    with pytest.raises(TrainingDiverged) as error:
        train(small_config(train={"epochs": 5, "validate": validate}), tmp_path / "run")
    assert message in str(error.value)
    assert "the checkpoint of epoch 2" in str(error.value) and "\n" not in str(error.value)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


@pytest.mark.parametrize("estimator, step", [("tail:2", 5), ("trace", 24)])
@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_parameters_gone_bad_are_caught_before_the_epoch_is_saved(
    estimator, step, tmp_path, monkeypatch
):
    """No loss shows it (tail's is no bound, or the epoch's last step): the epoch's check does."""
    _poison_after(monkeypatch, 26 + step, _nan_gradient)
    config = small_config(train={"epochs": 3, "validate": False}, inference={"elbo": estimator})
    with pytest.raises(TrainingDiverged) as error:
        train(config, tmp_path / "run")
    assert "the parameters became NaN or infinite in epoch 2" in str(error.value)
    assert "the checkpoint of epoch 1" in str(error.value)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_exits_with_code_3_from_the_cli(tmp_path, monkeypatch, capsys):
    _poison_after(monkeypatch, 3, lambda logits: logits * float("nan"))
    code = main(
        ["train", "--epochs", "2", "--hidden", "16", "--out", str(tmp_path / "r"), "--quiet"]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "became NaN or infinite at epoch 1 step 3; before any checkpoint was written" in err
    assert not (tmp_path / "r").exists(), "a run that saved nothing leaves no folder"


@pytest.mark.parametrize("clip_grad, expected", [(0.0, []), (2.5, [2.5] * 24)])
def test_clip_grad_clips_the_global_gradient_norm_of_every_step(
    clip_grad, expected, tmp_path, monkeypatch
):
    """--clip-grad reaches the optimizer, which clips every step (the clipping itself:
    tests/test_optim.py)."""
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    config = small_config(train={"clip_grad": clip_grad, "epochs": 1})
    train(config, tmp_path / "run")
    assert calls == expected  # 1,500 digits at batch 64: 24 steps


@pytest.fixture
def run_with_checkpoint(tmp_path):
    train(small_config(train={"epochs": 1}), tmp_path / "run")
    return tmp_path / "run"


def test_truncated_checkpoint_is_refused_with_our_message(run_with_checkpoint, capsys):
    path = run_with_checkpoint / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PyroVAEError, match="corrupt or truncated"):
        load_run(run_with_checkpoint)
    assert main(["evaluate", str(run_with_checkpoint)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_a_pickled_callable_is_refused(run_with_checkpoint):
    path = run_with_checkpoint / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    checkpoint["extra"] = Payload()
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(PyroVAEError, match="holds more than tensors and plain data"):
        load_run(run_with_checkpoint)


def test_foreign_files_and_other_configs_are_refused(run_with_checkpoint, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(PyroVAEError, match="is not a pyro-vae checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    config_file = run_with_checkpoint / "config.toml"
    config_file.write_text(config_file.read_text().replace("latent_dim = 8", "latent_dim = 9"))
    with pytest.raises(PyroVAEError, match="is from another config"):
        resume(run_with_checkpoint)
    with pytest.raises(PyroVAEError, match="is not a run folder"):
        resume(tmp_path / "nowhere")


def test_resume_refuses_other_settings(run_with_checkpoint, capsys):
    assert main(["train", "--resume", str(run_with_checkpoint), "--lr", "0.1"]) == 2
    assert "only --epochs may change" in capsys.readouterr().err


REGISTRIES = [priors, likelihoods, guides, estimators, architectures]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=24))
def test_random_spec_strings_parse_or_raise_our_error(spec):
    for registry in REGISTRIES:
        try:
            registry.parse(spec)
        except PyroVAEError:
            pass


FIELDS = {name: list(values) for name, values in to_dict(Config()).items()}
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["mog:3", "iwae:0", "renyi:1:2", "vamp:x", "cuda:9", "auto", "mnist"]),
    st.lists(st.integers(min_value=-5, max_value=10**30), max_size=3),
    st.lists(st.text(max_size=5), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
TREES = st.dictionaries(
    st.sampled_from([*FIELDS, "extra"]),
    st.one_of(
        VALUES,
        st.dictionaries(
            st.sampled_from([k for keys in FIELDS.values() for k in keys] + ["bogus"]),
            VALUES,
            max_size=4,
        ),
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(TREES)
def test_random_config_trees_validate_or_raise_our_error(tree):
    try:
        validate(from_dict(tree))
    except PyroVAEError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(
                lambda section, key, value: f"{section}.{key}={value}",
                st.sampled_from([*FIELDS, "x"]),
                st.sampled_from([k for keys in FIELDS.values() for k in keys] + ["y"]),
                st.one_of(st.text(max_size=10), st.integers().map(str), st.floats().map(str)),
            ),
        ),
        max_size=3,
    )
)
def test_random_set_overrides_validate_or_raise_our_error(assignments):
    try:
        validate(apply_overrides(Config(), assignments))
    except PyroVAEError:
        pass


@pytest.mark.parametrize(
    "tree",
    [{"train": {"epochs": "x"}}, {"model": {"hidden": [0]}}, {"data": {"dataset": "cifar"}}],
)
def test_config_errors_are_our_error_in_one_line(tree):
    with pytest.raises(PyroVAEError) as error:
        validate(from_dict(tree))
    assert "\n" not in str(error.value)


def test_other_draws_from_numpys_global_generator_leave_training_unchanged(tmp_path, monkeypatch):
    train(small_config(train={"epochs": 2}), tmp_path / "a")
    original = BernoulliLikelihood.forward

    def forward(self, logits):
        np.random.random(7)  # a plugin or a notebook using NumPy's generator mid-run
        return original(self, logits)

    monkeypatch.setattr(BernoulliLikelihood, "forward", forward)
    train(small_config(train={"epochs": 2}), tmp_path / "b")
    assert_same_parameters(final_parameters(tmp_path / "a"), final_parameters(tmp_path / "b"))


def test_evaluate_refuses_a_k_that_would_take_more_than_a_day(run_with_checkpoint, capsys):
    summary = (run_with_checkpoint / "summary.json").read_bytes()
    assert main(["evaluate", str(run_with_checkpoint), "--iw-samples", str(10**12)]) == 2
    err = capsys.readouterr().err
    assert "log p(x) with K=1,000,000,000,000 samples on 297 images would take about" in err
    assert (run_with_checkpoint / "summary.json").read_bytes() == summary, "nothing written"


def test_ctrl_c_during_evaluate_exits_130_and_writes_nothing(
    run_with_checkpoint, capsys, monkeypatch
):
    import importlib

    evaluate_module = importlib.import_module("pyro_vae.evaluation.evaluate")
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "log_weights", interrupted)
    summary = (run_with_checkpoint / "summary.json").read_bytes()
    assert main(["evaluate", str(run_with_checkpoint)]) == 130
    assert calls and "interrupted" in capsys.readouterr().err
    assert (run_with_checkpoint / "summary.json").read_bytes() == summary


def test_a_batch_larger_than_the_data_says_what_was_used(tmp_path, caplog):
    config = small_config(train={"epochs": 1, "batch_size": 10**8})
    with caplog.at_level("WARNING", logger="pyro_vae"):
        summary = train(config, tmp_path / "run")
    assert "--batch-size 100000000 is more than the 1500 training images" in caplog.text
    assert summary["batch_size"] == 1500


def test_a_checkpoint_from_before_the_data_generator_resumes(run_with_checkpoint):
    """Older checkpoints hold NumPy's global state, which was then the binarization's."""
    path = run_with_checkpoint / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    del checkpoint["rng"]["data"]
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path.write_bytes(buffer.getvalue())
    summary = resume(run_with_checkpoint, epochs=2)
    assert summary["epochs"] == 2


def test_a_run_from_before_newer_config_fields_resumes(run_with_checkpoint):
    """Fields added since a run was written (here this release's Adam betas and M2's
    schedule) take their defaults, in its config.toml and its checkpoint alike."""
    path = run_with_checkpoint / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    for section, key in (("train", "beta1"), ("train", "beta2"), ("semi", "schedule")):
        del checkpoint["config"][section][key]
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path.write_bytes(buffer.getvalue())
    toml = run_with_checkpoint / "config.toml"
    toml.write_text("\n".join(line for line in toml.read_text().splitlines() if "beta" not in line))
    assert resume(run_with_checkpoint, epochs=2)["epochs"] == 2


def test_losses_left_on_the_device_are_read_every_n_steps_and_name_the_bad_step():
    """The traced step returns its loss as a tensor: the guard reads them every ``every``
    steps (and at the epoch's end, before anything is evaluated or saved), sums them as the
    eager floats are summed, and names the first bad step when it reads it."""
    from pyro_vae.inference.divergence import Guard

    reads = []

    def steps(values, every, bad=None):
        guard = Guard([torch.zeros(3)], Path("run"), 0, every=every)
        for step, value in enumerate(values, 1):
            loss = torch.tensor(float("nan") if step == bad else value)
            guard.step(lambda x: x, loss, epoch=1, step=step)
            reads.append(len(guard._pending))
        return guard

    values = [0.1 * i for i in range(1, 13)]
    guard = steps(values, every=5)
    guard.end_of_epoch(1)
    eager = sum(torch.tensor(v).item() for v in values)  # what the eager loop sums
    assert guard.epoch_loss() == eager  # the same floats, in the same order
    assert reads == [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2], "read at steps 5 and 10"
    with pytest.raises(TrainingDiverged, match="the loss became NaN or infinite at epoch 1 step 7"):
        steps(values, every=5, bad=7)
    guard = steps(values, every=5, bad=12)  # the last step: not read yet
    with pytest.raises(TrainingDiverged, match="at epoch 1 step 12"):
        guard.end_of_epoch(1)
