"""Speed work must not change the objective: pinned ELBO values and optimizer equivalence."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, Config
from pyro_vae.inference.optim import Adam
from pyro_vae.training.train import make_svi


def fixed_model_and_batch():
    pyro.set_rng_seed(123)
    vae = VAE((28, 28))
    probs = torch.rand(64, 784, generator=torch.Generator().manual_seed(5))
    x = torch.bernoulli(probs, generator=torch.Generator().manual_seed(6))
    return vae, x


def test_training_steps_match_pyro_adam():
    """Our fused, gradient-releasing Adam takes the steps pyro.optim.Adam takes."""
    trajectories = []
    for optimizer in (pyro.optim.Adam({"lr": 1e-3}), Adam(lr=1e-3)):
        pyro.clear_param_store()
        vae, x = fixed_model_and_batch()
        svi = SVI(vae.model, vae.guide, optimizer, loss=Trace_ELBO())
        pyro.set_rng_seed(8)
        losses = [svi.step(x) for _ in range(5)]
        trajectories.append((losses, [p.detach().clone() for p in vae.parameters()]))
    (losses_a, params_a), (losses_b, params_b) = trajectories
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in vae.parameters()), "gradients released after the step"


class _StockNormalGuide(torch.nn.Module):
    param_dim = 2 * 50

    def forward(self, params):
        loc, log_scale = params.chunk(2, dim=-1)
        return dist.Normal(loc, log_scale.exp()).to_event(1)


class _StockPrior(torch.nn.Module):
    def forward(self):
        return dist.Normal(torch.zeros(50), torch.ones(50)).to_event(1)


class _StockBernoulli(torch.nn.Module):
    param_dim = 784

    def forward(self, logits):
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


def stock_components():
    return {"guide": _StockNormalGuide(), "prior": _StockPrior(), "likelihood": _StockBernoulli()}


def test_the_elbo_of_a_fixed_model_on_a_fixed_batch_is_pinned():
    """Measured once with Pyro's Trace_ELBO and Pyro's own distributions (nats, summed); the
    training step's estimator with the library's components must give the same number."""
    pyro.set_rng_seed(123)
    stock = VAE((28, 28), **stock_components())
    _, x = fixed_model_and_batch()
    pyro.set_rng_seed(7)
    assert Trace_ELBO().loss(stock.model, stock.guide, x) == pytest.approx(
        37211.4794921875, rel=1e-6
    )
    pyro.clear_param_store()
    vae, x = fixed_model_and_batch()
    pyro.set_rng_seed(7)
    svi, _, _ = make_svi(vae, Config())
    assert svi.evaluate_loss(x) == pytest.approx(37211.4794921875, rel=1e-6)


def test_the_default_vae_has_the_gradients_of_pyros_stock_distributions():
    """Our faster Normal / Bernoulli give Trace_ELBO the loss and gradients Pyro's own give."""
    results = []
    for components in [{}, stock_components()]:
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        vae = VAE((28, 28), **components)
        _, x = fixed_model_and_batch()
        pyro.set_rng_seed(7)
        loss = Trace_ELBO().loss_and_grads(vae.model, vae.guide, x)
        results.append((loss, [p.grad.clone() for p in vae.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
