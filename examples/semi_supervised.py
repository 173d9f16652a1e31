"""M2 (Kingma et al. 2014) on the bundled digits with 100 labels, from Python.

The same run from the command line:
    pyro-vae train --model m2 --dataset digits --labeled 100 --latent-dim 8 --aux-weight 5 \
        --labelled-schedule every-step --epochs 60

python examples/semi_supervised.py
"""

import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam

from pyro_vae import SSVAE, ImageBatches, load_dataset, semi

pyro.set_rng_seed(0)
data = ImageBatches(load_dataset("digits"), "dynamic")
labels = data.dataset.train_labels
parts = semi.split(labels, 10, labeled=100, validation=300, seed=0)
y = torch.nn.functional.one_hot(labels[parts.labelled], 10).float()

m2 = SSVAE((8, 8), latent_dim=8, hidden=(400,), prior="normal", aux_weight=5.0)
# One step: an unlabelled batch (y summed out by enumeration) + the labelled images.
svi = SVI(m2.semi_model, m2.semi_guide, Adam({"lr": 1e-3}), TraceEnum_ELBO(max_plate_nesting=1))

for _ in range(60):  # epochs
    order = parts.unlabelled[torch.randperm(len(parts.unlabelled))]
    for x in data.train_batches(128, order):
        svi.step(x, data.batch(parts.labelled), y)

test_labels = data.dataset.test_labels
print(f"M2 test accuracy with 100 labels: {semi.accuracy(m2, data.test_images, test_labels):.3f}")
