"""Semi-supervised M2 as a Pyro program: enumeration over y, its sites, components, the split."""

import math
from types import SimpleNamespace

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO

from pyro_vae import ImageBatches, PyroVAEError, load_dataset, semi
from pyro_vae.models.ssvae import SSVAE

from .helpers import one_hot, pyro_and_our_loss, static_digits


@pytest.fixture
def m2():
    pyro.set_rng_seed(0)
    return SSVAE((8, 8), latent_dim=3, hidden=(32,))


@pytest.fixture
def digits():
    return static_digits()


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
    m2 = SSVAE((8, 8), prior="mog:3", likelihood="cbernoulli")  # priors of their own are fine
    assert type(m2.prior).__name__ == "MixtureOfGaussiansPrior"


def test_one_step_holds_an_unlabelled_and_a_labelled_batch_with_the_aux_term(m2, digits):
    x, labels = digits[0][:6], digits[1][:4]
    model = poutine.trace(m2.semi_model).get_trace(x, x[:4], one_hot(labels))
    guide = poutine.trace(m2.semi_guide).get_trace(x, x[:4], one_hot(labels))
    assert {"unlabelled/z", "unlabelled/y", "unlabelled/x"} <= set(model.nodes)
    assert {"labelled/z", "labelled/y", "labelled/x", "labelled/y_aux"} <= set(model.nodes)
    assert not model.nodes["unlabelled/y"]["is_observed"]
    assert model.nodes["labelled/y"]["is_observed"]
    assert model.nodes["labelled/y_aux"]["scale"] == m2.aux_weight
    assert guide.nodes["unlabelled/y"]["infer"]["enumerate"] == "parallel"
    assert "labelled/y" not in guide.nodes
    # the step's objective is the sum of its parts, each a Pyro ELBO
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=3000, vectorize_particles=True)
    pyro.set_rng_seed(2)
    whole = elbo.loss(m2.semi_model, m2.semi_guide, x, x[:4], one_hot(labels))
    labelled = Trace_ELBO(max_plate_nesting=1, num_particles=3000, vectorize_particles=True)
    parts = elbo.loss(m2.model, m2.guide, x)
    parts += labelled.loss(m2.model, m2.guide, x[:4], one_hot(labels))
    parts += labelled.loss(m2.classifier, m2.empty_guide, x[:4], one_hot(labels))
    assert whole == pytest.approx(parts, abs=1.0)


@pytest.mark.parametrize(
    "prior, likelihood, guide",
    [("mog:3", "bernoulli", "lowrank:2"), ("flow:1", "cbernoulli", "iaf:1")],
)
def test_m2_takes_the_vae_components_and_learns(prior, likelihood, guide, digits):
    pyro.set_rng_seed(0)
    m2 = SSVAE((8, 8), latent_dim=3, hidden=(32,), prior=prior, likelihood=likelihood, guide=guide)
    svi = SVI(
        m2.semi_model, m2.semi_guide, pyro.optim.Adam({"lr": 3e-3}), semi.estimator("trace", 1)
    )
    x, labels = digits[0][:50], digits[1][:50]
    losses = [svi.step(x[10:], x[:10], one_hot(labels[:10])) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) < sum(losses[:8])


def test_the_split_is_class_balanced_disjoint_and_drawn_with_the_seed():
    labels = load_dataset("digits").train_labels
    parts = semi.split(labels, 10, 50, 300, seed=0)
    assert torch.bincount(labels[parts.labelled], minlength=10).tolist() == [5] * 10
    assert parts.validation.tolist() == list(range(1200, 1500))
    every = torch.cat([parts.labelled, parts.unlabelled, parts.validation]).sort().values
    assert every.tolist() == list(range(1500)), "disjoint and complete"
    assert semi.split(labels, 10, 50, 300, seed=0).labelled.equal(parts.labelled)
    assert not semi.split(labels, 10, 50, 300, seed=1).labelled.equal(parts.labelled)
    with pytest.raises(PyroVAEError, match="multiple of 10"):
        semi.split(labels, 10, 55, 300, seed=0)
    with pytest.raises(PyroVAEError, match="no unlabelled"):
        semi.split(labels, 10, 1200, 300, seed=0)


def test_the_readme_model_with_a_learned_class_prior_trains(digits):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    (snippet,) = [b for b in blocks if "class LearnedClassPrior" in b]
    namespace = {}
    exec(snippet, namespace)
    pyro.set_rng_seed(0)
    m2 = namespace["LearnedClassPrior"]((8, 8), latent_dim=3, hidden=(32,))
    svi = SVI(
        m2.semi_model, m2.semi_guide, pyro.optim.Adam({"lr": 1e-2}), semi.estimator("trace", 1)
    )
    x, labels = digits[0][:50], digits[1][:50]
    losses = [svi.step(x[10:], x[:10], one_hot(labels[:10])) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert m2.class_prior.logits.abs().sum() > 0, "p(y) was learned"


def epoch_of(schedule, aux_scaling="absolute", batch_size=100):
    """One epoch's steps of an M2 on the bundled digits (1,100 unlabelled, 100 labelled),
    with alpha 50."""
    model = SSVAE(
        (8, 8), latent_dim=3, hidden=(16,), schedule=schedule, aux_scaling=aux_scaling,
        aux_weight=50.0,
    )  # fmt: skip
    data = ImageBatches(load_dataset("digits"))
    return model, list(semi.train_batches(model, data, batch_size, epoch=1, seed=0))


def test_the_proportional_schedule_weighs_labelled_terms_as_the_objective_is_written():
    model, steps = epoch_of("proportional", batch_size=128)
    assert all(len(step) == 4 for step in steps), "a labelled batch and its scale every step"
    unlabelled = sum(len(step[0]) for step in steps)
    labelled_weight = sum(float(step[3]) * len(step[1]) for step in steps)
    # over an epoch each unlabelled image counts once, and the labelled ones 100 in all
    assert (unlabelled, labelled_weight) == (1100, pytest.approx(100, rel=1e-6))
    assert model.aux_per_image == model.aux_weight


def test_every_step_joins_an_unscaled_labelled_batch_to_each_step():
    model, steps = epoch_of("every-step")
    assert [len(step) for step in steps] == [3] * 11, "semi_model's default scale and alpha"
    assert [len(step[1]) for step in steps] == [100] * 11


def test_the_interleaved_schedule_passes_over_each_labelled_image_once_in_steps_of_its_own():
    model, steps = epoch_of("interleave", batch_size=30)
    labelled = [step for step in steps if len(step[0]) == 0]
    unlabelled = [step for step in steps if len(step[0])]
    assert all(len(step) == 1 for step in unlabelled), "no labelled batch beside unlabelled"
    assert sum(len(step[0]) for step in unlabelled) == 1100
    assert sum(len(step[1]) for step in labelled) == 100 and len(labelled) == 4
    data = ImageBatches(load_dataset("digits"))
    labelled_images = data.dataset.train_labels[semi.split_for_model(model, data, 0).labelled]
    assert sorted(torch.cat([s[2] for s in labelled]).argmax(-1).tolist()) == sorted(
        labelled_images.tolist()
    ), "each labelled image's label exactly once"
    where = [i for i, step in enumerate(steps) if len(step[0]) == 0]
    assert where == [5, 15, 25, 35], "spread evenly over the 41 steps"
    assert semi.interleaved(3, 1) == [False, False, True, False]


def test_data_scaling_weighs_the_mean_of_the_labelled_aux_terms_by_alpha_n(digits):
    model, _ = epoch_of("every-step", aux_scaling="data")
    # Kingma et al.'s alpha = 0.1 N over the labelled mean: with alpha 50,
    # 50 * 1200 / 100 per image (1,100 unlabelled and 100 labelled training images)
    assert model.aux_per_image == pytest.approx(50.0 * 1200 / 100)
    x, labels = digits[0][:4], digits[1][:4]
    aux = poutine.trace(model.semi_model).get_trace(x, x, one_hot(labels))
    assert aux.nodes["labelled/y_aux"]["scale"] == pytest.approx(600.0)
    model.aux_weight = 0.1
    assert model.aux_weight_per_image(100, 1200) == pytest.approx(1.2)
    absolute, _ = epoch_of("every-step")
    assert absolute.aux_per_image == 50.0


@pytest.mark.parametrize("kind", ["m2", "adgm"])
def test_data_scaling_outside_training_asks_for_the_counts_instead_of_using_alpha_as_is(
    kind, digits
):
    from pyro_vae import ADGM

    cls = SSVAE if kind == "m2" else ADGM
    model = cls((8, 8), latent_dim=3, hidden=(16,), aux_scaling="data", aux_weight=0.1)
    x, y = digits[0][:4], one_hot(digits[1][:4])
    with pytest.raises(PyroVAEError, match="aux_per_image = model.aux_weight_per_image"):
        poutine.trace(model.semi_model).get_trace(x, x, y)
    model.aux_per_image = model.aux_weight_per_image(100, 1200)
    aux = poutine.trace(model.semi_model).get_trace(x, x, y)
    assert aux.nodes["labelled/y_aux"]["scale"] == pytest.approx(1.2)


def test_the_labelled_scale_multiplies_the_labelled_terms_of_the_step(m2, digits):
    m2.aux_per_image = 50.0  # alpha; small enough for float32 sums to hold to 1e-6
    x, labels = digits[0][:6], digits[1][:4]
    args = (x, x[:4], one_hot(labels))
    elbo = TraceEnum_ELBO(max_plate_nesting=1)

    def loss(*args):
        pyro.set_rng_seed(3)  # the same draws: unlabelled first, then labelled
        return elbo.loss(m2.semi_model, m2.semi_guide, *args)

    with torch.no_grad():
        log_q = torch.log_softmax(m2.classifier_net(x[:4]), -1)
    aux_term = -(log_q * one_hot(labels)).sum().item()
    unlabelled = loss(x)
    labelled = loss(*args) - unlabelled  # ELBO(x_l, y) + alpha * log q(y|x_l), negated
    assert loss(*args, torch.tensor(0.25)) == pytest.approx(unlabelled + 0.25 * labelled)
    m2.aux_per_image = 7.0
    assert loss(*args) == pytest.approx(unlabelled + labelled + (7.0 - 50.0) * aux_term)
    m2.aux_per_image = 0.0
    assert loss(*args) == pytest.approx(unlabelled + labelled - 50.0 * aux_term)


def test_each_image_is_paired_with_another_of_its_class():
    labels = torch.tensor([3, 1, 3, 1, 3, 7])
    assert semi.same_class_partners(labels).tolist() == [2, 3, 4, 1, 0, 5]


def test_style_nats_is_own_z_against_a_same_class_image_z(m2, digits):
    x, labels = digits[0][:4], torch.tensor([1, 1, 2, 2])
    y = one_hot(labels)
    with torch.no_grad():
        z = m2.posterior(m2.encoder(torch.cat([x, y], -1))).mean

        def log_p(z_of):
            return m2.likelihood(m2.decoder(torch.cat([z[z_of], y], -1))).log_prob(x)

        expected = (log_p([0, 1, 2, 3]) - log_p([1, 0, 3, 2])).mean().item()
    assert semi.style_nats(m2, x, labels) == pytest.approx(expected, rel=1e-5)
    assert abs(expected) > 1e-3, "an untrained decoder still reads z"
    with torch.no_grad():
        m2.decoder[0].weight[:, : m2.latent_dim] = 0  # the decoder now ignores z
    assert semi.style_nats(m2, x, labels) == 0.0


def test_class_from_y_counts_decodings_the_classifier_gives_the_class_they_were_drawn_with(
    m2, digits
):
    x = digits[0][:30]
    with torch.no_grad():
        z = m2.style(x)
        expected = (
            sum(
                (m2.classifier_net(m2.decode(z, torch.full((30,), c))).argmax(-1) == c).sum().item()
                for c in range(10)
            )
            / 300
        )
    assert semi.class_from_y(m2, x) == expected
    # A stand-in whose decoder draws class c only for styles z >= c / 10 (else class 0):
    # of each image's 10 decodings, floor(10 z) + 1 keep their class (c = 0 always does).
    stub = SimpleNamespace(
        num_classes=10,
        style=lambda images: images[:, 0],
        decode=lambda z, c: one_hot(torch.where(z >= c / 10, c, 0)),
        class_logits_of=lambda decoded: decoded,
    )
    z = torch.rand(1001, 1)
    expected = ((z[:, 0] * 10).floor() + 1).sum().item() / (1001 * 10)
    assert semi.class_from_y(stub, z) == pytest.approx(expected, rel=1e-12)
    with torch.no_grad():
        m2.decoder[0].weight[:, m2.latent_dim :] = 0  # the decoder now ignores y
    assert semi.class_from_y(m2, x) == 0.1


@pytest.mark.parametrize(
    "kind", ["m2", "adgm", "m2-kl-weight", "m2-free-bits", "m2-3-particles", "adgm-3-particles"]
)
def test_the_traceable_enumerated_loss_is_pyros_loss_and_gradients(kind, digits):
    """``--compile`` traces ``Enum_ELBO.traceable_loss``; eager steps are Pyro's
    ``TraceEnum_ELBO``: under the same draws, the same loss and gradients, for a step with
    an unlabelled and a scaled labelled batch, the aux term, a KL weight, free bits, and
    vectorized particles (the ADGM's q(y|a,x) then varies along them)."""
    from pyro_vae.inference.kl import KLTerm
    from pyro_vae.models.adgm import ADGM

    pyro.set_rng_seed(0)
    model = (ADGM if kind.startswith("adgm") else SSVAE)((8, 8), latent_dim=3, hidden=(32,))
    kl = {"m2-kl-weight": KLTerm(0.25), "m2-free-bits": KLTerm(free_bits=0.5)}.get(kind, KLTerm())
    program = kl.wrap(*model.svi_program())
    images, labels = digits
    args = (images[:20], images[20:30], one_hot(labels[20:30]), torch.tensor(3.0))
    elbo = model.build_estimator("trace", 3 if "particles" in kind else 1)
    (pyro_loss, pyro_grads), (loss, grads) = pyro_and_our_loss(
        list(model.parameters()),
        lambda: elbo.loss_and_grads(*program, *args),
        lambda: elbo.traceable_loss(*program, *args),
    )
    assert loss == pytest.approx(pyro_loss, rel=1e-6)
    assert all(g is not None for g in pyro_grads)
    for a, b in zip(grads, pyro_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def _certain_model(x):
    with pyro.plate("data", 3):
        y = pyro.sample("y", pyro.distributions.Categorical(logits=torch.zeros(2)))
        pyro.sample("x", pyro.distributions.Delta(y.float()), obs=x)


def _certain_guide(x):
    with pyro.plate("data", 3):
        pyro.sample(
            "y",
            pyro.distributions.Categorical(logits=torch.tensor([-math.inf, 0.0])),
            infer={"enumerate": "parallel"},
        )


def test_a_class_of_probability_zero_counts_nothing_where_its_cost_is_infinite():
    """q(y = 0) = 0 and log p(x | y = 0) = -inf: Pyro's masked branch leaves the class out,
    and so must the traceable loss (0 * inf would be NaN)."""
    from pyro_vae.inference.elbos import Enum_ELBO

    x = torch.ones(3)
    elbo = Enum_ELBO(max_plate_nesting=1)
    expected = elbo.loss(_certain_model, _certain_guide, x)
    assert expected == pytest.approx(3 * math.log(2))
    with pyro.validation_enabled(False):
        loss = elbo.traceable_loss(_certain_model, _certain_guide, x)
    assert loss.item() == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")
def test_the_traceable_enumerated_loss_refuses_what_it_does_not_sum():
    from pyro_vae.inference.elbos import Enum_ELBO

    def model(x):
        with pyro.plate("data", 3):
            y = pyro.sample("y", pyro.distributions.Bernoulli(0.5), infer={"enumerate": "parallel"})
            pyro.sample("x", pyro.distributions.Normal(y, 1.0), obs=x)

    elbo = Enum_ELBO(max_plate_nesting=1)
    with pytest.raises(ValueError, match="the model enumerates 'y'"):
        elbo.traceable_loss(model, lambda x: None, torch.zeros(3))

    def score_guide(x):
        with pyro.plate("data", 3):
            pyro.sample("y", pyro.distributions.Bernoulli(0.5))

    with pytest.raises(ValueError, match="'y' is neither enumerated in parallel"):
        elbo.traceable_loss(model, score_guide, torch.zeros(3))

    def two_model(x):
        with pyro.plate("data", 3):
            y1 = pyro.sample("y1", pyro.distributions.Bernoulli(0.5))
            y2 = pyro.sample("y2", pyro.distributions.Bernoulli(0.5))
            pyro.sample("x", pyro.distributions.Normal(y1 + y2, 1.0), obs=x)

    def nested_guide(x):  # q(y2 | y1): not a product of independent q's
        with pyro.plate("data", 3):
            enumerated = {"enumerate": "parallel"}
            y1 = pyro.sample("y1", pyro.distributions.Bernoulli(0.3), infer=enumerated)
            pyro.sample("y2", pyro.distributions.Bernoulli(0.2 + 0.6 * y1), infer=enumerated)

    with pytest.raises(ValueError, match="'y2' depends on another one"):
        elbo.traceable_loss(two_model, nested_guide, torch.zeros(3))
