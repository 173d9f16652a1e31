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
