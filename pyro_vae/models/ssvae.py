"""Semi-supervised VAEs: M2 and M1+M2 (Kingma et al. 2014) as Pyro models and guides.

M2's model is p(y) p(z) p(x|y,z) with y ~ OneHotCategorical, observed when
labelled; its guide is q(y|x) q(z|x,y). For unlabelled images ``TraceEnum_ELBO``
sums over y exactly (parallel enumeration of the guide's y site), and
``classifier`` adds the auxiliary term alpha * log q(y|x) on labelled images.
Prior, likelihood and guide family are the components the VAE uses, chosen by
the same specs. M1+M2 runs M2 on the latent means of a trained, frozen VAE (M1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.autoname import scope
from torch import nn

from ..components.guides import guides
from ..components.likelihoods import likelihoods
from ..components.nets import architectures, mlp
from ..components.priors import priors
from ..config import AUX_SCALINGS, LABELLED_SCHEDULES, M1_FEATURES, SemiConfig
from ..errors import PyroVAEError
from ..registry import check_positive
from .base import PyroProgram
from .vae import VAE


def broadcast_cat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the leading (batch, enum) dims."""
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*lead, t.shape[-1]) for t in tensors], dim=-1)


class SSVAE(PyroProgram):
    """M2: a VAE whose latent code is (y, z), y the class, z the style.

    Args:
        image_shape: shape of one input; inputs arrive flattened.
        num_classes: number of classes of y.
        latent_dim: size of z.
        hidden: hidden sizes of the three MLPs (classifier q(y|x), encoder q(z|x,y)
            and the decoder p(x|y,z), which mirrors them).
        prior, likelihood, guide: component specs or objects, as for ``VAE``
            (priors defined through the encoder, the VampPrior, do not apply).
        aux_weight: alpha of the auxiliary classification loss (default: the config's).
        aux_scaling: ``"absolute"``: alpha weighs each labelled image's log q(y|x);
            ``"data"``: alpha * N weighs their mean, N the training images (labelled and
            unlabelled), as Kingma et al.'s alpha = 0.1 N: alpha * N / labelled per image.
        schedule: how labelled images join training (``training.semi.train_batches``):
            ``"every-step"``, ``"proportional"`` or ``"interleave"``.
        labeled: class-balanced labelled training images it trains with (default: the
            config's), drawn with the training seed.
        validation: training images held out of both (None: 10,000, or a fifth of
            the training set when that is fewer).
        classifier: the network of q(y|x), an architecture by name (its encoder, with
            the hidden sizes, to the class logits): ``"mlp"`` or ``"conv"``.
    """

    pyro_name = "ssvae"

    default_lr = 3e-3
    """Chosen on MNIST validation accuracy at 100 labels over seeds 0-2 (docs/RESULTS.md,
    "M2 at 100 labels, session 11")."""

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int = 10,
        latent_dim: int = 50,
        hidden: Sequence[int] = (500,),
        prior: Any = "normal",
        likelihood: Any = "bernoulli",
        guide: Any = "normal",
        aux_weight: float = SemiConfig.aux_weight,
        aux_scaling: str = SemiConfig.aux_scaling,
        schedule: str = SemiConfig.schedule,
        labeled: int = SemiConfig.labeled,
        validation: int | None = SemiConfig.validation,
        classifier: str = SemiConfig.classifier,
    ):
        check_positive(
            num_classes=num_classes,
            latent_dim=latent_dim,
            **{f"hidden[{i}]": h for i, h in enumerate(hidden)},
        )
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.data_dim = math.prod(self.image_shape)
        self.num_classes, self.latent_dim, self.aux_weight = num_classes, latent_dim, aux_weight
        self.labeled, self.validation = labeled, validation
        if aux_scaling not in AUX_SCALINGS:
            raise PyroVAEError(f"aux_scaling must be one of {', '.join(AUX_SCALINGS)}")
        if schedule not in LABELLED_SCHEDULES:
            raise PyroVAEError(f"schedule must be one of {', '.join(LABELLED_SCHEDULES)}")
        self.aux_scaling, self.schedule = aux_scaling, schedule
        self.aux_per_image: float | None = None
        """alpha per labelled image as training set it (None: unset; see ``aux_term_weight``)."""
        self.likelihood = likelihoods.build(likelihood, data_dim=self.data_dim)
        self.posterior = guides.build(guide, latent_dim=latent_dim)
        try:
            self.prior = priors.build(prior, latent_dim=latent_dim, data_dim=self.data_dim)
        except TypeError:
            raise PyroVAEError(
                f"prior {prior!r} is defined through the VAE's encoder and does not apply to M2"
            ) from None
        if classifier == "mlp":
            self.classifier_net = mlp([self.data_dim, *hidden, num_classes])
        else:  # the architecture's encoder, to the logits (its decoder is not used)
            self.classifier_net, _ = architectures.build(
                classifier,
                image_shape=self.image_shape,
                hidden=tuple(hidden),
                latent_dim=1,
                encoder_out=num_classes,
                decoder_out=self.data_dim,
            )
        self.encoder = mlp([self.data_dim + num_classes, *hidden, self.posterior.param_dim])
        self.decoder = mlp([latent_dim + num_classes, *reversed(hidden), self.likelihood.param_dim])
        self.register_buffer("class_logits", torch.zeros(num_classes))  # uniform p(y)

    def model_modules(self) -> tuple[nn.Module, ...]:
        return (self.decoder, self.likelihood, self.prior)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None, plate: str = "data") -> None:
        """p(y) p(z) p(x|y,z); ``y`` one-hot labels, or None for unlabelled images."""
        self.register("model")
        with pyro.plate(plate, x.shape[0]):
            z = pyro.sample("z", self.prior())
            y = pyro.sample("y", dist.OneHotCategorical(logits=self.class_logits), obs=y)
            pyro.sample("x", self.likelihood(self.decoder(broadcast_cat(z, y))), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None, plate: str = "data") -> None:
        """q(y|x) q(z|x,y); y is sampled (enumerated by TraceEnum_ELBO) only when unlabelled."""
        self.register("guide")
        with pyro.plate(plate, x.shape[0]):
            if y is None:
                y = pyro.sample(
                    "y",
                    dist.OneHotCategorical(logits=self.classifier_net(x)),
                    infer={"enumerate": "parallel"},
                )
            pyro.sample("z", self.posterior(self.encoder(broadcast_cat(x, y))))

    def classifier(self, x: torch.Tensor, y: torch.Tensor, plate: str = "data") -> None:
        """The auxiliary model: alpha * log q(y|x) on labelled images (its guide is empty),
        alpha the weight per image that ``aux_scaling`` gives (no term when it is 0)."""
        self.register("guide")
        weight = self.aux_term_weight()
        if weight == 0:  # poutine.scale refuses 0, and the term is nothing
            return
        with pyro.plate(plate, x.shape[0]), pyro.poutine.scale(scale=weight):
            pyro.sample("y_aux", dist.OneHotCategorical(logits=self.classifier_net(x)), obs=y)

    def empty_guide(self, x: torch.Tensor, y: torch.Tensor, plate: str = "data") -> None:
        """The guide of ``classifier``: it has no latent variables."""

    def aux_term_weight(self) -> float:
        """alpha per labelled image in the aux term: as training set it (``aux_per_image``),
        else ``aux_weight`` itself where the scaling is ``absolute``. ``data`` scaling needs
        the training set's counts, so a model stepped outside ``train`` must be told them."""
        if self.aux_per_image is not None:
            return self.aux_per_image
        if self.aux_scaling == "data":
            raise PyroVAEError(
                "aux_scaling='data' weighs alpha by the training set's size, which training "
                "sets; stepping SVI yourself, set model.aux_per_image = "
                "model.aux_weight_per_image(labelled, images) first, or use "
                "aux_scaling='absolute'"
            )
        return self.aux_weight

    def aux_weight_per_image(self, labelled: int, images: int) -> float:
        """The weight of one labelled image's log q(y|x), given the counts of labelled and
        of all training images (``aux_scaling``); training sets ``aux_per_image`` to it."""
        if self.aux_scaling == "data":
            return self.aux_weight * images / labelled
        return self.aux_weight

    def semi_model(
        self,
        x: torch.Tensor,
        x_labelled: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        labelled_scale: float | torch.Tensor = 1.0,
    ) -> None:
        """Kingma et al.'s objective in one program: an unlabelled and, maybe, a labelled batch.

        ELBO(x) with y summed out, plus ``labelled_scale`` * (ELBO(x_labelled, y) +
        alpha * log q(y|x_labelled)). An empty ``x`` is a step of labelled images only.
        Sites are named ``unlabelled/...`` and ``labelled/...``.
        """
        if x.shape[0]:
            with scope(prefix="unlabelled"):
                self.model(x, plate="unlabelled")
        if x_labelled is not None:
            with scope(prefix="labelled"), pyro.poutine.scale(scale=labelled_scale):
                self.labelled_terms(x_labelled, y)

    def labelled_terms(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The model's part for labelled images: ELBO(x, y)'s model and the aux term."""
        self.model(x, y, plate="labelled")
        self.classifier(x, y, plate="labelled_aux")

    def semi_guide(
        self,
        x: torch.Tensor,
        x_labelled: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        labelled_scale: float | torch.Tensor = 1.0,
    ) -> None:
        """The guide of ``semi_model``."""
        if x.shape[0]:
            with scope(prefix="unlabelled"):
                self.guide(x, plate="unlabelled")
        if x_labelled is not None:
            with scope(prefix="labelled"), pyro.poutine.scale(scale=labelled_scale):
                self.guide(x_labelled, y, plate="labelled")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What M2 models, from flattened images: the images themselves."""
        return images

    def train_features(self, images: torch.Tensor) -> torch.Tensor:
        """What a training step models (``features`` unless a subclass draws them)."""
        return self.features(images)

    @torch.no_grad()
    def class_logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y|x) for features ``x``."""
        return self.classifier_net(x)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y|x), as indices."""
        return self.class_logits_of(self.features(images)).argmax(-1)

    def z_posterior(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """q(z|x,y) for features ``x`` and one-hot ``y``."""
        return self.posterior(self.encoder(torch.cat([x, y], -1)))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Means of p(x|y,z) for latent codes ``z`` (N, latent_dim) and class indices ``y`` (N,)."""
        one_hot = nn.functional.one_hot(y, self.num_classes).to(z)
        return self.likelihood(self.decoder(torch.cat([z, one_hot], -1))).mean

    @torch.no_grad()
    def style(self, images: torch.Tensor) -> torch.Tensor:
        """z of each image: the mean of q(z|x, y) at the predicted y (a draw for flows)."""
        x = self.features(images)
        y = nn.functional.one_hot(self.class_logits_of(x).argmax(-1), self.num_classes).to(x)
        q = self.z_posterior(x, y)
        try:
            return q.mean
        except NotImplementedError:
            return q.sample()

    def image(self, decoded: torch.Tensor) -> torch.Tensor:
        """Images from what ``decode`` returns: the same for M2."""
        return decoded

    @torch.no_grad()
    def generate(self, n: int) -> torch.Tensor:
        """``n`` images, row by row of ``num_classes``: row r has class r (mod the classes),
        column c the style z_c ~ p(z), shared down the column. Shape (n, D)."""
        k = self.num_classes
        z = self.prior().sample((k,))
        i = torch.arange(n, device=z.device)
        return self.image(self.decode(z[i % k], (i // k) % k))

    # What pyro_vae.fit asks (fit.Trainable): the semi-supervised step and its numbers.

    def check_data(self, data, config) -> None:
        """Refuse an impossible split, and data outside the likelihood's support."""
        from ..training import semi

        if data.dataset.train_labels is None:
            raise PyroVAEError(f"{type(self).__name__} learns from labels: the data has none")
        if len(data.validation_images):
            raise PyroVAEError(
                f"{type(self).__name__} holds out its own validation images (--validation); "
                f"drop --holdout"
            )
        semi.split_for_model(self, data, config.train.seed)
        for images in data.all_images():
            self.likelihood.check_support(self.features(images))

    def svi_program(self):
        return self.semi_model, self.semi_guide

    def watched(self, data) -> str | None:
        """What a plateau schedule watches: the validation accuracy (None without validation
        images)."""
        return "validation_accuracy" if self.validation != 0 else None

    def build_estimator(self, spec: str, num_particles: int):
        from ..training import semi

        return semi.estimator(spec, num_particles, self.schedule)

    def train_batches(self, data, batch_size: int, epoch: int, seed: int, rank: int, world: int):
        from ..training import semi

        return semi.train_batches(self, data, batch_size, epoch, seed)

    def train_record(self, mean_loss: float | None) -> dict:
        return {"train_loss": mean_loss}

    def held_out(self, data, config, world) -> dict:
        from ..training import semi

        return semi.held_out(self, data, config.train.seed)

    def summary(self, data, metrics: list, config, world) -> dict:
        from ..training import semi

        parts = semi.split_for_model(self, data, config.train.seed)
        return {
            **semi.summarize(parts, metrics),
            "likelihood": config.model.likelihood,
            "continuous": getattr(self.likelihood, "continuous", False),
        }

    def epoch_pictures(self, data) -> dict:
        """For TensorBoard: conditional samples, a row per class (draws seeded)."""
        from ..evaluation import plots
        from ..evaluation.evaluate import EVAL_SEED, seeded

        n = self.num_classes
        with seeded(EVAL_SEED, data.device):
            return {
                "conditional_samples": plots.grid_tensor(self.generate(n * n), self.image_shape, n)
            }

    def save_pictures(self, data, run_dir, metrics: list) -> None:
        from ..training import semi

        semi.save_pictures(self, data, run_dir, metrics)

    def checkpoint_extras(self) -> dict:
        return {"num_classes": self.num_classes}

    def evaluate(self, data, iw_samples: int, seed: int, progress: bool = False) -> dict:
        """Test accuracy and the test ELBO with y summed out (no log p(x))."""
        from ..training import semi

        return semi.evaluate(self, data, seed)


class M1M2(SSVAE):
    """Kingma et al.'s stacked model: M2 over the latent means of a trained VAE, M1.

    M1 is frozen and outside Pyro's param store: M2 sees ``features(images)``, the
    mean of M1's q(z1|x), and pictures go back through M1's decoder. With
    ``m1_features="sample"`` training steps see draws of q(z1|x) instead
    (``train_features``); every held-out number still reads the mean.
    """

    pyro_name = "m1m2"

    default_lr = 3e-3
    """M1+M2's measured rate, as M2's: ahead of 1e-3 on validation on seeds 0-2 at 100
    labels (docs/RESULTS.md)."""

    def __init__(self, m1: VAE, m1_features: str = SemiConfig.m1_features, **m2_options: Any):
        super().__init__((m1.latent_dim,), **m2_options)
        if m1_features not in M1_FEATURES:
            raise PyroVAEError(f"m1_features must be one of {', '.join(M1_FEATURES)}")
        self.m1 = m1.requires_grad_(False).eval()
        self.m1_features = m1_features
        self.image_shape = m1.image_shape

    def train(self, mode: bool = True) -> M1M2:
        super().train(mode)
        self.m1.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        q = self.m1.encode(images)
        try:
            return q.mean
        except NotImplementedError:  # flows have no closed-form mean
            return q.sample()

    @torch.no_grad()
    def train_features(self, images: torch.Tensor) -> torch.Tensor:
        """The mean of q(z1|x), or with ``m1_features="sample"`` a fresh draw z1 ~ q(z1|x)
        from torch's generator (Kingma et al. 2014 train M2 on such draws)."""
        if self.m1_features == "mean":
            return self.features(images)
        return self.m1.encode(images).sample()

    @torch.no_grad()
    def image(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.m1.likelihood(self.m1.decoder(decoded)).mean

    def checkpoint_extras(self) -> dict:
        """M1's config and image shape: its weights are in the state dict already."""
        from ..config import to_dict

        m1 = {"config": to_dict(self.m1.config), "image_shape": list(self.m1.image_shape)}
        return {**super().checkpoint_extras(), "m1": m1}

    def check_data(self, data, config) -> None:
        try:
            super().check_data(data, config)
        except PyroVAEError as e:
            if "likelihood" not in str(e):
                raise
            raise PyroVAEError(
                f"M1+M2 models the M1 run's latent means, which are real numbers: {e}; "
                f"use --likelihood gaussian"
            ) from None
