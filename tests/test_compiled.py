"""--compile: the SVI step traced into one graph per batch shape gives Pyro's eager numbers."""

import contextlib
import dataclasses
import logging

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_vae import VAE, ImageBatches, estimators, load_dataset, train
from pyro_vae.inference.optim import Adam
from pyro_vae.training.compiled import CapturedStep, TracedStep, traced_step
from pyro_vae.training.runs import load_checkpoint, read_metrics
from pyro_vae.training.train import resume

from .helpers import small_config


@pytest.fixture(scope="module")
def data():
    return ImageBatches(load_dataset("digits"))


@pytest.fixture(autouse=True)
def unvalidated():
    """Pyro's validation reads values on the host; the traced step has none, nor may eager."""
    with pyro.validation_enabled(False):
        yield


def _steps(make_step, vae, data, sizes, seed=1):
    """Losses of steps on batches of ``sizes`` images, the draws seeded, and the final
    parameters."""
    pyro.set_rng_seed(seed)
    data.rng.seed(seed)  # the binarization's own generator
    step = make_step(vae)
    losses = [float(step(data.batch(torch.arange(n)))) for n in sizes]
    return losses, [p.detach().clone() for p in vae.parameters()]


def _eager(spec):
    def make(vae):
        pyro.clear_param_store()
        elbo = estimators.build(spec, num_particles=1, data_dim=vae.data_dim)
        return SVI(vae.model, vae.guide, Adam(1e-2), loss=elbo).step

    return make


def _traced(spec):
    def make(vae):
        pyro.clear_param_store()
        elbo = estimators.build(spec, num_particles=1, data_dim=vae.data_dim)
        return TracedStep(vae, elbo, Adam(1e-2), "trace")

    return make


COMPONENTS = [
    {},
    {"prior": "normal-learned"},
    {"prior": "mog:3"},
    {"prior": "vamp:4"},
    {"prior": "flow:1"},
    {"likelihood": "cbernoulli"},
    {"likelihood": "gaussian"},
    {"likelihood": "laplace"},
    {"guide": "lowrank:2"},
    {"guide": "iaf:1"},
]


CASES = [("trace", c) for c in COMPONENTS] + [("meanfield", {}), ("dreg:3", {})]


@pytest.mark.parametrize(
    "spec, components", CASES, ids=[f"{s}-{'-'.join(c.values()) or 'default'}" for s, c in CASES]
)
def test_the_traced_step_takes_the_eager_steps_bit_for_bit(spec, components, data):
    """Each estimator it traces with the default components; each component with trace."""
    runs = []
    for make in (_eager(spec), _traced(spec)):
        pyro.set_rng_seed(0)
        vae = VAE((8, 8), latent_dim=4, hidden=(16,), **components)
        runs.append(_steps(make, vae, data, [64, 64, 64]))
    (eager_losses, eager_params), (traced_losses, traced_params) = runs
    # Pyro's eager loss adds the sites' log-densities as Python floats, the graph as float32
    # tensors: the values agree to float32's precision, the gradients (so the steps) exactly.
    assert traced_losses == pytest.approx(eager_losses, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, traced_params, strict=True))


@pytest.mark.parametrize("spec", ["iwae:3", "renyi:0.5:3"])
def test_the_traced_renyi_step_takes_pyros_eager_steps(spec, data):
    """Eager steps are Pyro's RenyiELBO, the traced one its differentiable loss: the same
    draws and losses; the parameters agree to float32 rounding after three Adam steps
    (the gradient is autograd's of a log-sum-exp, not Pyro's surrogate)."""
    runs = []
    for make in (_eager(spec), _traced(spec)):
        pyro.set_rng_seed(0)
        vae = VAE((8, 8), latent_dim=4, hidden=(16,), guide="iaf:1")
        runs.append(_steps(make, vae, data, [64, 64, 64]))
    (eager_losses, eager_params), (traced_losses, traced_params) = runs
    assert traced_losses == pytest.approx(eager_losses, rel=1e-6)
    for a, b in zip(traced_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # one Adam step moves 1e-2


def test_a_new_batch_shape_is_traced_again_and_stays_exact(data):
    runs = []
    for make in (_eager("trace"), _traced("trace")):
        pyro.set_rng_seed(0)
        vae = VAE((8, 8), latent_dim=4, hidden=(16,))
        runs.append(_steps(make, vae, data, [64, 28, 64, 28]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    step = _traced("trace")(vae)
    for n in (64, 28, 64):
        step(data.batch(torch.arange(n)))
    assert len(step.graphs) == 2


def _matches_eager_and_resumes(tmp_path, mode, bound="train_elbo", resumes=True, **sections):
    """A run with ``--compile mode`` ends where the eager run ends, and one resumed after
    2 of its 3 epochs ends where it ends."""

    def config(epochs, compile):
        train_section = {"epochs": epochs, "compile": compile, "validate": False}
        return small_config(train={**train_section, **train_options}, **sections)

    train_options = sections.pop("train", {})

    eager = train(config(3, "none"), tmp_path / "eager")
    compiled = train(config(3, mode), tmp_path / "compiled")
    assert compiled["test_elbo"] == eager["test_elbo"] and compiled["log_px"] == eager["log_px"]
    # The replayed losses stay tensors until the guard reads them, every step of each epoch
    # counted (the graph's loss is float32, Pyro's eager one a sum of Python floats).
    bounds = [[m[bound] for m in read_metrics(tmp_path / r)] for r in ("eager", "compiled")]
    assert bounds[1] == pytest.approx(bounds[0], rel=1e-6)
    if not resumes:
        return
    train(config(2, mode), tmp_path / "resumed")
    resume(tmp_path / "resumed", epochs=3)
    a = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["epoch"] for m in read_metrics(tmp_path / "resumed")] == [1, 2, 3]


def test_a_compiled_run_matches_the_eager_run_and_resumes_exactly(tmp_path):
    _matches_eager_and_resumes(tmp_path, "trace")


class HostReadingPrior(torch.nn.Module):
    """A plugin's prior that reads a value on the host: it cannot be traced."""

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self):
        scale = 1.0 if self.loc.abs().max().item() < 1e6 else 2.0
        return pyro.distributions.Normal(self.loc, scale).to_event(1)


def test_an_untraceable_plugin_falls_back_to_eager_with_a_notice_naming_it(data, caplog):
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,), prior=HostReadingPrior(4))
    elbo = estimators.build("trace", num_particles=1, data_dim=64)
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        step = traced_step(vae, elbo, Adam(1e-2), "trace", (data.batch(torch.arange(64)),), "trace")
    assert step is None
    assert "could not trace VAE's step" in caplog.text
    assert "test_compiled.py" in caplog.text and "(forward)" in caplog.text, caplog.text
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        assert traced_step(vae, elbo, Adam(1e-2), "trace", (), "tail:3") is None
    assert "estimator tail:3 cannot be traced" in caplog.text


SEMI_CASES = [
    ("m2", "every-step", "trace"),
    ("m2", "interleave", "trace"),
    ("adgm", "proportional", "trace"),
    ("m2", "every-step", "cudagraph"),  # captured with the CPU stand-in below
]


@pytest.mark.parametrize("kind, schedule, mode", SEMI_CASES)
def test_semi_supervised_steps_traced_give_the_eager_run(
    kind, schedule, mode, tmp_path, caplog, request
):
    """M2 and the ADGM sum y out with Pyro's TraceEnum_ELBO; traced, with Enum_ELBO's
    traceable loss, in every schedule's steps (unlabelled, labelled, both, scaled), and
    M2's three kinds of step each captured."""
    if mode == "cudagraph":
        request.getfixturevalue("cpu_capture")

    def config(mode):
        return small_config(
            model={"kind": kind},
            semi={"schedule": schedule},
            train={"epochs": 2, "compile": mode, "validate": False},
        )

    eager = train(config("none"), tmp_path / "eager")
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        traced = train(config(mode), tmp_path / "traced")
    done = "captured" if mode == "cudagraph" else "traced"
    assert f"{done} the training step" in caplog.text and "eagerly" not in caplog.text
    assert "uncaptured" not in caplog.text
    for key in ("test_accuracy", "test_elbo", "train_loss"):
        assert traced[key] == pytest.approx(eager[key], rel=1e-6), key


def _cpu_capture(fn, device, kept=contextlib.nullcontext):
    """A CPU stand-in for ``cuda_graph``: capturing runs nothing that lasts (the draws made
    while recording are put back, and what the run wrote in place), and each replay
    overwrites the same output tensors, as a CUDA graph's replay does."""
    with torch.random.fork_rng(), kept():
        loss, grads = fn()

    def replay():
        new_loss, new_grads = fn()
        loss.copy_(new_loss)
        for out, new in zip(grads, new_grads, strict=True):
            out.copy_(new)

    return replay, (loss, grads)


@pytest.fixture
def cpu_capture(monkeypatch):
    """``--compile cudagraph`` captures on the CPU, with the stand-in."""
    monkeypatch.setattr(CapturedStep, "capturable", lambda self, device: True)
    monkeypatch.setattr(CapturedStep, "capture_with", staticmethod(_cpu_capture))


def _captured(spec, mode="cudagraph"):
    def make(vae):
        pyro.clear_param_store()
        elbo = estimators.build(spec, num_particles=1, data_dim=vae.data_dim)
        return CapturedStep(vae, elbo, Adam(1e-2), mode)

    return make


CAPTURED = [("trace", {}), ("trace", {"guide": "iaf:1"}), ("trace", {"prior": "vamp:4"})]
CAPTURED += [("meanfield", {}), ("dreg:3", {})]


@pytest.mark.parametrize(
    "spec, components",
    CAPTURED,
    ids=[f"{s}-{'-'.join(c.values()) or 'default'}" for s, c in CAPTURED],
)
def test_the_captured_step_replays_the_eager_steps_bit_for_bit(spec, components, data, cpu_capture):
    """Batches copied into the capture's buffers, the replayed gradients applied, each
    loss copied out before the next replay overwrites it, a graph per batch shape."""
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,), **components)
    eager_losses, eager_params = _steps(_eager(spec), vae, data, [64, 28, 64, 28])
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,), **components)
    pyro.set_rng_seed(1)
    data.rng.seed(1)
    step = _captured(spec)(vae)
    losses = [step(data.batch(torch.arange(n))) for n in (64, 28, 64, 28)]  # read at the end
    assert [float(v) for v in losses] == pytest.approx(eager_losses, rel=1e-6)
    params = [p.detach() for p in vae.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(eager_params, params, strict=True))
    assert len(step.captures) == 2 and all(step.captures.values())
    assert all(c.update is not None for c in step.captures.values()), "Adam in the graph"


def test_adam_outside_the_captured_graph_takes_the_same_steps(data, cpu_capture):
    """As under torchrun, whose gradients are averaged before Adam."""
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    eager_losses, eager_params = _steps(_eager("trace"), vae, data, [64, 28, 64])

    made = []

    def outside(vae):
        pyro.clear_param_store()
        elbo = estimators.build("trace", num_particles=1, data_dim=vae.data_dim)
        made.append(CapturedStep(vae, elbo, Adam(1e-2), "cudagraph", adam_inside=False))
        return made[0]

    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    losses, params = _steps(outside, vae, data, [64, 28, 64])
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, params, strict=True))
    assert all(c is not None and c.update is None for c in made[0].captures.values())


@pytest.mark.parametrize("schedule", ["exponential:0.5", "onecycle:0.05"])
def test_a_captured_run_under_a_learning_rate_schedule_matches_eager_and_resumes(
    schedule, tmp_path, cpu_capture, caplog
):
    """A graph holds Adam's learning rate: captured again when an epoch's schedule moves
    it; a schedule that moves it every step keeps Adam out of the graph. (A one-cycle
    schedule spans the run's epochs: no resumed run may extend it.)"""
    per_epoch = schedule.startswith("exponential")
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        _matches_eager_and_resumes(
            tmp_path, "cudagraph", resumes=per_epoch, train={"lr_schedule": schedule}
        )
    assert "captured the training step" in caplog.text and "uncaptured" not in caplog.text
    assert ("with Adam's update" in caplog.text) == per_epoch


def test_inductors_kernels_captured_replay_the_eager_steps(data, cpu_capture):
    """``inductor-cudagraph``: the compiled graph is what is captured. Inductor fuses and
    reorders float arithmetic, so the steps agree to rounding, not bit for bit."""
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    eager_losses, eager_params = _steps(_eager("trace"), vae, data, [64, 28, 64])
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    pyro.set_rng_seed(1)
    data.rng.seed(1)
    step = _captured("trace", "inductor-cudagraph")(vae)
    losses = [step(data.batch(torch.arange(n))) for n in (64, 28, 64)]
    assert [float(v) for v in losses] == pytest.approx(eager_losses, rel=1e-5)
    params = [p.detach() for p in vae.parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager_params, params, strict=True))
    assert len(step.captures) == 2 and all(step.captures.values())
    assert all(hasattr(g, "_torchdynamo_orig_callable") for g in step.graphs.values())


@pytest.mark.parametrize("in_graph", [False, True], ids=["batch-copied-in", "batch-in-graph"])
def test_a_captured_run_matches_the_eager_run_and_resumes_exactly(
    in_graph, tmp_path, cpu_capture, caplog, monkeypatch
):
    """With KL warm-up, whose weight (a buffer the graph reads) changes every step; the
    batch copied into the graph's buffer, or gathered and binarized in the graph from
    the step's indices (as on a GPU, where the batches are drawn on the device; here the
    stand-in replays the CPU's draws in the same order)."""
    monkeypatch.setattr(CapturedStep, "batches_capturable", staticmethod(lambda data: in_graph))
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        _matches_eager_and_resumes(
            tmp_path, "cudagraph", "train_objective", inference={"kl_warmup": 2}
        )
    assert "captured the training step" in caplog.text and "uncaptured" not in caplog.text
    assert ("with its batch" in caplog.text) == in_graph


def test_batches_join_the_graph_only_where_they_are_drawn_on_the_device(monkeypatch):
    """On a CPU NumPy draws the noise; float intensities draw theirs on the host even on
    a GPU (a graph would replay one draw at every step); M2's batches stay outside."""
    from unittest import mock

    from pyro_vae import SSVAE, Config
    from pyro_vae.training import distributed
    from pyro_vae.training.loop import _batches_in_graph

    digits = load_dataset("digits")
    floats = dataclasses.replace(
        digits,
        levels=None,
        train_images=digits.train_images / 16.0,
        test_images=digits.test_images / 16.0,
    )
    assert not ImageBatches(digits).draws_on_device
    on_gpu = mock.patch.object(
        ImageBatches, "device", new_callable=mock.PropertyMock, return_value=torch.device("cuda")
    )
    with on_gpu:
        assert ImageBatches(digits, "dynamic").draws_on_device
        assert ImageBatches(digits, "static").draws_on_device
        assert ImageBatches(floats, "none").draws_on_device
        assert not ImageBatches(floats, "dynamic").draws_on_device
    config = Config()
    config.train.compile = "cudagraph"
    monkeypatch.setattr(CapturedStep, "batches_capturable", staticmethod(lambda data: True))
    vae, m2, one = VAE((8, 8)), SSVAE((8, 8)), distributed.World()
    assert _batches_in_graph(vae, None, config, one) and not _batches_in_graph(
        m2, None, config, one
    )
    config.train.compile = "inductor"
    assert not _batches_in_graph(vae, None, config, one)


def test_cudagraph_on_a_cpu_replays_the_traced_step_with_a_notice(tmp_path, caplog):
    def config(mode):
        return small_config(train={"epochs": 2, "compile": mode, "validate": False})

    traced = train(config("trace"), tmp_path / "traced")
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        captured = train(config("cudagraph"), tmp_path / "captured")
    assert "CUDA graphs need a CUDA device" in caplog.text
    assert captured["test_elbo"] == traced["test_elbo"]


def test_a_failed_capture_replays_uncaptured_with_a_notice_naming_the_shape(
    data, monkeypatch, caplog
):
    def refuse(fn, device, kept=None):
        """As a CUDA capture fails: capture_end's error raised over the kernel's."""
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904

    monkeypatch.setattr(CapturedStep, "capturable", lambda self, device: True)
    monkeypatch.setattr(CapturedStep, "capture_with", staticmethod(refuse))
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    eager_losses, eager_params = _steps(_eager("trace"), vae, data, [64, 64])
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        losses, params = _steps(_captured("trace"), vae, data, [64, 64])
    assert "could not capture VAE's step for batches of shape [(64, 64)]" in caplog.text
    assert "RuntimeError at test_compiled.py" in caplog.text and "(refuse)" in caplog.text
    assert "operation not permitted" in caplog.text and caplog.text.count("could not capture") == 1
    assert "previous error" not in caplog.text
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, params, strict=True))
