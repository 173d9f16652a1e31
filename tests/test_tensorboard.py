"""--tensorboard: each epoch's numbers and pictures, read back from the event file."""

import importlib.util

import pyro
import pytest
import torch

from pyro_vae import VAE, PyroVAEError, fit
from pyro_vae.cli import main


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return events


def _fit(**settings):
    pyro.clear_param_store()
    torch.manual_seed(0)
    return fit(VAE((8, 8), latent_dim=4, hidden=(16,)), "digits", epochs=3, **settings)


def test_each_epochs_numbers_and_pictures_are_in_the_event_file(tmp_path):
    result = _fit(tensorboard=str(tmp_path / "tb"), kl_warmup=2, iw_samples=5)
    events = _events(tmp_path / "tb")
    for key, tag in [
        ("test_elbo", "test/elbo"),
        ("train_kl", "train/kl"),
        ("kl_weight", "kl_weight"),
    ]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(m["epoch"], m[key]) for m in result.metrics]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    (final,) = events.Scalars("final/log_px")
    assert (final.step, final.value) == (3, pytest.approx(result.summary["log_px"], rel=1e-6))
    images = events.Images("reconstructions")
    assert [i.step for i in images] == [1, 2, 3] and images[0].encoded_image_string[
        :4
    ] == b"\x89PNG"
    assert [i.step for i in events.Images("samples")] == [1, 2, 3]


def test_logging_pictures_does_not_move_the_training_stream(tmp_path):
    logged = _fit(tensorboard=str(tmp_path / "tb"))
    plain = _fit()
    for a, b in zip(logged.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_without_tensorboard_installed_the_run_is_refused_in_one_line(
    tmp_path, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(PyroVAEError, match=r"pip install 'pyro-vae\[tensorboard\]'"):
        _fit(tensorboard=str(tmp_path / "tb"))
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--tensorboard", str(tmp_path / "tb"), "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "tb").exists()
