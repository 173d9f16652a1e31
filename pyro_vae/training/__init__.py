"""Training: the one loop every model runs (``loop``), the config-driven ``train`` and
``resume`` of the CLI, the run folder (``runs``), torchrun, devices and memory limits,
and the semi-supervised split and batches."""
