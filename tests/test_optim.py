"""The Adam that SVI steps with: PyTorch's functional Adam, fused or not, global-norm clipping."""

import inspect

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import PyroOptim
from torch.optim.adam import adam as functional_adam

from pyro_vae import VAE
from pyro_vae.inference import optim
from pyro_vae.inference.optim import Adam


def test_the_private_names_it_reads_are_still_there():
    """``torch.optim.adam.adam`` and Pyro's hand-over of saved state are not public API."""
    names = list(inspect.signature(functional_adam).parameters)
    positional = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"]
    assert names[:6] == positional
    keywords = {"foreach", "fused", "amsgrad", "beta1", "beta2", "lr", "weight_decay", "eps"}
    assert keywords <= set(names)
    pyros = PyroOptim(torch.optim.Adam, {"lr": 1.0})
    pyros.set_state({"w": {"step": 3}})
    assert pyros._state_waiting_to_be_consumed == {"w": {"step": 3}}


def _steps(fused: bool, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(optim, "fused_adam_supported", lambda device: fused)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    x = torch.bernoulli(torch.full((32, 64), 0.4), generator=torch.Generator().manual_seed(1))
    svi = SVI(vae.model, vae.guide, Adam(lr=1e-2), loss=Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    return [p.detach().clone() for p in vae.parameters()]


def test_the_foreach_form_takes_the_steps_of_the_fused_kernel(monkeypatch):
    """Where PyTorch has no fused kernel for the device (the CPU before 2.4)."""
    for a, b in zip(_steps(True, monkeypatch), _steps(False, monkeypatch), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_max_grad_norm_clips_the_global_norm_not_each_parameter():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    pyro.param("a", a), pyro.param("b", b)
    a.grad, b.grad = torch.tensor([6.0, 0.0, 0.0]), torch.tensor([0.0, 8.0])  # global norm 10
    adam = Adam(lr=0.1, max_grad_norm=2.0, betas=(0.5, 0.999))
    adam([a, b])
    # Adam's first moment after one step is (1 - beta1) g: g as clipped.
    clipped = torch.cat([adam.state[a]["exp_avg"], adam.state[b]["exp_avg"]]) / 0.5
    torch.testing.assert_close(clipped, torch.tensor([1.2, 0.0, 0.0, 0.0, 1.6]))
    assert clipped.norm().item() == pytest.approx(2.0)


def test_the_config_betas_reach_adam(monkeypatch):
    from pyro_vae import fit
    from pyro_vae.training import loop

    made = []

    class Recorded(loop.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.betas)

    monkeypatch.setattr(loop, "Adam", Recorded)
    fit(VAE((8, 8), latent_dim=2, hidden=(8,)), "digits", epochs=1, beta1=0.5, beta2=0.99)
    assert made == [(0.5, 0.99)]


def _pyro_reference(options: dict, clip_args: dict | None = None) -> list[torch.Tensor]:
    """The same steps with Pyro's own per-parameter ``torch.optim.Adam``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    x = torch.bernoulli(torch.full((32, 64), 0.4), generator=torch.Generator().manual_seed(1))
    optimizer = pyro.optim.Adam(options, clip_args=clip_args)
    svi = SVI(vae.model, vae.guide, optimizer, loss=Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    return [p.detach().clone() for p in vae.parameters()]


def _ours(adam: Adam) -> list[torch.Tensor]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    x = torch.bernoulli(torch.full((32, 64), 0.4), generator=torch.Generator().manual_seed(1))
    svi = SVI(vae.model, vae.guide, adam, loss=Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    return [p.detach().clone() for p in vae.parameters()]


def test_weight_decay_is_torch_adams_l2_penalty():
    ours = _ours(Adam(lr=1e-2, weight_decay=0.3))
    reference = _pyro_reference({"lr": 1e-2, "weight_decay": 0.3})
    without = _ours(Adam(lr=1e-2))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(ours, without, strict=True))


def test_per_parameter_clipping_is_pyros_clip_norm():
    ours = _ours(Adam(lr=1e-2, max_grad_norm_per_param=0.05))
    reference = _pyro_reference({"lr": 1e-2}, clip_args={"clip_norm": 0.05})
    global_norm = _ours(Adam(lr=1e-2, max_grad_norm=0.05))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(ours, global_norm, strict=True))


def _fit_recording(monkeypatch, **settings):
    """fit on the digits, recording the learning rate and beta1 of every Adam update."""
    from pyro_vae import fit

    seen = []
    real = Adam.__call__

    def call(self, params, *args, **kwargs):
        seen.append((self.lr, self.betas[0]))
        return real(self, params, *args, **kwargs)

    monkeypatch.setattr(Adam, "__call__", call)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = VAE((8, 8), latent_dim=2, hidden=(8,))
    return fit(model, "digits", batch_size=300, iw_samples=2, **settings), seen


def _flat(pairs):
    return [v for pair in pairs for v in pair]


def _reference(make, steps: int, per_step: bool, epochs: int, metric=None, lr=1e-3):
    """(lr, beta1) of each step under PyTorch's scheduler on a real torch Adam."""
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make(opt)
    seen = []
    for epoch in range(epochs):
        for _ in range(steps):
            seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
            opt.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step(*([metric[epoch]] if metric else []))
    return seen


def test_onecycle_sets_lr_and_beta1_of_every_step_as_pytorchs_scheduler(monkeypatch):
    from torch.optim.lr_scheduler import OneCycleLR

    result, seen = _fit_recording(monkeypatch, epochs=3, lr_schedule="onecycle:0.01")
    expected = _reference(
        lambda o: OneCycleLR(o, max_lr=0.01, epochs=3, steps_per_epoch=5), 5, True, 3
    )
    assert _flat(seen) == pytest.approx(_flat(expected))
    assert [m["lr"] for m in result.metrics] == pytest.approx([expected[i][0] for i in (4, 9, 14)])


def test_exponential_decays_once_an_epoch(monkeypatch):
    result, seen = _fit_recording(monkeypatch, epochs=3, lr_schedule="exponential:0.5")
    expected = [(1e-3 * 0.5**e, 0.9) for e in range(3) for _ in range(5)]
    assert _flat(seen) == pytest.approx(_flat(expected))
    assert [m["lr"] for m in result.metrics] == pytest.approx([1e-3, 5e-4, 2.5e-4])


def test_plateau_watches_the_validation_elbo_of_the_held_out_images(monkeypatch):
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    fed = []
    real_step = ReduceLROnPlateau.step

    def step(self, metrics, *args, **kwargs):
        fed.append(metrics)
        return real_step(self, metrics, *args, **kwargs)

    monkeypatch.setattr(ReduceLROnPlateau, "step", step)
    result, seen = _fit_recording(
        monkeypatch, epochs=8, lr_schedule="plateau:0.5:1", holdout=300, lr=0.2
    )
    watched = [m["validation_elbo"] for m in result.metrics]
    assert fed == watched
    expected = _reference(
        lambda o: ReduceLROnPlateau(o, mode="max", factor=0.5, patience=1, threshold_mode="abs"),
        *(4, False, 8, watched),
        lr=0.2,
    )
    assert _flat(seen) == pytest.approx(_flat(expected))
    assert len({lr for lr, _ in seen}) > 1, "the rate fell at least once"


def test_holdout_takes_the_same_images_out_of_training_every_run():
    from pyro_vae import ImageBatches, load_dataset
    from pyro_vae.evaluation.evaluate import test_elbo

    dataset = load_dataset("digits")
    a = ImageBatches(dataset, holdout=300, seed=1)
    b = ImageBatches(dataset, holdout=300, seed=2)
    assert a.num_train == 1200 and torch.equal(a.train_index, b.train_index)
    kept = set(a.train_index.tolist())
    held = [i for i in range(1500) if i not in kept]
    assert torch.equal(a.validation_images, a._fixed(torch.tensor(held)))
    assert torch.equal(a.train_images, dataset.train_images[a.train_index])
    assert torch.equal(a.fixed(torch.arange(3)), a._fixed(a.train_index[:3]))

    pyro.clear_param_store()
    torch.manual_seed(0)
    from pyro_vae import fit

    result = fit(VAE((8, 8), latent_dim=2, hidden=(8,)), "digits", epochs=1, holdout=300)
    assert result.metrics[0]["validation_elbo"] == test_elbo(result.model, a.validation_images)


@pytest.mark.parametrize("schedule", ["exponential:0.7", "plateau:0.5:1"])
def test_a_scheduled_run_resumes_exactly(schedule, tmp_path):
    from pyro_vae.training.runs import load_checkpoint, read_metrics
    from pyro_vae.training.train import resume, train

    from .helpers import small_config

    config = small_config(train={"epochs": 4, "lr_schedule": schedule, "lr": 0.02})
    config.data.holdout = 300
    train(config, tmp_path / "a")
    config.train.epochs = 2
    train(config, tmp_path / "b")
    resume(tmp_path / "b", epochs=4)
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.pt") for r in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["schedule"] == b["schedule"]
    lrs = [[m["lr"] for m in read_metrics(tmp_path / r)] for r in "ab"]
    assert lrs[0] == lrs[1]


def test_a_schedule_over_the_whole_run_refuses_more_epochs_on_resume(tmp_path):
    from pyro_vae import PyroVAEError
    from pyro_vae.training.train import resume, train

    from .helpers import small_config

    train(small_config(train={"epochs": 1, "lr_schedule": "cosine"}), tmp_path / "r")
    with pytest.raises(PyroVAEError, match="spans the run's 1 epochs"):
        resume(tmp_path / "r", epochs=2)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "weight_decay", -1.0, "weight_decay must be >= 0"),
        ("train", "clip_grad_per_param", float("nan"), "clip_grad_per_param must be >= 0"),
        ("train", "lr_schedule", "exponential:1.5", "strictly between 0 and 1"),
        ("train", "lr_schedule", "warm", "unknown schedule"),
        ("data", "holdout", -3, "holdout must be >= 0"),
    ],
)
def test_bad_optimizer_settings_are_refused(section, key, value, message):
    from pyro_vae import PyroVAEError
    from pyro_vae.config import validate

    from .helpers import small_config

    with pytest.raises(PyroVAEError, match=message):
        validate(small_config(**{section: {key: value}}))


def test_plateau_without_a_validation_number_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    from pyro_vae.cli import main

    out = tmp_path / "r"
    assert main(["train", "--epochs", "1", "--lr-schedule", "plateau", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hold out training images with --holdout N" in err and err.count("\n") == 1
    assert not out.exists()


def test_each_update_reads_the_learning_rate_and_betas_the_schedulers_set():
    p = torch.zeros(2, requires_grad=True)
    pyro.param("p", p)
    adam = Adam(lr=1e-3)
    group = adam.hyperparameters.group
    group["lr"], group["betas"] = 0.1, (0.5, 0.9)
    p.grad = torch.tensor([2.0, -4.0])
    adam([p])
    torch.testing.assert_close(adam.state[p]["exp_avg"], torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(adam.state[p]["exp_avg_sq"], torch.tensor([0.4, 1.6]))
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1]))  # lr * sign(g) at step 1


def test_fit_refuses_image_batches_whose_holdout_the_settings_contradict():
    from pyro_vae import ImageBatches, PyroVAEError, fit, load_dataset

    data = ImageBatches(load_dataset("digits"), holdout=300)
    with pytest.raises(PyroVAEError, match="holds out 300 training images"):
        fit(VAE((8, 8), latent_dim=2, hidden=(8,)), data, epochs=1)
    result = fit(VAE((8, 8), latent_dim=2, hidden=(8,)), data, epochs=1, holdout=300)
    assert result.metrics[0]["validation_elbo"] is not None
