"""Learning-rate schedules by spec: ``exponential:0.95``, ``plateau:0.5:3``, ``onecycle:3e-3``.

Each is PyTorch's own scheduler, the one Pyro's ``pyro.optim.ExponentialLR``,
``ReduceLROnPlateau``, ``OneCycleLR`` and friends wrap, with its arguments. Pyro's
wrappers make one optimizer and one scheduler per parameter; ours drive the
single hyperparameter group of :class:`~pyro_vae.inference.optim.Adam` (its
learning rate, and its beta1 where the schedule cycles momentum), so the fused
update stays one kernel. A schedule steps once an epoch (``per_step=False``) or
once a training step (``onecycle``); ``plateau`` watches the held-out number the
model names (the validation ELBO of a VAE with ``--holdout``, M2's validation
accuracy). Schedules whose shape spans the configured epochs (``cosine``,
``onecycle``) say so (``spans_run``): a resumed run may not extend them.
:class:`Schedule` is what the training loop drives: when to step, what to record,
what a checkpoint keeps.
"""

from __future__ import annotations

from torch.optim import lr_scheduler

from ..errors import PyroVAEError
from ..registry import Arg, Registry, open_unit_interval_float, positive_float, positive_int

schedules = Registry("schedule", per_step=False, watches=False, spans_run=False)
"""Learning-rate schedules by spec. Each factory takes the optimizer's parameter group
holder (``Adam.hyperparameters``), the run's epochs and steps per epoch, and returns a
``torch.optim.lr_scheduler`` scheduler (None for ``none``)."""


@schedules.register("none")
def constant(optimizer, epochs: int, steps_per_epoch: int):
    """The learning rate as configured, throughout."""
    return None


@schedules.register("exponential", Arg("GAMMA", open_unit_interval_float, example="0.95"))
def exponential(optimizer, epochs: int, steps_per_epoch: int, GAMMA: float):
    """lr * GAMMA^epoch (``pyro.optim.ExponentialLR``)."""
    return lr_scheduler.ExponentialLR(optimizer, gamma=GAMMA)


@schedules.register(
    "step",
    Arg("EPOCHS", positive_int, example="5"),
    Arg("GAMMA", open_unit_interval_float, example="0.5"),
)
def step(optimizer, epochs: int, steps_per_epoch: int, EPOCHS: int, GAMMA: float):
    """lr times GAMMA every EPOCHS epochs (``pyro.optim.StepLR``)."""
    return lr_scheduler.StepLR(optimizer, step_size=EPOCHS, gamma=GAMMA)


@schedules.register("cosine", spans_run=True)
def cosine(optimizer, epochs: int, steps_per_epoch: int):
    """Cosine annealing from lr to 0 over the run's epochs (Loshchilov & Hutter 2017;
    ``pyro.optim.CosineAnnealingLR``)."""
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


@schedules.register(
    "plateau",
    Arg("FACTOR", open_unit_interval_float, 0.5, example="0.5"),
    Arg("PATIENCE", positive_int, 3, example="2"),
    watches=True,
)
def plateau(optimizer, epochs: int, steps_per_epoch: int, FACTOR: float, PATIENCE: int):
    """lr times FACTOR when the watched held-out number has not improved for PATIENCE
    epochs (``pyro.optim.ReduceLROnPlateau``, mode max: ELBOs and accuracies rise; an
    improvement is absolute, by more than 1e-4, since a relative one misjudges negative
    ELBOs)."""
    return lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=FACTOR, patience=PATIENCE, threshold_mode="abs"
    )


@schedules.register(
    "onecycle", Arg("MAX_LR", positive_float, example="0.003"), per_step=True, spans_run=True
)
def onecycle(optimizer, epochs: int, steps_per_epoch: int, MAX_LR: float):
    """The one-cycle policy over the run's steps (Smith & Topin 2019; ``pyro.optim.OneCycleLR``):
    lr rises to MAX_LR and anneals, beta1 cycles the other way."""
    return lr_scheduler.OneCycleLR(
        optimizer, max_lr=MAX_LR, epochs=epochs, steps_per_epoch=steps_per_epoch
    )


class Schedule:
    """The learning-rate schedule of a run (``--lr-schedule``), as the loop drives it: made
    at the first epoch, when the steps per epoch are known; stepped after each training
    step or each epoch (``plateau`` with the record's ``watched`` number); restored from
    and saved into checkpoints with the learning rate and betas in force.

    Args:
        config: the run's config (its ``lr_schedule`` and ``epochs``).
        watched: the key of the held-out number the model offers a plateau schedule, or
            None where it has none (which ``plateau`` refuses).
    """

    def __init__(self, config, watched: str | None):
        self.spec, self.epochs = config.train.lr_schedule, config.train.epochs
        self.entry, self.values = schedules.parse(self.spec)
        self.watched = watched if self.entry.watches else None
        if self.entry.watches and watched is None:
            raise PyroVAEError(
                f"--lr-schedule {self.spec} watches a validation number, and this run "
                f"has none: hold out training images with --holdout N (M2 and its kin: "
                f"--validation N)"
            )
        self.optimizer, self.scheduler, self.saved = None, None, None

    def restore(self, optimizer, checkpoint: dict | None) -> None:
        """Drive ``optimizer`` (an ``inference.optim.Adam``), from ``checkpoint``'s state."""
        self.optimizer, self.last_used = optimizer, optimizer.lr
        self.saved = (checkpoint or {}).get("schedule")

    @property
    def active(self) -> bool:
        return self.entry.name != "none"

    def start(self, steps_per_epoch: int) -> None:
        if not self.active or self.scheduler is not None:
            return
        group = self.optimizer.hyperparameters.group
        self.scheduler = self.entry.factory(
            self.optimizer.hyperparameters, self.epochs, steps_per_epoch, **self.values
        )
        if self.saved:
            group["lr"], group["betas"] = self.saved["lr"], tuple(self.saved["betas"])
            self.scheduler.load_state_dict(self.saved["scheduler"])

    def after_step(self) -> None:
        if self.scheduler is not None and self.entry.per_step:
            self.last_used = self.optimizer.lr
            self.scheduler.step()

    def record(self) -> dict[str, float]:
        """The learning rate of the epoch's last step (with a schedule)."""
        if not self.active:
            return {}
        return {"lr": self.last_used if self.entry.per_step else self.optimizer.lr}

    def after_epoch(self, record: dict) -> None:
        if self.scheduler is None or self.entry.per_step:
            return
        if self.watched:
            self.scheduler.step(record[self.watched])
        else:
            self.scheduler.step()

    def state(self) -> dict:
        group = self.optimizer.hyperparameters.group
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else {}
        return {"lr": group["lr"], "betas": list(group["betas"]), "scheduler": scheduler}
