"""Compare ELBO estimators on the same model, data, seed and budget.

python examples/compare_elbos.py
"""

import pyro_vae
from pyro_vae import compare

config = pyro_vae.Config()  # bundled digits, default model
config.model.latent_dim, config.model.hidden = 8, [128]
config.train.epochs = 20

rows = compare(
    config,
    ["trace", "meanfield", "iwae:5", "dreg:5", "scorefn"],
    "runs/compare_elbos",
    overwrite=True,
)
for r in rows:
    print(
        f"{r['estimator']:10s} test ELBO {r['test_elbo']:7.2f}  log p(x) {r['log_px']:7.2f}  "
        f"encoder SNR {r['snr_encoder']:.3f}  {r['images_per_second']:7.0f} images/s"
    )
print("tables and plot: runs/compare_elbos/compare.md, compare.csv, compare.png")
