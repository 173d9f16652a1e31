"""Probe: M2 at 100 labels with Pyro's example's weight initialization, N(0, STD) (Issue 16).

Pyro's examples/vae/ss_vae_M2.py draws every weight and bias of its MLPs from
N(0, 0.001); PyTorch's default is Kaiming-uniform. This builds M2 as the config
says, re-draws every Linear layer's weight and bias from N(0, STD) (0: keep the
default), and trains with `fit`, logging each epoch (read the validation accuracy).

    python benchmarks/m2_init_probe.py STD EPOCHS SCHEDULE [pyro]
    python benchmarks/m2_init_probe.py 0.001 50 interleave pyro   # Pyro's example's settings
"""

import logging
import sys
import time

import pyro
import torch
from _common import default_data_dir

from pyro_vae import Config, ImageBatches, fit, load_dataset
from pyro_vae.models import build

logging.basicConfig(level=logging.INFO, format="%(message)s")
std, epochs, schedule = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
config = Config()
config.data.dataset, config.data.data_dir = "mnist", default_data_dir()
config.model.kind, config.model.hidden, config.model.latent_dim = "m2", [500], 50
config.semi.labeled = 100
config.semi.schedule = schedule
config.train.epochs = epochs
if len(sys.argv) > 4:  # Pyro's example: intensities, lr 4.2e-4, batch 200, alpha 46
    config.data.binarize = "none"
    config.train.lr, config.train.batch_size, config.semi.aux_weight = 4.2e-4, 200, 46.0
dataset = load_dataset("mnist", config.data.data_dir)
pyro.set_rng_seed(0)
model = build(config, dataset.image_shape, dataset.num_classes)
if std > 0:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, std)
                m.bias.normal_(0, std)
started = time.time()
result = fit(model, ImageBatches(dataset, config.data.binarize, seed=0), config=config)
for m in result.metrics:
    print(m["epoch"], round(m["validation_accuracy"], 4), round(m["style_nats"], 1), flush=True)
print("wall", time.time() - started)
