"""pyro_vae.fit: the one loop, from Python, on a user's own program and data."""

import pyro
import pytest
import torch

from pyro_vae import SSVAE, VAE, PyroVAEError, fit, load_dataset
from pyro_vae.training.runs import load_checkpoint, read_metrics

from .helpers import tiny_vae


@pytest.fixture(scope="module")
def digits():
    """The bundled digits as [0, 1] floats, with labels: data as a user would have it."""
    d = load_dataset("digits")
    return (d.train_images.float() / 16, d.train_labels), (
        d.test_images.float() / 16,
        d.test_labels,
    )


def test_fit_trains_a_users_program_on_tensors_in_memory(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (x, _), (x_test, _) = digits
    pyro.set_rng_seed(0)
    result = fit(tiny_vae(), x, test=x_test, epochs=4, batch_size=64, lr=3e-3, iw_samples=20)
    assert list(tmp_path.iterdir()) == [], "in memory: no run folder, no files"
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]
    first, last = result.metrics[0]["test_elbo"], result.metrics[-1]["test_elbo"]
    assert last > first + 2, (first, last)
    assert result.summary["log_px"] > result.summary["test_elbo"] - 0.5  # IS above the ELBO
    assert result.summary["dataset"] == "in-memory"
    assert not result.model.training


def test_fit_takes_a_torch_dataset_with_labels(digits):
    (x, y), (x_test, y_test) = digits
    train = torch.utils.data.TensorDataset(x.reshape(-1, 8, 8), y)
    test = torch.utils.data.TensorDataset(x_test.reshape(-1, 8, 8), y_test)
    pyro.set_rng_seed(0)
    m2 = SSVAE((8, 8), latent_dim=4, hidden=(32,), labeled=50, aux_weight=5.0)
    result = fit(m2, train, test=test, epochs=2, batch_size=100, binarize="none")
    assert result.summary["labeled"] == 50 and result.summary["validation"] == 300
    correct = (result.model.predict(x_test) == y_test).float().mean().item()
    assert result.summary["test_accuracy"] == pytest.approx(correct)


def test_fit_resumes_its_run_folder_exactly(tmp_path):
    def vae():
        pyro.set_rng_seed(0)
        return VAE((8, 8), latent_dim=4, hidden=(32,))

    straight = fit(vae(), "digits", epochs=3, run_dir=tmp_path / "a", iw_samples=10)
    fit(vae(), "digits", epochs=2, run_dir=tmp_path / "b", iw_samples=10)
    resumed = fit(vae(), "digits", epochs=3, run_dir=tmp_path / "b", resume=True, iw_samples=10)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["epoch"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3]
    assert resumed.summary["test_elbo"] == straight.summary["test_elbo"]
    with pytest.raises(PyroVAEError, match="is from another config"):
        fit(vae(), "digits", epochs=4, lr=0.1, run_dir=tmp_path / "b", resume=True)


@pytest.mark.parametrize(
    "data, settings, message",
    [
        (torch.rand(10, 64), {"epoch": 3}, "fit() has no setting 'epoch'"),
        (torch.rand(10, 65), {}, "the training images have shape (10, 65); expected (N, 64)"),
        (3 * torch.rand(10, 64), {}, "binarization draws Bernoulli(intensity)"),
        ("cifar", {}, "unknown dataset 'cifar'"),
        (torch.rand(10, 64), {"lr": -1.0}, "train.lr must be a finite number > 0"),
    ],
)
def test_fit_refuses_bad_data_and_settings_with_our_error(data, settings, message):
    with pytest.raises(PyroVAEError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit(tiny_vae(), data, **settings)


def test_a_dataset_class_from_the_user_is_registered_for_the_cli(tmp_path, monkeypatch):
    """The README's "Your own data": a registered dataset, selectable by name."""
    from pyro_vae import datasets
    from pyro_vae.data import as_dataset

    monkeypatch.setattr(datasets, "_entries", dict(datasets._entries))

    @datasets.register("noise")
    def noise(data_dir=None):
        """Uniform noise images, 8x8."""
        g = torch.Generator().manual_seed(0)
        return as_dataset(torch.rand(200, 8, 8, generator=g), torch.rand(50, 8, 8, generator=g))

    result = fit(VAE((8, 8), latent_dim=2, hidden=(8,)), "noise", epochs=1, iw_samples=5)
    assert result.summary["dataset"] == "noise"


@pytest.mark.parametrize("mode, flushed", [("flush", True), ("keep", False)])
def test_fit_flushes_denormals_on_the_cpu_while_it_trains_and_restores_the_mode(
    mode, flushed, digits
):
    """Subnormal floats run many times slower on x86 CPUs, and long runs make them
    (docs/PERFORMANCE.md): by default ``fit`` flushes them to zero, in the model and guide
    as in the step, and leaves the mode as it found it."""
    from pyro_vae.training.devices import flushing_denormals

    seen = []
    program = tiny_vae()
    model = program.model

    def watched(x, size=None):
        seen.append(flushing_denormals())
        return model(x, size)

    program.model = watched
    (x, _), _ = digits
    assert not flushing_denormals()
    fit(program, x, epochs=1, batch_size=256, denormals=mode)
    assert seen and set(seen) == {flushed}
    assert not flushing_denormals()
