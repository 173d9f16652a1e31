"""The KL term reweighted: beta, warm-up and free bits, checked against the ELBO's terms."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyro_vae import VAE, ImageBatches, PyroVAEError, fit, load_dataset
from pyro_vae.cli import main
from pyro_vae.config import validate
from pyro_vae.evaluation import evaluate
from pyro_vae.inference import kl as kl_module
from pyro_vae.inference.elbos import DReG_ELBO
from pyro_vae.inference.kl import KLTerm
from pyro_vae.inference.optim import Adam
from pyro_vae.models import SSVAE
from pyro_vae.training.compiled import TracedStep
from pyro_vae.training.runs import load_checkpoint, read_metrics
from pyro_vae.training.train import make_svi, resume, train

from .helpers import small_config


@pytest.fixture(scope="module")
def digits():
    dataset = load_dataset("digits")
    return torch.bernoulli(dataset.train_images[:16].float() / 16, generator=torch.Generator())


@pytest.fixture
def vae():
    pyro.clear_param_store()
    torch.manual_seed(0)
    return VAE((8, 8), latent_dim=6, hidden=(32,))


def _terms(vae, x, seed, particles=None):
    """log p(x|z), log p(z), log q(z|x) per draw and image (the z that an estimator seeded
    with ``seed`` draws), and the guide's and prior's distributions."""
    pyro.set_rng_seed(seed)
    guide = vae.guide
    if particles:
        guide = pyro.plate("particles", particles, dim=-2)(vae.guide)
    g = poutine.trace(guide).get_trace(x)
    m = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x)
    z = g.nodes["z"]["value"]
    q, p = g.nodes["z"]["fn"], m.nodes["z"]["fn"]
    return m.nodes["x"]["fn"].log_prob(x), p.log_prob(z), q.log_prob(z), q, p, z


def _loss(elbo, program, x, seed):
    pyro.set_rng_seed(seed)
    return elbo.differentiable_loss(*program, x)


def _grads(vae, loss):
    params = [p for p in vae.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_same(vae, loss, expected):
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(_grads(vae, loss), _grads(vae, expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [0.25, 4.0])
def test_the_kl_weight_scales_the_latent_terms_in_model_and_guide(vae, digits, beta):
    program = KLTerm(beta).wrap(vae.model, vae.guide)
    loss = _loss(Trace_ELBO(max_plate_nesting=1), program, digits, seed=3)
    log_px, log_pz, log_qz, *_ = _terms(vae, digits, seed=3)
    _assert_same(vae, loss, -(log_px + beta * (log_pz - log_qz)).sum())


def test_make_svi_steps_with_the_configured_weight_and_refuses_a_warmup(vae, digits):
    config = small_config(inference={"kl_weight": 4.0})
    svi, _, _ = make_svi(vae, config)
    pyro.set_rng_seed(3)
    loss = svi.evaluate_loss(digits)
    log_px, log_pz, log_qz, *_ = _terms(vae, digits, seed=3)
    assert loss == pytest.approx(-(log_px + 4.0 * (log_pz - log_qz)).sum().item(), rel=1e-5)
    config.inference.kl_warmup = 2
    with pytest.raises(PyroVAEError, match="use fit"):
        make_svi(vae, config)


def test_the_kl_weight_scales_meanfields_closed_form_kl(vae, digits):
    program = KLTerm(3.0).wrap(vae.model, vae.guide)
    loss = _loss(TraceMeanField_ELBO(max_plate_nesting=1), program, digits, seed=4)
    log_px, _, _, q, p, _ = _terms(vae, digits, seed=4)
    _assert_same(vae, loss, -(log_px - 3.0 * kl_divergence(q, p)).sum())


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_the_kl_weight_acts_inside_the_importance_weights(vae, digits, estimator):
    k, beta = 4, 2.0
    if estimator == "iwae":
        elbo = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    else:
        elbo = DReG_ELBO(k)
    pyro.set_rng_seed(5)
    loss = elbo.loss(*KLTerm(beta).wrap(vae.model, vae.guide), digits)
    log_px, log_pz, log_qz, *_ = _terms(vae, digits, seed=5, particles=k)
    log_w = log_px + beta * (log_pz - log_qz)
    expected = -(log_w.logsumexp(0) - math.log(k)).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_m2s_latent_sites_carry_the_weight_and_its_observed_ones_do_not(digits):
    m2 = SSVAE((8, 8), latent_dim=4, hidden=(16,))
    y = torch.nn.functional.one_hot(torch.arange(4) % 10, 10).float()
    model, guide = KLTerm(3.0).wrap(m2.semi_model, m2.semi_guide)
    args = (digits[:6], digits[:4], y, 0.5)
    g = poutine.trace(guide).get_trace(*args)
    m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args)
    scales = {
        name: site["scale"]
        for name, site in m.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }
    assert scales == {
        "unlabelled/z": 3.0,
        "unlabelled/y": 3.0,
        "unlabelled/x": 1.0,
        "labelled/z": 1.5,
        "labelled/y": 0.5,
        "labelled/x": 0.5,
        "labelled/y_aux": 0.5 * m2.aux_weight,
    }
    assert {n: s["scale"] for n, s in g.nodes.items() if n.endswith(("/z", "/y"))} == {
        "unlabelled/y": 3.0,
        "unlabelled/z": 3.0,
        "labelled/z": 1.5,
    }


def test_free_bits_clamp_each_dimension_below_lambda_to_a_constant(vae, digits):
    log_px, _, _, q, p, z = _terms(vae, digits, seed=6)
    per_dim = kl_divergence(q.base_dist, p.base_dist).mean(0).detach()
    nats = per_dim.median().item()  # about half the dimensions clamped
    clamped = per_dim < nats
    assert 0 < clamped.sum() < len(clamped)

    program = KLTerm(free_bits=nats).wrap(vae.model, vae.guide)
    loss = _loss(Trace_ELBO(max_plate_nesting=1), program, digits, seed=6)
    kept = ~clamped
    log_pz = p.base_dist.log_prob(z)[:, kept].sum(-1)
    log_qz = q.base_dist.log_prob(z)[:, kept].sum(-1)
    expected = -(log_px + log_pz - log_qz - nats * clamped.sum()).sum()
    _assert_same(vae, loss, expected)


def test_free_bits_act_inside_the_importance_weights(vae, digits):
    k = 4
    log_px, _, _, q, p, z = _terms(vae, digits, seed=7, particles=k)
    per_dim = kl_divergence(q.base_dist, p.base_dist).reshape(-1, 6).mean(0).detach()
    nats = per_dim.median().item()
    clamped = per_dim < nats
    kept = ~clamped
    log_w = log_px + (p.base_dist.log_prob(z) - q.base_dist.log_prob(z))[..., kept].sum(-1)
    log_w = log_w - nats * clamped.sum()
    expected = -(log_w.logsumexp(0) - math.log(k)).sum()

    elbo = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    params = [p for p in vae.parameters() if p.requires_grad]
    for param in params:
        param.grad = None
    pyro.set_rng_seed(7)
    loss = elbo.loss_and_grads(*KLTerm(free_bits=nats).wrap(vae.model, vae.guide), digits)
    grads = [param.grad.clone() for param in params]
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, _grads(vae, expected), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_under_free_bits_meanfield_estimates_zs_term_as_trace_does(vae, digits):
    program = KLTerm(free_bits=0.05).wrap(vae.model, vae.guide)
    trace = _loss(Trace_ELBO(max_plate_nesting=1), program, digits, seed=8)
    meanfield = _loss(TraceMeanField_ELBO(max_plate_nesting=1), program, digits, seed=8)
    assert meanfield.item() == trace.item()
    without = _loss(TraceMeanField_ELBO(max_plate_nesting=1), (vae.model, vae.guide), digits, 8)
    assert without.item() != trace.item()


def test_free_bits_refuse_latents_that_do_not_factorize(digits):
    pyro.clear_param_store()
    vae = VAE((8, 8), latent_dim=4, hidden=(16,), prior="mog:3")
    program = KLTerm(free_bits=1.0).wrap(vae.model, vae.guide)
    with pytest.raises(PyroVAEError, match="needs a prior that factorizes"):
        _loss(Trace_ELBO(max_plate_nesting=1), program, digits, seed=0)


@pytest.mark.parametrize("estimator", ["trace", "dreg"])
def test_a_traced_step_follows_the_weight_from_step_to_step(digits, estimator):
    weights = [0.2, 0.7, 1.5]

    def run(traced):
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = VAE((8, 8), latent_dim=6, hidden=(32,))
        if estimator == "trace":
            kl, elbo = KLTerm(2.0, warmup=1, free_bits=0.05), Trace_ELBO(max_plate_nesting=1)
        else:
            kl, elbo = KLTerm(2.0, warmup=1), DReG_ELBO(3)
        program = kl.wrap(vae.model, vae.guide)
        if traced:
            step = TracedStep(vae, elbo, Adam(1e-2), "trace", program, kl)
        else:
            step = pyro.infer.SVI(*program, Adam(1e-2), loss=elbo).step
        pyro.set_rng_seed(1)
        losses = []
        for w in weights:
            kl.weight = w
            losses.append(step(digits))
        return losses, [p.detach().clone() for p in vae.parameters()]

    with pyro.validation_enabled(False):
        (eager_losses, eager), (traced_losses, traced) = run(False), run(True)
    assert traced_losses == pytest.approx(eager_losses, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(eager, traced, strict=True))


def test_warmup_raises_the_weight_linearly_step_by_step(monkeypatch):
    seen = []
    real = kl_module._LatentSites._process_message

    def spy(self, msg):
        real(self, msg)
        if self.side == "guide" and msg["name"] == "z":
            seen.append(msg["scale"])

    monkeypatch.setattr(kl_module._LatentSites, "_process_message", spy)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = VAE((8, 8), latent_dim=4, hidden=(16,))
    result = fit(model, "digits", epochs=3, batch_size=300, kl_weight=3.0, kl_warmup=2)
    steps = len(seen) // 3  # 1,500 training images: 5 steps an epoch
    assert steps == 5
    expected = [3.0 * min(1.0, t / (2 * steps)) for t in range(1, 3 * steps + 1)]
    assert seen == pytest.approx(expected)
    assert [m["kl_weight"] for m in result.metrics] == [1.5, 3.0, 3.0]
    assert "train_objective" in result.metrics[0] and "train_elbo" not in result.metrics[0]


def test_held_out_numbers_are_those_of_the_unweighted_model():
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = VAE((8, 8), latent_dim=4, hidden=(16,))
    result = fit(model, "digits", epochs=2, kl_weight=4.0, free_bits=0.1, iw_samples=10)
    test = ImageBatches(load_dataset("digits")).test_images
    assert result.metrics[-1]["test_elbo"] == evaluate.test_elbo(result.model, test)
    assert result.summary["log_px"] == evaluate.test_log_likelihood(result.model, test, 10)


def test_a_warmup_run_resumes_exactly(tmp_path):
    config = small_config(train={"epochs": 4}, inference={"kl_warmup": 3, "kl_weight": 2.0})
    train(config, tmp_path / "a")
    config.train.epochs = 2
    train(config, tmp_path / "b")
    resume(tmp_path / "b", epochs=4)
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.pt")["model"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["kl_weight"] for m in read_metrics(tmp_path / "b")] == [2 / 3, 4 / 3, 2.0, 2.0]


@pytest.mark.parametrize(
    "inference, message",
    [
        ({"free_bits": 1.0, "elbo": "dreg:3"}, "choose from: iwae, jit-meanfield, jit-trace"),
        ({"kl_warmup": 2, "elbo": "jit-trace"}, "use trace"),
        ({"kl_weight": -1.0}, "kl_weight must be >= 0"),
        ({"kl_weight": math.inf}, "kl_weight must be >= 0"),
        ({"free_bits": math.nan}, "free_bits must be >= 0"),
        ({"kl_warmup": -1}, "kl_warmup must be >= 0"),
    ],
)
def test_bad_kl_settings_are_refused_before_training(inference, message):
    with pytest.raises(PyroVAEError, match=message):
        validate(small_config(inference=inference))


def test_the_cli_says_a_non_factorizing_prior_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--free-bits", "1", "--prior", "mog:3", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a prior that factorizes" in err
    assert not out.exists()


def test_under_compile_a_non_factorizing_prior_is_the_same_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--free-bits", "1", "--prior", "mog:3", "--compile"]
    assert main([*args, "trace", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a prior that factorizes" in err and "could not trace" not in err
