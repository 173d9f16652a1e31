"""M2 (Kingma et al. 2014) on the bundled digits with 100 labels, from Python.

python examples/semi_supervised.py
"""

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.optim import Adam

from pyro_vae import ImageBatches, load_dataset
from pyro_vae.models.ssvae import SSVAE

pyro.set_rng_seed(0)
data = ImageBatches(load_dataset("digits"), "dynamic")
labels = data.dataset.train_labels
labelled = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(10)])
unlabelled = torch.tensor(sorted(set(range(data.num_train)) - set(labelled.tolist())))
y = torch.nn.functional.one_hot(labels[labelled], 10).float()

m2 = SSVAE((8, 8), latent_dim=8, hidden=(256,), prior="normal", aux_weight=10.0)
optim = Adam({"lr": 1e-3})
unsupervised = SVI(m2.model, m2.guide, optim, TraceEnum_ELBO(max_plate_nesting=1))  # sums over y
supervised = SVI(m2.model, m2.guide, optim, Trace_ELBO(max_plate_nesting=1))  # y observed
auxiliary = SVI(m2.classifier, m2.empty_guide, optim, Trace_ELBO(max_plate_nesting=1))

for _ in range(60):  # epochs over the unlabelled images
    for x in data.train_batches(100, unlabelled[torch.randperm(len(unlabelled))]):
        unsupervised.step(x)
        x_labelled = data.batch(labelled)
        supervised.step(x_labelled, y)
        auxiliary.step(x_labelled, y)

accuracy = (m2.predict(data.test_images) == data.dataset.test_labels).float().mean()
print(f"M2 test accuracy with 100 labels: {accuracy:.3f}")
