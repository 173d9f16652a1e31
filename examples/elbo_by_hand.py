"""The ELBO's terms checked by hand on one batch (docs/VAE_IN_PYRO.md, section by section).

1. Pyro's Trace_ELBO equals reconstruction minus the closed-form KL, within Monte Carlo error.
2. The importance-sampled log p(x) lies above the ELBO.

python examples/elbo_by_hand.py [--epochs 150]
"""

import argparse
import math

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

from pyro_vae import VAE, ImageBatches, fit, load_dataset, log_likelihood

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=150, help="of training on the digits")
epochs = parser.parse_args().epochs

pyro.set_rng_seed(0)
vae = fit(VAE((8, 8), latent_dim=8, hidden=[256]), "digits", epochs=epochs).model
x = ImageBatches(load_dataset("digits")).test_images[:64]  # one batch, binarized once

with torch.no_grad():
    # Trace_ELBO: E_q[log p(x, z) - log q(z|x)], averaged over 2000 draws of z per image
    draws = 2000
    estimator = Trace_ELBO(num_particles=draws, vectorize_particles=True, max_plate_nesting=1)
    elbo = -estimator.loss(vae.model, vae.guide, x) / len(x)

    # The same as E_q[log p(x|z)] - KL(q(z|x) || p(z)): encode, reparameterize, decode.
    q = vae.encode(x)  # Normal(mu, sigma) per latent dimension (the amortized guide)
    eps = torch.randn(draws, *q.batch_shape, vae.latent_dim)
    z = q.base_dist.loc + q.base_dist.scale * eps  # z = mu + sigma * eps
    log_px_given_z = vae.likelihood(vae.decoder(z)).log_prob(x)  # (draws, images)
    reconstruction = log_px_given_z.mean(0)
    kl = kl_divergence(q, vae.prior())  # closed form for two diagonal Normals, per image
    by_hand = (reconstruction - kl).mean().item()
    # Monte Carlo standard errors of the two averages over draws and images
    log_w = log_px_given_z + vae.prior().log_prob(z) - q.log_prob(z)  # what Trace_ELBO averages
    error = math.hypot(
        math.sqrt(log_w.var(0).mean().item() / draws / len(x)),
        math.sqrt(log_px_given_z.var(0).mean().item() / draws / len(x)),
    )

    print(f"Trace_ELBO (2000 draws)         {elbo:9.3f} nats/image")
    print(
        f"reconstruction - KL, by hand    {by_hand:9.3f}  (reconstruction "
        f"{reconstruction.mean():.3f}, KL {kl.mean():.3f})"
    )
    print(f"difference                      {elbo - by_hand:9.3f}  (Monte Carlo s.e. {error:.3f})")
    assert abs(elbo - by_hand) < 4 * error, (elbo, by_hand, error)

    # log p(x) >= ELBO (Jensen); the importance-sampled bound tightens with K in
    # expectation (Burda et al. 2016), here on 64 images, so with its own noise
    bounds = {k: log_likelihood(vae, x, k) for k in (1, 10, 1000)}
    for k, value in bounds.items():
        print(f"log p(x), K={k:<5}               {value:9.3f}")
    assert bounds[1000] > elbo, (bounds, elbo)
    print("checked: ELBO = reconstruction - KL, and log p(x) >= ELBO")
