"""Each distribution of ``pyro_vae.distributions`` against its Pyro twin, derivative by derivative.

Same value, and the same partial derivative with respect to the value and to each
parameter, on the distribution's own draws and on other values, under expand and
under broadcasting (K importance samples per image).
"""

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.components.distributions import (
    DiagonalNormal,
    Independent,
    IndependentBernoulli,
    Normal,
)


def _leaf(*shape, scale=1.0, offset=0.0):
    return (offset + scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_()


def diagonal_normal():
    loc, log_scale = _leaf(4, 5, scale=2.0), _leaf(4, 5, scale=0.5)
    return (
        DiagonalNormal(loc, log_scale),
        dist.Normal(loc, log_scale.exp()),
        [loc, log_scale],
    )


def normal():
    """Not N(0, 1): a density that ignored its own loc or scale would show here."""
    loc, scale = _leaf(4, 5, offset=1.5), _leaf(4, 5, scale=0.3, offset=3.0)
    return Normal(loc, scale), dist.Normal(loc, scale), [loc, scale]


def independent_normal():
    loc, scale = _leaf(4, 5), _leaf(4, 5, scale=0.2, offset=2.0)
    return (
        Independent(Normal(loc, scale), 1),
        dist.Independent(dist.Normal(loc, scale), 1),
        [loc, scale],
    )


def independent_bernoulli():
    """Unvalidated, as the likelihood uses it: [0, 1] intensities score as soft targets."""
    logits = _leaf(4, 5, scale=3.0)
    return (
        IndependentBernoulli(logits, validate_args=False),
        dist.Bernoulli(logits=logits, validate_args=False).to_event(1),
        [logits],
    )


PAIRS = [diagonal_normal, normal, independent_normal, independent_bernoulli]


def _grads(log_prob, inputs):
    """d (sum log_prob) / d each input, zeros where it does not depend on one."""
    grads = torch.autograd.grad(log_prob.sum(), inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def _assert_same(ours, pyros, value, inputs):
    a, b = ours.log_prob(value), pyros.log_prob(value)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b)
    for ga, gb in zip(_grads(a, inputs), _grads(b, inputs), strict=True):
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda f: f.__name__)
def test_same_value_and_partial_derivatives_on_other_values(pair):
    torch.manual_seed(0)
    ours, pyros, params = pair()
    if isinstance(ours, IndependentBernoulli):
        values = [torch.bernoulli(torch.rand(4, 5, dtype=torch.float64)), torch.rand(4, 5)]
        values = [v.double().requires_grad_() for v in values]  # soft targets too
    else:
        values = [_leaf(4, 5, scale=3.0), _leaf(3, 4, 5, scale=3.0)]  # and broadcast: K=3
    for value in values:
        _assert_same(ours, pyros, value, [value, *params])


@pytest.mark.parametrize("pair", PAIRS, ids=lambda f: f.__name__)
def test_same_value_and_partial_derivatives_on_its_own_draws(pair):
    torch.manual_seed(0)
    ours, pyros, params = pair()
    for sample_shape in [(), (3,)]:
        if ours.has_rsample:
            torch.manual_seed(1)
            value = ours.rsample(sample_shape)
            torch.manual_seed(1)
            assert torch.equal(pyros.rsample(sample_shape), value)
        else:
            torch.manual_seed(1)
            value = ours.sample(sample_shape)
            torch.manual_seed(1)
            assert torch.equal(pyros.sample(sample_shape), value)
        # The draw itself (what Trace_ELBO scores): d/d value is the partial
        # derivative; d/d each parameter the total one, through the draw as well.
        inputs = [value, *params] if value.requires_grad else params
        _assert_same(ours, pyros, value, inputs)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda f: f.__name__)
def test_expand_keeps_values_and_returns_itself_when_unchanged(pair):
    torch.manual_seed(0)
    ours, pyros, params = pair()
    assert ours.expand(ours.batch_shape) is ours  # what plates do on every step
    wider = ours.expand((2, *ours.batch_shape))
    assert type(wider) is type(ours) and wider.batch_shape == (2, *ours.batch_shape)
    value = _leaf(2, *ours.batch_shape, *ours.event_shape).detach().sigmoid().requires_grad_()
    _assert_same(wider, pyros.expand((2, *pyros.batch_shape)), value, [value, *params])


def test_meanfield_uses_the_analytic_kl_of_the_guide_and_prior():
    """TraceMeanField_ELBO's closed-form KL applies: both stay Pyro Normals."""
    loc, log_scale = _leaf(8, 5), _leaf(8, 5, scale=0.3)
    q = DiagonalNormal(loc, log_scale).to_event(1)
    p = Normal(torch.zeros(5, dtype=torch.float64), 2 * torch.ones(5, dtype=torch.float64))
    kl = torch.distributions.kl_divergence(q, p.to_event(1))
    expected = torch.distributions.kl_divergence(
        dist.Normal(loc, log_scale.exp()).to_event(1), dist.Normal(0.0, 2.0).expand([5]).to_event(1)
    )
    torch.testing.assert_close(kl, expected)
