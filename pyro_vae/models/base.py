"""What every Pyro program of ours shares: its parameters registered with Pyro, split by owner.

A model owns the generative networks (decoder, likelihood, prior) and a guide
owns the rest, so ``model`` and ``guide`` each register only their own
parameters, once per step and without rebuilding names.
"""

from __future__ import annotations

import time
import weakref

import pyro
import torch
from torch import nn
from torch.nn.modules import module as _module

_structure_version = 0
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module of every cached program


def _module_structure_changed(parent: nn.Module, *_) -> None:
    """A watched module gained or replaced a submodule or parameter: the caches are stale.

    Modules nobody watches are ignored: Pyro's autoregressive networks slice their
    ``ModuleList`` on every forward pass, which builds (and registers into) a new one.
    """
    global _structure_version
    if parent in _watched:
        _structure_version += 1


_module.register_module_module_registration_hook(_module_structure_changed)
_module.register_module_parameter_registration_hook(_module_structure_changed)


TRAIN_TERMS_IMAGES = 10_000
"""At most this many training images (the first ones) give each epoch's ELBO terms."""


class PyroProgram(nn.Module):
    """An ``nn.Module`` whose parameters enter Pyro's param store under ``pyro_name``.

    Subclasses set ``pyro_name`` and list the generative modules in
    ``model_modules``; every other parameter belongs to the guide.

    It is also what ``pyro_vae.fit`` trains (``fit.Trainable``), with defaults for a
    program whose ``model(x, size=None)`` and ``guide(x, size=None)`` score a batch
    of flattened images ``x``, as the VAE's do: one SVI step per batch, the test
    ELBO after each epoch, log p(x) with the config's K at the end (for a program
    with one latent site per image), and the pictures it can draw
    (``reconstruct`` and ``generate``, where it has them). M2 overrides them.
    """

    pyro_name = "program"

    default_lr = 1e-3
    """Adam's learning rate where the config leaves ``train.lr`` unset (``fit`` writes it
    into the run's config)."""

    def model_modules(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def _pyro_params(self, part: str) -> list[tuple[str, torch.Tensor]]:
        """Param-store names and tensors of the model's or the guide's parameters, cached.

        ``.to()`` and ``load_state_dict`` keep these tensors, so the lists are built once,
        and again whenever one of its modules gains or replaces a submodule or parameter
        (``vae.prior = ...`` after training started), which PyTorch's global registration
        hooks tell.
        """
        lists = self.__dict__.get("_param_lists")
        if lists is None or lists["version"] != _structure_version:
            in_model = {id(p) for m in self.model_modules() for p in m.parameters()}
            named = [
                (f"{self.pyro_name}$$${n}", p)
                for n, p in self.named_parameters()
                if p.requires_grad
            ]
            _watched.update(self.modules())
            lists = self.__dict__["_param_lists"] = {
                "version": _structure_version,
                "model": [(n, p) for n, p in named if id(p) in in_model],
                "guide": [(n, p) for n, p in named if id(p) not in in_model],
            }
        return lists[part]

    def register(self, part: str) -> None:
        """Register the model's or the guide's parameters with Pyro, as ``pyro.module`` would.

        ``pyro.module`` keeps whatever tensors were first registered under a name, so
        a second program in the same process would silently have SVI step the first
        one's parameters. Entries that are not ours are evicted first.
        """
        if self.__dict__.get("_traced_step"):  # the traced step's inputs stand in for them
            return
        params = self._pyro_params(part)
        store = pyro.get_param_store()
        if any(name not in store or store[name] is not p for name, p in params):
            for name, _ in params:
                if name in store:
                    del store[name]
        for name, p in params:
            pyro.param(name, p)

    # What pyro_vae.fit asks (fit.Trainable), for a program over batches of images.

    def check_data(self, data, config) -> None:
        """Refuse, before any training, data outside the likelihood's support, and a final
        log p(x) that would take more than a day."""
        from ..evaluation import evaluate

        check = getattr(getattr(self, "likelihood", None), "check_support", None)
        if check is not None:
            for images in data.all_images():
                check(images)
        if len(data.test_images):
            evaluate.check_log_likelihood_time(self, data.test_images, config.inference.iw_samples)

    def svi_program(self):
        """The Pyro model and guide of one SVI step."""
        return self.model, self.guide

    def build_estimator(self, spec: str, num_particles: int):
        """The ELBO estimator named by ``spec`` (see ``pyro_vae.estimators``)."""
        from ..inference.elbos import estimators

        return estimators.build(spec, num_particles=num_particles, data_dim=self.data_dim)

    def train_batches(self, data, batch_size: int, epoch: int, seed: int, rank: int, world: int):
        """One epoch of ``(x,)``: the training images in an order set by (seed, epoch)."""
        from ..training.loop import Batches

        indices = self.index_batches(data, batch_size, epoch, seed, rank, world)
        steps = (self.step_args(data, index) for (index,) in indices)
        return Batches(steps, len(indices), indices.batch_size)

    def index_batches(self, data, batch_size: int, epoch: int, seed: int, rank: int, world: int):
        """:meth:`train_batches` as ``(index,)``, where each batch's images are, for a step
        that makes its batch itself (:meth:`step_args`), inside a CUDA graph. A subclass
        whose ``train_batches`` yields other arguments overrides both, or neither is used."""
        from ..training.loop import Batches

        order = data.epoch_order(seed, epoch)
        indices = data.train_indices(batch_size, order, rank, world)
        per_rank = max(1, min(batch_size, data.num_train) // world)
        count = -(-(data.num_train // world) // per_rank)
        return Batches(((i,) for i in indices), count, min(batch_size, data.num_train))

    def step_args(self, data, index):
        """The step arguments of the batch at ``index``: what :meth:`train_batches` yields."""
        return (data.batch(index),)

    def train_record(self, mean_loss: float | None) -> dict:
        """The training bound per image (None for an estimator whose loss is no bound)."""
        return {"train_elbo": None if mean_loss is None else -mean_loss}

    def held_out(self, data, config, world) -> dict:
        """The ELBO's two terms on as many training images as the test set has (at most
        10,000), binarized once as the test set is, and the test ELBO with its terms
        (``evaluate.elbo_terms``); draws seeded, so they do not move the training stream."""
        from ..evaluation import evaluate
        from ..training.loop import sharded

        test_images = data.test_images
        held = len(test_images) if test_images is not None and len(test_images) else None
        n = min(data.num_train, held or TRAIN_TERMS_IMAGES, TRAIN_TERMS_IMAGES)
        train_images = data.first_fixed(n)
        train = sharded(world, lambda x: evaluate.test_elbo_terms(self, x), train_images)
        record = {"train_recon": train["recon"], "train_kl": train["kl"]}
        if len(data.validation_images):
            record["validation_elbo"] = sharded(
                world, lambda x: evaluate.test_elbo(self, x), data.validation_images
            )
        if not held:
            return {**record, "test_elbo": None}
        test = sharded(world, lambda x: evaluate.test_elbo_terms(self, x), test_images)
        se = evaluate.standard_error_of(test["elbo"], test["elbo_sq"], len(test_images))
        return {
            **record,
            "test_elbo": test["elbo"],
            "test_elbo_se": se,
            "test_recon": test["recon"],
            "test_kl": test["kl"],
        }

    def watched(self, data) -> str | None:
        """The held-out number a plateau schedule watches: the validation ELBO, when training
        images are held out (``holdout``)."""
        return "validation_elbo" if len(data.validation_images) else None

    def summary(self, data, metrics: list, config, world) -> dict:
        """log p(x) by importance sampling with the config's K, seeded like the test ELBO."""
        from ..evaluation import evaluate
        from ..training.loop import sharded

        if data.test_images is None or not len(data.test_images):
            return {}
        k = config.inference.iw_samples
        started = time.perf_counter()

        def measure(x):
            per_image = evaluate.test_log_likelihood_per_image(self, x, k)
            return {"mean": per_image.mean().item(), "sq": per_image.square().mean().item()}

        log_px = sharded(world, measure, data.test_images)
        n = len(data.test_images)
        return {
            "log_px_of": getattr(self, "log_px_of", "x"),
            "log_px": log_px["mean"],
            "log_px_se": evaluate.standard_error_of(log_px["mean"], log_px["sq"], n),
            "iw_samples": k,
            "eval_seconds": time.perf_counter() - started,
            "likelihood": config.model.likelihood,
            "continuous": getattr(getattr(self, "likelihood", None), "continuous", False),
        }

    def checkpoint_extras(self) -> dict:
        """What a checkpoint keeps beside the weights to rebuild this model: nothing."""
        return {}

    def evaluate(
        self, data, iw_samples: int, seed: int, progress: bool = False, per_image: dict = None
    ) -> dict:
        """Held-out numbers of a trained model (``pyro-vae evaluate``), draws seeded; with
        ``per_image`` (a dict), its ``"log_px"`` is set to each test image's log p(x)."""
        from ..evaluation import evaluate

        test = data.test_images
        terms = evaluate.test_elbo_terms(self, test, seed)
        log_px = evaluate.test_log_likelihood_per_image(
            self, test, iw_samples, seed, progress=progress
        )
        if per_image is not None:
            per_image["log_px"] = log_px
        mean = log_px.mean().item()
        return {
            "test_elbo": terms["elbo"],
            "test_elbo_se": evaluate.standard_error_of(terms["elbo"], terms["elbo_sq"], len(test)),
            "test_recon": terms["recon"],
            "test_kl": terms["kl"],
            "log_px_of": getattr(self, "log_px_of", "x"),
            "log_px": mean,
            "log_px_se": evaluate.standard_error_of(mean, log_px.square().mean().item(), len(test)),
            "iw_samples": iw_samples,
            "continuous": getattr(getattr(self, "likelihood", None), "continuous", False),
        }

    def epoch_pictures(self, data) -> dict:
        """Image grids of this epoch for TensorBoard (``--tensorboard``): ten test images
        above their reconstructions, and twenty samples, their draws seeded."""
        from ..evaluation import plots
        from ..evaluation.evaluate import EVAL_SEED, seeded

        shape, test = getattr(self, "image_shape", None), data.test_images
        pictures = {}
        with seeded(EVAL_SEED, data.device):
            if shape and test is not None and len(test) and hasattr(self, "reconstruct"):
                shown = test[:10]
                both = torch.cat([shown, self.reconstruct(shown)])
                pictures["reconstructions"] = plots.grid_tensor(both, shape, len(shown))
            if shape and hasattr(self, "generate"):
                pictures["samples"] = plots.grid_tensor(self.generate(20), shape, 10)
        return pictures

    def save_pictures(self, data, run_dir, metrics: list) -> None:
        """reconstructions.png (test images above their reconstructions), samples.png, elbo.png."""
        from ..evaluation import plots

        shape = getattr(self, "image_shape", None)
        test = data.test_images
        if shape and test is not None and len(test) and hasattr(self, "reconstruct"):
            cols = min(10, len(test))
            shown = test[: min(50, len(test)) // cols * cols].reshape(-1, cols, test.shape[-1])
            rows = torch.stack([shown, self.reconstruct(shown.flatten(0, 1)).view_as(shown)], 1)
            plots.image_grid(
                rows.flatten(0, 2),
                shape,
                run_dir / "reconstructions.png",
                ncols=cols,
                title="Test images above their reconstructions (mean of p(x|z) at q's mean)",
                row_labels=["test", "recon."] * len(shown),
            )
        if shape and hasattr(self, "generate"):
            plots.image_grid(
                self.generate(100),
                shape,
                run_dir / "samples.png",
                title="Samples: the mean of p(x|z) for z ~ p(z)",
            )
        plots.elbo_curve(
            metrics, run_dir / "elbo.png", title=f"{data.dataset.name}: ELBO per epoch"
        )
