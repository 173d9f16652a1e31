"""Semi-supervised M2: enumeration over y, labelled and unlabelled sites, accuracy."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_vae import ImageBatches, PyroVAEError, load_dataset
from pyro_vae.models.ssvae import SSVAE


@pytest.fixture
def m2():
    pyro.set_rng_seed(0)
    return SSVAE((8, 8), latent_dim=3, hidden=(32,))


@pytest.fixture
def digits():
    data = ImageBatches(load_dataset("digits"), "static")
    return data.test_images, data.dataset.test_labels


def one_hot(labels, n=10):
    return torch.nn.functional.one_hot(labels, n).float()


def test_the_enumerated_elbo_over_y_equals_the_explicit_sum_over_classes(m2, digits):
    x = digits[0][:6]
    enumerated = TraceEnum_ELBO(max_plate_nesting=1, num_particles=2000, vectorize_particles=True)
    pyro.set_rng_seed(1)
    by_enumeration = -enumerated.loss(m2.model, m2.guide, x)

    # sum_y q(y|x) [ELBO(x, y) - log q(y|x)], each ELBO(x, y) with y observed in both.
    with torch.no_grad():
        log_q_y = torch.log_softmax(m2.classifier_net(x), -1)
    labelled = Trace_ELBO(max_plate_nesting=1, num_particles=2000, vectorize_particles=True)
    explicit = 0.0
    for c in range(10):
        y = one_hot(torch.full((len(x),), c))
        per_image = []
        for i in range(len(x)):
            elbo_c = -labelled.loss(m2.model, m2.guide, x[i : i + 1], y[i : i + 1])
            per_image.append(log_q_y[i, c].exp() * (elbo_c - log_q_y[i, c]))
        explicit += sum(per_image)
    assert by_enumeration == pytest.approx(float(explicit), abs=0.5), "within MC error"


def test_labelled_and_unlabelled_batches_have_the_right_sites(m2, digits):
    x, labels = digits[0][:5], digits[1][:5]
    unlabelled = poutine.trace(m2.guide).get_trace(x)
    assert unlabelled.nodes["y"]["infer"]["enumerate"] == "parallel"
    labelled_guide = poutine.trace(m2.guide).get_trace(x, one_hot(labels))
    assert "y" not in labelled_guide.nodes
    model = poutine.trace(m2.model).get_trace(x, one_hot(labels))
    assert model.nodes["y"]["is_observed"] and model.nodes["x"]["is_observed"]
    assert not model.nodes["z"]["is_observed"]
    aux = poutine.trace(m2.classifier).get_trace(x, one_hot(labels))
    assert aux.nodes["y_aux"]["is_observed"] and aux.nodes["y_aux"]["scale"] == m2.aux_weight


def test_priors_defined_through_the_vae_encoder_are_refused():
    with pytest.raises(PyroVAEError, match="does not apply to M2"):
        SSVAE((8, 8), prior="vamp:5")
    assert math.isfinite(SSVAE((8, 8), prior="mog:3", likelihood="cbernoulli").latent_dim)
