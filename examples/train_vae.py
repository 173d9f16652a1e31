"""Train a VAE on the bundled digits from Python: the model is a Pyro program, SVI fits it.

python examples/train_vae.py
"""

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import VAE, ImageBatches, elbo, load_dataset, log_likelihood

pyro.set_rng_seed(0)
data = ImageBatches(load_dataset("digits"), binarize="dynamic")
vae = VAE(image_shape=(8, 8), latent_dim=16, hidden=[256], prior="normal", likelihood="bernoulli")
svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())

for epoch in range(1, 101):
    loss = sum(svi.step(x) for x in data.train_batches(batch_size=64))
    if epoch % 20 == 0:
        print(f"epoch {epoch}: train ELBO {-loss / data.num_train:.2f} nats/image")

vae.eval()
print(f"test ELBO    {elbo(vae, data.test_images):.2f} nats/image")
print(f"test log p(x) {log_likelihood(vae, data.test_images, num_samples=500):.2f} (K=500)")
with torch.no_grad():
    print("a sample from p(z) p(x|z), as 8x8 means:")
    print((vae.generate(1).reshape(8, 8) * 9).round().int())
