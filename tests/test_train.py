"""SVI training on digits and the run directory it writes."""

import json

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae import ImageBatches, PyroVAEError, load_config, load_dataset, load_run, train
from pyro_vae.evaluation.evaluate import elbo
from pyro_vae.models.kinds import build_vae
from pyro_vae.training.runs import load_checkpoint, read_metrics, save_checkpoint

from .helpers import small_config

RUN_FILES = {
    "config.toml",
    "metrics.jsonl",
    "checkpoint.pt",
    "summary.json",
    "reconstructions.png",
    "samples.png",
    "elbo.png",
}


def test_run_directory_has_every_artifact(trained_run):
    assert RUN_FILES <= {p.name for p in trained_run.iterdir()}
    metrics = read_metrics(trained_run)
    assert [m["epoch"] for m in metrics] == list(range(1, 31))
    assert set(metrics[0]) == {
        "epoch",
        "train_elbo",
        "train_recon",
        "train_kl",
        "test_elbo",
        "test_elbo_se",
        "test_recon",
        "test_kl",
        "seconds",
        "images_per_second",
    }
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["iw_samples"] == 20
    assert summary["log_px"] >= summary["test_elbo"] - 0.5
    for png in ("reconstructions.png", "samples.png", "elbo.png"):
        assert (trained_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_on_digits_improves_the_test_elbo_clearly(trained_run):
    config = load_config(trained_run / "config.toml")
    pyro.set_rng_seed(config.train.seed)
    untrained = build_vae(config, (8, 8))
    test_images = ImageBatches(load_dataset("digits")).test_images
    before = elbo(untrained, test_images)
    after = read_metrics(trained_run)[-1]["test_elbo"]
    assert after > before + 10, (before, after)


def test_checkpoint_loads_with_weights_only_and_holds_the_final_epoch(trained_run):
    checkpoint = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 30
    assert set(checkpoint) >= {"config", "model", "optimizer", "rng", "image_shape"}
    assert checkpoint["optimizer"], "Adam state of every parameter is saved"


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    config = small_config()
    pyro.set_rng_seed(0)
    vae = build_vae(config, (8, 8))
    optimizer = Adam({"lr": 1e-2})
    svi = SVI(vae.model, vae.guide, optimizer, loss=Trace_ELBO())
    x = ImageBatches(load_dataset("digits")).test_images[:64]
    for _ in range(5):
        svi.step(x)
    save_checkpoint(
        tmp_path,
        {
            "config": {"model": vars(config.model)},
            "image_shape": [8, 8],
            "model": vae.state_dict(),
            "optimizer": optimizer.get_state(),
        },
    )
    loaded = load_run(tmp_path)
    vae.eval()
    assert torch.equal(loaded.encoder(x), vae.encoder(x))
    z = torch.randn(10, config.model.latent_dim)
    assert torch.equal(loaded.decoder(z), vae.decoder(z))
    assert torch.equal(loaded.reconstruct(x), vae.reconstruct(x))


def test_config_file_of_a_run_reproduces_it_exactly(trained_run, tmp_path):
    config = load_config(trained_run / "config.toml")
    config.train.epochs = 3
    first = train(config, tmp_path / "a", progress=False)
    second = train(config, tmp_path / "b", progress=False)
    assert first["test_elbo"] == second["test_elbo"]
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_folder_is_refused_without_overwrite(trained_run):
    before = (trained_run / "checkpoint.pt").read_bytes()
    with pytest.raises(PyroVAEError, match="already exists; pass --overwrite"):
        train(small_config(), trained_run, progress=False)
    assert (trained_run / "checkpoint.pt").read_bytes() == before


def test_data_outside_the_support_is_refused_before_the_run_folder_exists(tmp_path, monkeypatch):
    from pyro_vae.components.likelihoods import BernoulliLikelihood

    def refuse(self, x):
        raise PyroVAEError("data outside the support")

    monkeypatch.setattr(BernoulliLikelihood, "check_support", refuse)
    with pytest.raises(PyroVAEError, match="outside the support"):
        train(small_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_bernoulli_refuses_values_outside_the_unit_interval():
    from pyro_vae.components.likelihoods import BernoulliLikelihood

    likelihood = BernoulliLikelihood(4)
    likelihood.check_support(torch.tensor([[0.0, 0.5, 1.0, 1.0]]))
    spans = r"needs pixel values in \[0, 1\]; the data spans \[0, 16\]"
    with pytest.raises(PyroVAEError, match=spans):
        likelihood.check_support(torch.tensor([[0.0, 3.0, 16.0, 1.0]]))
