"""Every registered prior x likelihood x guide trains, evaluates and round-trips."""

import dataclasses
import itertools
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_vae import (
    VAE,
    ImageBatches,
    PyroVAEError,
    architectures,
    guides,
    likelihoods,
    load_dataset,
    load_run,
    priors,
    train,
)
from pyro_vae.evaluation.evaluate import log_likelihood
from pyro_vae.training.runs import save_checkpoint

from .helpers import small_config

COMBINATIONS = [
    (p.example, lik.example, g.example)
    for p, lik, g in itertools.product(priors.entries(), likelihoods.entries(), guides.entries())
]


@pytest.fixture(scope="module")
def eight_bit_digits():
    """The digits at 8-bit levels 0..240 (x15), so every likelihood's support holds."""
    digits = load_dataset("digits")
    return ImageBatches(
        dataclasses.replace(
            digits,
            levels=255,
            train_images=digits.train_images * 15,
            test_images=digits.test_images * 15,
        ),
        binarize="none",
    )


def _mean_elbo(vae, x):
    return -Trace_ELBO(num_particles=8, vectorize_particles=True).loss(
        vae.model, vae.guide, x
    ) / len(x)


@pytest.mark.parametrize("prior, likelihood, guide", COMBINATIONS)
def test_every_combination_trains_with_a_finite_improving_elbo(
    prior, likelihood, guide, eight_bit_digits
):
    data = eight_bit_digits
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(32,), prior=prior, likelihood=likelihood, guide=guide)
    for images in data.all_images():
        vae.likelihood.check_support(images)
    x = data.test_images[:200]
    before = _mean_elbo(vae, x)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss=Trace_ELBO())
    for step in range(30):
        loss = svi.step(data.batch(torch.arange(step * 50, step * 50 + 50) % data.num_train))
        assert math.isfinite(loss)
    after = _mean_elbo(vae, x)
    assert math.isfinite(after) and after > before + 1, (before, after)
    assert math.isfinite(log_likelihood(vae, x[:50], 10))


@pytest.mark.parametrize("arch", architectures.names())
def test_every_architecture_trains_on_8x8_and_28x28_images(arch):
    digits = ImageBatches(load_dataset("digits"), binarize="static").test_images[:128]
    for shape in ((8, 8), (28, 28)):
        x = torch.nn.functional.interpolate(digits.reshape(-1, 1, 8, 8), size=shape)
        x = x.reshape(len(digits), -1)
        pyro.set_rng_seed(0)
        vae = VAE(shape, latent_dim=4, hidden=(32,), arch=arch)
        before = _mean_elbo(vae, x)
        svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=Trace_ELBO())
        for _ in range(25):
            svi.step(x)
        assert _mean_elbo(vae, x) > before + 5, shape


@pytest.mark.parametrize(
    "prior, guide, likelihood, arch",
    [
        ("flow:2", "iaf:2", "dlogistic", "mlp"),
        ("vamp:5", "lowrank:2", "gaussian", "conv"),
        ("mog:3", "normal", "cbernoulli", "mlp"),
    ],
)
def test_checkpoint_round_trip_keeps_learned_priors_flows_and_scales(
    prior, guide, likelihood, arch, tmp_path
):
    config = small_config(
        model={"prior": prior, "guide": guide, "likelihood": likelihood, "arch": arch}
    )
    pyro.set_rng_seed(0)
    from pyro_vae.models.kinds import build_vae

    vae = build_vae(config, (8, 8))
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss=Trace_ELBO())
    x = torch.rand(32, 64).mul(255).round().div(255)
    for _ in range(3):
        svi.step(x)
    save_checkpoint(
        tmp_path,
        {"config": dataclasses.asdict(config), "image_shape": [8, 8], "model": vae.state_dict()},
    )
    loaded = load_run(tmp_path)
    vae.eval()
    z = torch.randn(6, config.model.latent_dim)
    assert torch.equal(loaded.decoder(z), vae.decoder(z))
    assert torch.equal(loaded.encoder(x), vae.encoder(x))
    assert torch.equal(loaded.prior().log_prob(z), vae.prior().log_prob(z))
    assert torch.equal(
        loaded.likelihood(vae.decoder(z)).log_prob(x[:6]),
        vae.likelihood(vae.decoder(z)).log_prob(x[:6]),
    )


def test_meanfield_and_trace_elbo_agree_within_monte_carlo_error():
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(32,))
    x = torch.bernoulli(torch.full((20, 64), 0.3))

    def estimates(elbo):
        values = torch.tensor(
            [elbo.loss(vae.model, vae.guide, x) for _ in range(30)], dtype=torch.float64
        )
        return values.mean().item(), values.std().item() / math.sqrt(len(values))

    particles = {"num_particles": 50, "vectorize_particles": True}
    trace, trace_se = estimates(Trace_ELBO(**particles))
    meanfield, meanfield_se = estimates(TraceMeanField_ELBO(**particles))
    assert abs(trace - meanfield) < 4 * math.hypot(trace_se, meanfield_se)
    assert meanfield_se < trace_se, "the analytic KL removes part of the noise"


def test_dlogistic_refuses_data_that_is_not_8_bit(tmp_path):
    config = small_config(model={"likelihood": "dlogistic"}, data={"binarize": "none"})
    with pytest.raises(PyroVAEError, match="needs 8-bit data"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_discretized_logistic_is_a_distribution_over_the_256_levels():
    from pyro_vae.components.likelihoods import DiscretizedLogistic

    levels = torch.arange(256.0) / 255
    for loc, scale in ((0.3, 0.05), (0.0, 0.5), (0.97, 0.01), (0.5, 1e-4)):
        d = DiscretizedLogistic(torch.tensor(loc), torch.tensor(scale))
        assert d.log_prob(levels).exp().sum().item() == pytest.approx(1.0, abs=1e-3)
        assert set((d.sample((100,)) * 255).round().tolist()) <= set(range(256))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mog:0", "mog:0.*K='0' must be a whole number >= 1; usage: mog:K"),
        ("mog:x", "K='x' must be a whole number >= 1"),
        ("mog", "needs K; usage: mog:K"),
        ("vamp:2:3", "too many arguments; usage: vamp:K"),
    ],
)
def test_bad_component_arguments_name_the_usage(spec, message):
    with pytest.raises(PyroVAEError, match=message):
        VAE((8, 8), prior=spec)


def test_cli_spec_flags_reach_the_model_and_its_config(tmp_path):
    from pyro_vae.cli import main

    run = tmp_path / "run"
    code = main(
        [
            "train", "--epochs", "1", "--hidden", "32", "--latent-dim", "4", "--quiet",
            "--prior", "mog:3", "--likelihood", "cbernoulli", "--guide", "iaf:2",
            "--binarize", "none", "--set", "inference.iw_samples=5", "--out", str(run),
        ]
    )  # fmt: skip
    assert code == 0
    config_text = (run / "config.toml").read_text()
    assert 'prior = "mog:3"' in config_text and 'guide = "iaf:2"' in config_text
    vae = load_run(run)
    assert type(vae.prior).__name__ == "MixtureOfGaussiansPrior"
    assert type(vae.posterior).__name__ == "IAFGuide"


def _mixture_log_prob_in_float64(components, z):
    """(1/K) sum_k N(z | mu_k, s_k), elementwise over (..., K, L) in float64: the reference."""
    base = components.base_dist
    normal = torch.distributions.Normal(base.loc.double(), base.scale.double())
    k = base.loc.shape[0]
    return normal.log_prob(z.double().unsqueeze(-2)).sum(-1).logsumexp(-1) - math.log(k)


def test_vamp_prior_with_the_library_guide_takes_the_matrix_product_path(monkeypatch):
    import importlib

    priors_module = importlib.import_module(
        "pyro_vae.components.priors"
    )  # pyro_vae.priors: the registry

    calls = []
    gemm = priors_module._diagonal_normal_log_prob
    monkeypatch.setattr(
        priors_module, "_diagonal_normal_log_prob", lambda *a: calls.append(1) or gemm(*a)
    )
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=6, hidden=(16,), prior="vamp:40")  # guide: "normal"
    z = (1.5 * torch.randn(3, 20, 6)).requires_grad_()
    prior = vae.prior()
    fast = prior.log_prob(z)
    assert calls, "the VampPrior's mixture of the guide's Normals uses the matrix products"
    reference = _mixture_log_prob_in_float64(prior.components, z)
    assert fast.shape == (3, 20)
    torch.testing.assert_close(fast.double(), reference, atol=1e-4, rtol=1e-6)
    inputs = [z, vae.prior.pseudo_inputs]
    grads = torch.autograd.grad(fast.sum(), inputs, retain_graph=True)
    for a, b in zip(grads, torch.autograd.grad(reference.sum(), inputs), strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_vamp_density_by_matrix_products_stays_accurate_in_float32_far_from_the_origin():
    """|z| = 10 near a component there, posterior scales 0.05: the expanded z^2 - 2 z mu + mu^2
    cancels; in float32 it lost 0.39 nats."""
    import pyro.distributions as dist

    from pyro_vae.components.priors import UniformMixture

    torch.manual_seed(0)
    loc = 3 * torch.randn(50, 50)
    z = 10 + 0.05 * torch.randn(64, 50)
    z[:, ::2] *= -1
    loc[0] = z[0]
    components = dist.Normal(loc, torch.full((50, 50), 0.05)).to_event(1)
    fast = UniformMixture(components).log_prob(z)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(
        fast.double(), _mixture_log_prob_in_float64(components, z), atol=1e-4, rtol=1e-6
    )
