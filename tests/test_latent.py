"""The latent-space tools, on a model with a known answer: a dimension its decoder ignores."""

import json

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import VAE, ImageBatches, PyroVAEError, fit, load_dataset
from pyro_vae import latent as latent_tools
from pyro_vae.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ignored_dimension():
    """A 2-D VAE trained on the digits with its decoder's weights for z_2 held at 0."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE((8, 8), latent_dim=2, hidden=(64,))
    weight = vae.decoder[0].weight
    with torch.no_grad():
        weight[:, 1] = 0
    mask = torch.tensor([1.0, 0.0])
    weight.register_hook(lambda g: g * mask)
    fit(vae, "digits", epochs=40, iw_samples=2)
    assert torch.all(vae.decoder[0].weight[:, 1] == 0)
    return vae.eval()


@pytest.fixture(scope="module")
def digits():
    dataset = load_dataset("digits")
    return dataset, ImageBatches(dataset)


def test_a_dimension_the_decoder_ignores_is_inactive_and_costs_no_kl(
    ignored_dimension, digits, tmp_path
):
    vae, (dataset, data) = ignored_dimension, digits
    numbers = latent_tools.report(vae, data, tmp_path, labels=dataset.test_labels, name="digits")
    assert numbers["active_units"] == 1
    used, ignored = numbers["activity"]
    assert used > 0.01 > ignored
    assert numbers["kl_per_dimension"][1] < 0.01 < numbers["kl_per_dimension"][0]

    # the numbers are those of q(z|x) and p(z) computed directly
    with torch.no_grad():
        q = vae.encode(data.test_images)
    mu, sigma = q.base_dist.loc.double(), q.base_dist.scale.double()
    assert numbers["activity"] == pytest.approx(mu.var(0).tolist(), rel=1e-9)
    kl = 0.5 * (mu**2 + sigma**2 - 1 - 2 * sigma.log()).mean(0)
    assert numbers["kl_per_dimension"] == pytest.approx(kl.tolist(), rel=1e-5)
    saved = np.load(tmp_path / "latents.npz")
    np.testing.assert_allclose(saved["means"], mu.numpy(), rtol=1e-6)
    np.testing.assert_allclose(saved["scales"], sigma.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(saved["labels"], dataset.test_labels.numpy())
    for name in ("latent_map", "interpolations", "manifold", "active_units"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG


def test_the_manifold_decodes_the_priors_quantiles():
    pyro.clear_param_store()
    torch.manual_seed(1)
    vae = VAE((8, 8), latent_dim=2, hidden=(16,)).eval()  # its decoder reads both dimensions
    images = latent_tools.manifold(vae, size=5)
    normal = torch.distributions.Normal(0.0, 1.0)
    q = torch.linspace(0.05, 0.95, 5)
    # row 0 is the top: z_2 at its 0.95 quantile; column c: z_1 at its c-th quantile
    z = torch.stack([normal.icdf(q), normal.icdf(torch.full((5,), 0.95))], -1)
    torch.testing.assert_close(images[:5], latent_tools.decode(vae, z))
    z = torch.stack([torch.full((5,), normal.icdf(q[0])), normal.icdf(q).flip(0)], -1)
    torch.testing.assert_close(images[::5], latent_tools.decode(vae, z))


def test_interpolations_run_straight_from_one_posterior_mean_to_the_other(ignored_dimension):
    vae = ignored_dimension
    x = ImageBatches(load_dataset("digits")).test_images[:4]
    lines = latent_tools.interpolations(vae, x[:2], x[2:], steps=3)
    with torch.no_grad():
        za, zb = vae.encode(x[:2]).mean, vae.encode(x[2:]).mean
    for t, column in zip((0.0, 0.5, 1.0), range(3), strict=True):
        expected = latent_tools.decode(vae, (1 - t) * za + t * zb)
        torch.testing.assert_close(lines[:, column], expected)


def test_guides_and_priors_without_per_dimension_factors(digits, tmp_path):
    pyro.clear_param_store()
    torch.manual_seed(0)
    _, data = digits
    flow = VAE((8, 8), latent_dim=3, hidden=(16,), guide="iaf:1", prior="mog:2")
    x = data.test_images
    assert latent_tools.kl_per_dimension(flow, x) is None
    means, scales = latent_tools.posterior_moments(flow, x)
    assert means.shape == scales.shape == (len(x), 3)
    numbers = latent_tools.report(flow, data, tmp_path)
    assert numbers["kl_per_dimension"] is None
    assert numbers["active_units"] == int((means.double().var(0) > 0.01).sum())
    # no inverse CDF for a mixture: the quantiles of its draws
    z = latent_tools.prior_quantiles(flow, torch.tensor([0.5]))
    with latent_tools.seeded(0):
        draws = flow.prior().sample((20_000,))
    torch.testing.assert_close(z, torch.quantile(draws, torch.tensor([0.5]), dim=0))


def test_the_cli_writes_the_files_and_the_numbers_into_the_summary(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    out = tmp_path / "latent"
    out.mkdir()
    assert main(["latent", str(run), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"latents.npz", "latent_map.png", "interpolations.png", "active_units.png"} <= names
    assert "manifold.png" not in names  # 8 latent dimensions: no 2-D manifold
    summary = json.loads((run / "summary.json").read_text())
    assert summary["latent"]["latent_dim"] == 8 and len(summary["latent"]["activity"]) == 8


def test_a_model_without_one_encoder_is_refused_in_one_line(tmp_path, capsys):
    from pyro_vae.training.train import train

    from .helpers import small_config

    config = small_config(train={"epochs": 1})
    config.model.kind = "m2"
    train(config, tmp_path / "m2", progress=False)
    assert main(["latent", str(tmp_path / "m2")]) == 2
    assert "has no single encoder" in capsys.readouterr().err
    with pytest.raises(PyroVAEError, match="does not exist"):
        latent_tools.report_run(tmp_path / "m2", tmp_path / "nowhere")


def test_a_one_dimensional_latent_and_few_images_for_tsne_still_give_a_map(tmp_path):
    pyro.clear_param_store()
    torch.manual_seed(0)
    dataset = load_dataset("digits")
    data = ImageBatches(dataset)
    data.test_images = data.test_images[:12]  # t-SNE's perplexity must stay below 12
    line = VAE((8, 8), latent_dim=1, hidden=(16,))
    assert latent_tools.report(line, data, tmp_path)["latent_dim"] == 1
    points, axes = latent_tools.project(np.random.default_rng(0).normal(size=(12, 5)), "tsne")
    assert points.shape == (12, 2) and axes == ["t-SNE 1", "t-SNE 2"]
