"""Held-out ELBO and the importance-sampled log-likelihood."""

import math

import pyro
import pytest
import torch

from pyro_vae import ImageBatches, load_dataset, load_run
from pyro_vae.evaluation.evaluate import elbo, log_likelihood


@pytest.fixture(scope="module")
def model_and_test_images(trained_run):
    return load_run(trained_run), ImageBatches(load_dataset("digits")).test_images


def _repeat(fn, n):
    values = torch.tensor([fn() for _ in range(n)], dtype=torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(n)).item()


def test_log_likelihood_increases_with_k_and_is_not_below_the_elbo(model_and_test_images):
    vae, x = model_and_test_images
    pyro.set_rng_seed(0)
    bound, bound_se = _repeat(lambda: elbo(vae, x), 8)
    estimates = {k: _repeat(lambda k=k: log_likelihood(vae, x, k), 8) for k in (1, 10, 100)}

    (l1, se1), (l10, se10), (l100, se100) = estimates[1], estimates[10], estimates[100]
    # K = 1 is the ELBO itself, in expectation.
    assert abs(l1 - bound) < 4 * math.hypot(se1, bound_se)
    # Tighter with K: each step up clears its Monte Carlo error.
    assert l10 - l1 > 3 * math.hypot(se1, se10)
    assert l100 - l10 > 3 * math.hypot(se10, se100)
    assert l100 >= bound


def test_chunking_over_samples_and_images_leaves_the_estimate_unchanged(model_and_test_images):
    vae, x = model_and_test_images
    pyro.set_rng_seed(1)
    whole, se = _repeat(lambda: log_likelihood(vae, x, 100), 4)
    chunked, se_chunked = _repeat(lambda: log_likelihood(vae, x, 100, max_elements=5_000), 4)
    assert abs(whole - chunked) < 4 * math.hypot(se, se_chunked) + 1e-3


def test_elbo_is_averaged_per_image_whatever_the_batch_size(model_and_test_images):
    vae, x = model_and_test_images
    pyro.set_rng_seed(2)
    a = elbo(vae, x, batch_size=1000)
    pyro.set_rng_seed(2)
    b = elbo(vae, x, batch_size=50)
    assert a < 0 and b < 0
    assert abs(a - b) < 0.5


def test_log_likelihood_converges_to_the_exact_marginal_of_a_tiny_vae():
    """With one latent dimension, log p(x) = log int p(z) p(x|z) dz is a 1-D quadrature."""
    from pyro_vae import VAE

    pyro.set_rng_seed(0)
    vae = VAE((1, 2), latent_dim=1, hidden=(8,))
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    z = torch.linspace(-12, 12, 40_001).unsqueeze(-1)
    with torch.no_grad():
        log_joint = vae.prior().log_prob(z).unsqueeze(-1) + vae.likelihood(
            vae.decoder(z).unsqueeze(1)
        ).log_prob(x)
    exact = torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0])

    estimate = log_likelihood(vae, x, 20_000)
    assert estimate == pytest.approx(exact.mean().item(), abs=0.01)


@pytest.mark.parametrize("components", [{}, {"prior": "mog:3"}, {"guide": "iaf:1"}])
def test_the_elbos_terms_come_from_the_same_draws_as_the_test_elbo(components):
    from pyro_vae import VAE
    from pyro_vae.evaluation.evaluate import test_elbo, test_elbo_terms

    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,), **components)
    x = ImageBatches(load_dataset("digits")).test_images
    terms = test_elbo_terms(vae, x, seed=3)
    assert terms["elbo"] == test_elbo(vae, x, seed=3)
    if components:  # no closed-form KL for the pair: recon - kl is the ELBO's own draw
        assert terms["recon"] - terms["kl"] == pytest.approx(terms["elbo"], rel=1e-6)
    else:  # KL(N(mu, sigma) || N(0, 1)) in closed form, from the encoder's outputs
        q = vae.encode(x)
        mu, sigma = q.base_dist.loc, q.base_dist.scale
        kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * sigma.log()).sum(-1).mean()
        assert terms["kl"] == pytest.approx(kl.item(), rel=1e-5)
        # recon is log p(x|z) at the ELBO's draw: the ELBO plus that draw's log q - log p
        with evaluate_seeded(3):
            g = pyro.poutine.trace(vae.guide).get_trace(x)
        z = g.nodes["z"]["value"]
        mc_kl = (g.nodes["z"]["fn"].log_prob(z) - vae.prior().log_prob(z)).mean()
        assert terms["recon"] == pytest.approx(terms["elbo"] + mc_kl.item(), rel=1e-5)


def evaluate_seeded(seed):
    from pyro_vae.evaluation.evaluate import seeded

    return seeded(seed)


def test_each_epoch_records_the_terms_on_fixed_training_images_and_the_test_set():
    from pyro_vae import VAE, fit
    from pyro_vae.evaluation.evaluate import test_elbo_terms

    pyro.clear_param_store()
    torch.manual_seed(0)
    result = fit(VAE((8, 8), latent_dim=4, hidden=(16,)), "digits", epochs=1, iw_samples=5)
    record = result.metrics[-1]
    data = ImageBatches(load_dataset("digits"))
    train = test_elbo_terms(result.model, data.fixed(torch.arange(len(data.test_images))))
    test = test_elbo_terms(result.model, data.test_images)
    assert (record["train_recon"], record["train_kl"]) == (train["recon"], train["kl"])
    assert [record[f"test_{k}"] for k in ("elbo", "recon", "kl")] == [
        test["elbo"],
        test["recon"],
        test["kl"],
    ]


def test_evaluate_writes_per_image_log_px_whose_mean_and_standard_error_it_reports(
    trained_run, tmp_path
):
    import shutil

    import numpy as np

    from pyro_vae.evaluation.evaluate import evaluate_run, seeded

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    result = evaluate_run(run, iw_samples=20, per_image=tmp_path / "px.npy")
    values = np.load(tmp_path / "px.npy")
    assert values.shape == (297,) and values.dtype == np.float64
    assert result["log_px"] == pytest.approx(values.mean(), rel=1e-12)
    assert result["log_px_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(297), rel=1e-9)

    # the ELBO's standard error, from each image's log p(x, z) - log q(z|x) at its draw
    vae, x = load_run(run), ImageBatches(load_dataset("digits")).test_images
    with seeded(0), torch.no_grad():
        g = pyro.poutine.trace(vae.guide).get_trace(x)
        m = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=g)).get_trace(x)
        per_image = m.nodes["x"]["fn"].log_prob(x) + m.nodes["z"]["fn"].log_prob(
            g.nodes["z"]["value"]
        )
        per_image -= g.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"])
    assert result["test_elbo"] == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert result["test_elbo_se"] == pytest.approx(
        per_image.double().std().item() / np.sqrt(297), rel=1e-5
    )


def test_per_image_is_refused_where_it_cannot_be_written(trained_run, tmp_path):
    from pyro_vae import PyroVAEError
    from pyro_vae.evaluation.evaluate import evaluate_run

    with pytest.raises(PyroVAEError, match="does not exist"):
        evaluate_run(trained_run, per_image=tmp_path / "no" / "px.npy")
    with pytest.raises(PyroVAEError, match=r"\.npy file"):
        evaluate_run(trained_run, per_image=tmp_path / "px.csv")


def test_the_elbo_by_hand_example_checks_its_two_claims():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "elbo_by_hand.py"
    done = subprocess.run(
        [sys.executable, str(script), "--epochs", "20"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "checked: ELBO = reconstruction - KL, and log p(x) >= ELBO" in done.stdout
