"""Speed work must not change the objective: pinned ELBO values and optimizer equivalence."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, Config
from pyro_vae.optim import Adam
from pyro_vae.train import make_svi


def fixed_model_and_batch():
    pyro.set_rng_seed(123)
    vae = VAE((28, 28))
    probs = torch.rand(64, 784, generator=torch.Generator().manual_seed(5))
    x = torch.bernoulli(probs, generator=torch.Generator().manual_seed(6))
    return vae, x


def test_the_elbo_of_a_fixed_model_on_a_fixed_batch_is_pinned():
    """Measured once with Pyro's Trace_ELBO on the default 784-400-50 VAE (nats, summed)."""
    vae, x = fixed_model_and_batch()
    pyro.set_rng_seed(7)
    assert Trace_ELBO().loss(vae.model, vae.guide, x) == pytest.approx(37211.4794921875, rel=1e-6)
    pyro.set_rng_seed(7)
    svi, _, _ = make_svi(vae, Config())
    assert svi.evaluate_loss(x) == pytest.approx(37211.4794921875, rel=1e-6)


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
