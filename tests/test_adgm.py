"""The auxiliary deep generative model (Maaløe et al. 2016): its ELBO, aux term, training."""

import json
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyro_vae import ADGM, ImageBatches, fit, load_dataset, load_run
from pyro_vae.cli import main

from .helpers import one_hot, static_digits


@pytest.fixture
def digits():
    return static_digits()


@pytest.fixture
def adgm():
    pyro.set_rng_seed(0)
    return ADGM((8, 8), latent_dim=3, hidden=(32,))


def test_the_enumerated_elbo_equals_the_explicit_sum_over_classes(adgm, digits):
    x = digits[0][:4]
    draws = 4000
    enumerated = TraceEnum_ELBO(max_plate_nesting=1, num_particles=draws, vectorize_particles=True)
    pyro.set_rng_seed(1)
    by_enumeration = -enumerated.loss(adgm.model, adgm.guide, x)

    # E_q(a|x) sum_y q(y|a,x) [log p(x|y,z) p(y) p(z) p(a|x,y,z) - log q(a|x) q(z|a,y,x)
    #                          - log q(y|a,x)],  z ~ q(z|a,y,x), written out by hand
    with torch.no_grad():
        q_a = adgm.aux_posterior(adgm.aux_encoder(x))
        a = q_a.rsample((draws,))
        xs = x.expand(draws, *x.shape)
        log_q_y = torch.log_softmax(adgm.classifier_net(torch.cat([xs, a], -1)), -1)
        explicit = 0.0
        for c in range(10):
            y = one_hot(torch.full(xs.shape[:2], c))
            q_z = adgm.posterior(adgm.encoder(torch.cat([xs, y, a], -1)))
            z = q_z.rsample()
            log_p = (
                adgm.likelihood(adgm.decoder(torch.cat([z, y], -1))).log_prob(xs)
                + adgm.prior().log_prob(z)
                + math.log(0.1)
                + adgm.aux_family(adgm.aux_decoder(torch.cat([xs, y, z], -1))).log_prob(a)
            )
            elbo_c = log_p - q_a.log_prob(a) - q_z.log_prob(z) - log_q_y[..., c]
            explicit += log_q_y[..., c].exp() * elbo_c
    assert by_enumeration == pytest.approx(explicit.mean(0).sum().item(), abs=0.5)


def test_the_aux_term_scores_the_labels_at_the_a_the_guide_drew(adgm, digits):
    x, labels = digits[0][:6], digits[1][:4]
    args = (x, x[:4], one_hot(labels))
    guide = poutine.trace(adgm.semi_guide).get_trace(*args)
    model = poutine.trace(poutine.replay(adgm.semi_model, trace=guide)).get_trace(*args)
    a = guide.nodes["labelled/a"]["value"]
    assert torch.equal(model.nodes["labelled/a"]["value"], a)
    aux = model.nodes["labelled/y_aux"]
    expected = adgm.classifier_net(torch.cat([x[:4], a], -1))
    assert torch.allclose(aux["fn"].logits, expected - expected.logsumexp(-1, keepdim=True))
    assert aux["scale"] == adgm.aux_weight
    assert guide.nodes["unlabelled/y"]["infer"]["enumerate"] == "parallel"
    assert "labelled/y" not in guide.nodes


def test_adgm_trains_from_the_cli_and_reloads(tmp_path, capsys):
    run = tmp_path / "adgm"
    small = ["--hidden", "64", "--latent-dim", "4", "--batch-size", "100", "--quiet"]
    assert main(["train", "--model", "adgm", "--epochs", "2", "--out", str(run), *small]) == 0
    summary = json.loads((run / "summary.json").read_text())
    model, data = load_run(run), ImageBatches(load_dataset("digits"))
    assert type(model) is ADGM and model.aux_dim == 4
    labels = data.dataset.test_labels
    correct = (model.predict(data.test_images) == labels).float().mean().item()
    assert summary["test_accuracy"] == pytest.approx(correct)
    assert (run / "analogies.png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == summary["test_accuracy"]


def test_adgm_trains_from_fit_and_learns_the_classes():
    pyro.set_rng_seed(0)
    model = ADGM((8, 8), latent_dim=4, hidden=(64,), labeled=100, aux_weight=5.0)
    result = fit(model, "digits", epochs=6, batch_size=100)
    accuracy = [m["validation_accuracy"] for m in result.metrics]
    assert accuracy[-1] > 0.5, accuracy  # chance is 0.1
    assert result.summary["labeled"] == 100
