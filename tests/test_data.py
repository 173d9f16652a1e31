"""Datasets in memory, binarization, and the data-folder rules."""

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from pyro_vae import ImageBatches, PyroVAEError, load_dataset
from pyro_vae.data import _bernoulli_levels

from .helpers import mnist_dir, needs_mnist


def test_digits_has_a_fixed_split_of_8x8_images_with_17_levels():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.image_shape == (8, 8) and a.levels == 16
    assert a.train_images.shape == (1500, 64) and a.test_images.shape == (297, 64)
    assert a.train_images.dtype == torch.uint8 and int(a.train_images.max()) == 16
    assert torch.equal(a.test_images, b.test_images)
    assert sorted(a.test_labels.unique().tolist()) == list(range(10))


def test_dynamic_binarization_resamples_train_batches_but_fixes_the_test_set():
    dataset = load_dataset("digits")
    one, two = ImageBatches(dataset, "dynamic"), ImageBatches(dataset, "dynamic")
    assert torch.equal(one.test_images, two.test_images)
    assert set(one.test_images.unique().tolist()) == {0.0, 1.0}
    index = torch.arange(200)
    first, second = one.batch(index), one.batch(index)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)
    intensity = dataset.train_images[:200].float() / 16
    assert (first - intensity).mean().abs() < 0.02  # Bernoulli(intensity) is unbiased


@pytest.mark.parametrize("num_levels", [16, 255])
def test_dynamic_binarization_is_bernoulli_of_the_level_and_follows_the_seed(num_levels):
    n = 400_000
    for v in [0, 1, num_levels // 2, num_levels - 1, num_levels]:
        levels = torch.full((n // 1000, 1000), v, dtype=torch.uint8)
        x = _bernoulli_levels(levels, num_levels, np.random.RandomState(3))
        assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
        p = v / num_levels
        assert abs(x.mean().item() - p) <= 5 * (p * (1 - p) / n) ** 0.5  # exact: 0 and 1 too
        assert torch.equal(x, _bernoulli_levels(levels, num_levels, np.random.RandomState(3)))


def test_binarization_noise_is_the_pipelines_own_seeded_and_restorable():
    """Other users of NumPy's global generator (a notebook, a plugin) leave its stream alone."""
    dataset = load_dataset("digits")
    index = torch.arange(100)
    one, two = ImageBatches(dataset, seed=5), ImageBatches(dataset, seed=5)
    first = one.batch(index)
    np.random.seed(0)
    np.random.random(1000)
    assert torch.equal(first, two.batch(index))
    state = one.rng_state()
    after = one.batch(index)
    assert not torch.equal(after, first)
    one.set_rng_state(state)
    assert torch.equal(one.batch(index), after)
    assert not torch.equal(ImageBatches(dataset, seed=6).batch(index), first)


def test_static_binarization_draws_the_training_set_once():
    batches = ImageBatches(load_dataset("digits"), "static")
    index = torch.arange(100)
    assert torch.equal(batches.batch(index), batches.batch(index))
    assert set(batches.batch(index).unique().tolist()) == {0.0, 1.0}


def test_no_binarization_keeps_intensities_in_the_unit_interval():
    batches = ImageBatches(load_dataset("digits"), "none")
    x = batches.batch(torch.arange(100))
    assert x.min() == 0 and x.max() == 1
    assert len(x.unique()) == 17


def test_an_epoch_of_batches_covers_every_training_image_once():
    batches = ImageBatches(load_dataset("digits"), "none")
    sizes = [len(b) for b in batches.train_batches(128)]
    assert sizes == [128] * 11 + [1500 - 11 * 128]
    seen = torch.cat(list(batches.train_batches(128)))
    everything = batches.batch(torch.arange(1500))
    key = torch.arange(64, dtype=torch.float32)
    assert torch.equal((seen @ key).sort().values, (everything @ key).sort().values)


@needs_mnist
def test_mnist_loads_from_the_shared_folder_with_60000_and_10000_images():
    dataset = load_dataset("mnist", str(mnist_dir()))
    assert dataset.train_images.shape == (60_000, 784)
    assert dataset.test_images.shape == (10_000, 784)
    assert dataset.train_images.dtype == torch.uint8 and dataset.levels == 255
    counts = torch.bincount(dataset.train_labels).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_a_missing_data_folder_is_an_error_naming_the_offline_dataset(tmp_path):
    with pytest.raises(PyroVAEError, match="does not exist.*--dataset digits"):
        load_dataset("mnist", str(tmp_path / "nowhere"))


def test_a_failed_download_names_data_dir_and_digits(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(PyroVAEError) as error:
        load_dataset("mnist", str(tmp_path))
    message = str(error.value)
    assert "could not be downloaded" in message
    assert "--data-dir" in message and "--dataset digits" in message
    assert "\n" not in message


def test_an_offline_download_says_why_and_leaves_no_folders_behind(tmp_path, monkeypatch):
    """torchvision's real download, from a mirror that refuses the connection."""
    monkeypatch.delenv("PYRO_VAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(PyroVAEError) as error:
        load_dataset("mnist")
    message = str(error.value)
    assert "could not be downloaded (<urlopen error [Errno 111] Connection refused>)" in message
    assert "MNIST/raw/*-ubyte" in message and "\n" not in message
    assert not (tmp_path / "cache").exists(), "the failed download left folders behind"


def test_data_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    from pyro_vae.data import default_data_dir

    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("PYRO_VAE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "pyro-vae"


def test_a_damaged_data_folder_is_refused_with_our_message(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # fmt: skip
        (raw / name).write_bytes(b"\x00\x00\x08\x03 not an image file")
    with pytest.raises(PyroVAEError, match=f"cannot read mnist from {tmp_path}"):
        load_dataset("mnist", str(tmp_path))


def test_the_digits_file_read_directly_is_what_load_digits_gives():
    from sklearn.datasets import load_digits

    from pyro_vae.data import _digits_arrays

    pixels, labels = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)
