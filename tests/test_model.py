"""The VAE is a Pyro model and guide whose ELBO Pyro computes."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample

from pyro_vae import VAE, PyroVAEError


@pytest.fixture
def vae():
    pyro.set_rng_seed(0)
    return VAE((8, 8), latent_dim=5, hidden=(32,))


@pytest.fixture
def batch():
    return torch.bernoulli(torch.full((7, 64), 0.3), generator=torch.Generator().manual_seed(1))


def test_model_trace_has_latent_and_observed_sites_with_batch_shapes(vae, batch):
    trace = poutine.trace(vae.model).get_trace(batch)
    trace.compute_log_prob()
    z, x = trace.nodes["z"], trace.nodes["x"]
    assert not z["is_observed"] and x["is_observed"]
    assert z["value"].shape == (7, 5)
    assert x["value"].shape == (7, 64)
    assert z["fn"].event_shape == (5,) and x["fn"].event_shape == (64,)
    assert z["log_prob"].shape == x["log_prob"].shape == (7,)
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]


def test_guide_trace_samples_z_reparameterized_per_image(vae, batch):
    trace = poutine.trace(vae.guide).get_trace(batch)
    sample_sites = [
        n for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
    ]
    assert sample_sites == ["z"]
    assert trace.nodes["z"]["value"].shape == (7, 5)
    assert trace.nodes["z"]["fn"].has_rsample


def test_svi_loss_is_minus_the_elbo_of_the_traces(vae, batch):
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())
    pyro.set_rng_seed(3)
    loss = svi.evaluate_loss(batch)

    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(vae.guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(batch)
    elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    assert loss == pytest.approx(-elbo.item(), rel=1e-5)


def test_elbo_is_finite_and_below_zero_for_binary_images(vae, batch):
    loss = Trace_ELBO().loss(vae.model, vae.guide, batch)
    assert 0 < loss < float("inf")


def test_components_accept_objects_as_well_as_specs(vae):
    from pyro_vae.components.priors import LearnedNormalPrior

    prior = LearnedNormalPrior(5)
    model = VAE((8, 8), latent_dim=5, hidden=(32,), prior=prior)
    assert model.prior is prior
    assert any(p is prior.loc for p in model.parameters())


def test_unknown_component_names_list_the_valid_choices():
    with pytest.raises(PyroVAEError, match="unknown prior 'nope'; choose from: ") as error:
        VAE((8, 8), prior="nope")
    choices = str(error.value).split("choose from: ")[1].split(" (")[0].split(", ")
    assert {"flow:N", "mog:K", "normal", "normal-learned", "vamp:K"} <= set(choices)
    assert choices == sorted(choices)  # a plugin's own (registered by other tests) may be there
    assert str(error.value).endswith("(components from a plugin need --plugin FILE)")


def test_reconstruct_and_generate_decode_the_guide_mean_and_prior_draws(vae, batch):
    """Pictures show p(x|z)'s mean, sigmoid(logits): at q(z|x)'s mean, and at z ~ p(z)."""
    loc = vae.encoder(batch)[:, :5]
    expected = torch.sigmoid(vae.decoder(loc))
    torch.testing.assert_close(vae.reconstruct(batch), expected)
    pyro.set_rng_seed(3)
    z = torch.randn(4, 5)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(vae.generate(4), torch.sigmoid(vae.decoder(z)))


def test_replacing_a_component_after_training_started_trains_the_new_one(vae, batch):
    from pyro_vae import priors

    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss=Trace_ELBO())
    svi.step(batch)
    vae.prior = priors.build("normal-learned", latent_dim=5)
    for _ in range(3):
        svi.step(batch)
    store = pyro.get_param_store()
    assert store["vae$$$prior.loc"] is vae.prior.loc
    assert vae.prior.loc.abs().sum() > 0, "the new prior's parameters were trained"


def test_training_steps_reuse_the_cached_parameter_lists(batch):
    """The cache is rebuilt only when modules change; a step (flows included) changes none."""
    vae = VAE((8, 8), latent_dim=5, hidden=(32,), prior="flow:1", guide="iaf:1")
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss=Trace_ELBO())
    svi.step(batch)
    lists = vae._param_lists
    for _ in range(3):
        svi.step(batch)
    assert vae._param_lists is lists


def test_svi_trains_each_vae_own_parameters_when_several_share_a_process(batch):
    """pyro.module keeps the first tensors registered under a name; ours must not."""
    first, second = (VAE((8, 8), latent_dim=5, hidden=(32,)) for _ in range(2))
    svis = [SVI(v.model, v.guide, Adam({"lr": 1e-2}), loss=Trace_ELBO()) for v in (first, second)]
    for _ in range(3):  # alternate: each step must move only its own model
        for svi, vae, other in zip(svis, (first, second), (second, first), strict=True):
            mine = [p.detach().clone() for p in vae.parameters()]
            theirs = [p.detach().clone() for p in other.parameters()]
            svi.step(batch)
            assert all(not torch.equal(a, b) for a, b in zip(mine, vae.parameters(), strict=True))
            assert all(torch.equal(a, b) for a, b in zip(theirs, other.parameters(), strict=True))
