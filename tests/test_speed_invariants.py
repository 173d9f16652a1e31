"""Speed work must not change the objective: pinned ELBO values and optimizer equivalence."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, Config
from pyro_vae.distributions import DiagonalNormal, IndependentBernoulli, StandardNormal
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


def _value_and_grads(log_prob, params):
    """The summed log-density and its gradients (zeros where it does not depend on one)."""
    value = log_prob.sum()
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return value, [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


def test_diagonal_normal_scores_its_draws_as_pyros_normal_does():
    """Same log q(z|x) and the same gradients as dist.Normal, for its draws and other values."""
    loc = torch.randn(8, 5, requires_grad=True)
    log_scale = (0.3 * torch.randn(8, 5)).requires_grad_()
    params = [loc, log_scale]
    for sample_shape in [(), (3,)]:
        torch.manual_seed(0)
        ours = DiagonalNormal(loc, log_scale).to_event(1)
        z = ours.rsample(sample_shape)
        torch.manual_seed(0)
        pyros = dist.Normal(loc, log_scale.exp()).to_event(1)
        assert torch.equal(pyros.rsample(sample_shape), z)
        # The draw itself (the path Trace_ELBO takes), then a copy (the textbook formula).
        for value in (z, z.detach().clone()):
            a, grads_a = _value_and_grads(ours.log_prob(value), params)
            b, grads_b = _value_and_grads(pyros.log_prob(value), params)
            assert a.item() == pytest.approx(b.item(), rel=1e-6)
            for ga, gb in zip(grads_a, grads_b, strict=True):
                assert torch.allclose(ga, gb, atol=1e-5)
    expanded = DiagonalNormal(loc, log_scale).expand((2, 8, 5))
    assert expanded.batch_shape == (2, 8, 5) and expanded.rsample().shape == (2, 8, 5)
    assert isinstance(expanded, DiagonalNormal)
    q = DiagonalNormal(loc, log_scale).to_event(1)
    assert q.expand((8,)) is q and q.expand((2, 8)).batch_shape == (2, 8)  # plates expand each step
    # TraceMeanField_ELBO's analytic KL still applies (a Normal subclass).
    p = StandardNormal(torch.zeros(5), torch.ones(5)).to_event(1)
    kl = torch.distributions.kl_divergence(DiagonalNormal(loc, log_scale).to_event(1), p)
    expected = torch.distributions.kl_divergence(
        pyros, dist.Normal(0.0, 1.0).expand([5]).to_event(1)
    )
    assert torch.allclose(kl, expected, atol=1e-5)


def test_standard_normal_and_independent_bernoulli_equal_pyros():
    z = torch.randn(4, 3, 5)
    ours = StandardNormal(torch.zeros(5), torch.ones(5))
    assert torch.allclose(ours.log_prob(z), dist.Normal(0.0, 1.0).log_prob(z))
    assert ours.log_prob(torch.randn(5)).shape == (5,)
    assert ours.expand((4, 5)).log_prob(torch.randn(5)).shape == (4, 5)  # broadcast

    logits = torch.randn(6, 784, requires_grad=True)
    x = torch.bernoulli(torch.rand(6, 784))
    a, (ga,) = _value_and_grads(IndependentBernoulli(logits).log_prob(x), [logits])
    b, (gb,) = _value_and_grads(dist.Bernoulli(logits=logits).to_event(1).log_prob(x), [logits])
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and torch.allclose(ga, gb)
    samples = torch.randn(3, 6, 784)  # logits of K = 3 draws of z for each of the 6 images
    assert torch.allclose(
        IndependentBernoulli(samples).log_prob(x),
        dist.Bernoulli(logits=samples).to_event(1).log_prob(x),
    )
    expanded = IndependentBernoulli(logits[0]).expand((6,))
    assert expanded.log_prob(x).shape == (6,)
    assert torch.allclose(
        expanded.log_prob(x), dist.Bernoulli(logits=logits[0]).to_event(1).log_prob(x)
    )


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


def test_the_default_vae_has_the_gradients_of_pyros_stock_distributions():
    """Our faster Normal / Bernoulli give Trace_ELBO the loss and gradients Pyro's own give."""
    results = []
    for components in [
        {},
        {"guide": _StockNormalGuide(), "prior": _StockPrior(), "likelihood": _StockBernoulli()},
    ]:
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
