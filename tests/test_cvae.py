"""The conditional VAE on Pyro's quadrant task, and its baseline, against their definitions."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.nn.functional import binary_cross_entropy_with_logits

from pyro_vae import CVAE, CVAEBaseline, ImageBatches, PyroVAEError, fit, load_dataset, load_run
from pyro_vae.cli import main
from pyro_vae.config import validate
from pyro_vae.evaluation.evaluate import evaluate_run
from pyro_vae.models.cvae import shown_pixels

from .helpers import small_config


@pytest.fixture(scope="module")
def x():
    return ImageBatches(load_dataset("digits")).test_images[:32]


def test_the_quadrants_shown_are_pyros():
    t, f = True, False
    one = [[f, f, f, f], [f, f, f, f], [t, t, f, f], [t, t, f, f]]
    two = [[t, t, f, f]] * 4
    three = [[t, t, t, t], [t, t, t, t], [t, t, f, f], [t, t, f, f]]
    for quadrants, expected in ((1, one), (2, two), (3, three)):
        assert shown_pixels((4, 4), quadrants).tolist() == torch.tensor(expected).flatten().tolist()
    with pytest.raises(PyroVAEError, match="1, 2 or 3"):
        shown_pixels((4, 4), 4)


def test_the_baselines_elbo_is_the_masked_cross_entropy_of_pyros_example(x):
    pyro.clear_param_store()
    torch.manual_seed(0)
    baseline = CVAEBaseline((8, 8), hidden=(32,))
    loss = Trace_ELBO().loss(baseline.model, baseline.guide, x)
    shown = shown_pixels((8, 8), 1)
    with torch.no_grad():
        logits = baseline.net(x[:, shown])
    cross_entropy = binary_cross_entropy_with_logits(logits, x[:, ~shown], reduction="sum")
    assert loss == pytest.approx(cross_entropy.item(), rel=1e-6)


def test_the_cvaes_elbo_scores_the_missing_pixels_against_a_prior_on_the_shown(x):
    pyro.clear_param_store()
    torch.manual_seed(0)
    cvae = CVAE((8, 8), latent_dim=4, hidden=(32,))
    shown = shown_pixels((8, 8), 1)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO().loss(cvae.model, cvae.guide, x)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        q = cvae.posterior(cvae.encoder(x))  # q(z|x, y): the whole image
        z = q.rsample()
        p = cvae.prior_family(cvae.prior_net(x[:, shown]))  # p(z|x): the shown pixels
        log_y = cvae.likelihood(cvae.decoder(z)).log_prob(x[:, ~shown])
        expected = -(log_y + p.log_prob(z) - q.log_prob(z)).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-5)

    other = x.clone()
    other[:, ~shown] = 1 - other[:, ~shown]  # other missing pixels, the same shown ones
    with torch.no_grad():
        assert torch.equal(cvae.conditional_prior(other).mean, cvae.conditional_prior(x).mean)
        assert not torch.equal(cvae.posterior(cvae.encoder(other)).mean, q.mean)
    trace = poutine.trace(cvae.model).get_trace(x)
    assert torch.equal(trace.nodes["y"]["value"], x[:, ~shown])


def test_a_cvae_on_a_baseline_trains_reloads_and_outlives_the_baseline_run(tmp_path):
    assert main(["train", "--model", "cvae-baseline", "--epochs", "2", "--hidden", "32",
                 "--out", str(tmp_path / "base"), "--quiet"]) == 0  # fmt: skip
    args = ["train", "--model", "cvae", "--baseline-run", str(tmp_path / "base"), "--epochs", "2"]
    args += ["--hidden", "32", "--latent-dim", "4", "--out", str(tmp_path / "cvae"), "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "cvae" / "completions.png").read_bytes()[:4] == b"\x89PNG"
    before = evaluate_run(tmp_path / "cvae", iw_samples=5)
    for f in (tmp_path / "base").iterdir():
        f.unlink()
    (tmp_path / "base").rmdir()
    after = evaluate_run(tmp_path / "cvae", iw_samples=5)
    assert (before["test_elbo"], before["log_px"]) == (after["test_elbo"], after["log_px"])
    assert after["log_px_of"] == "y|x"
    cvae = load_run(tmp_path / "cvae")
    assert cvae.baseline is not None and not any(
        p.requires_grad for p in cvae.baseline.parameters()
    )


def test_the_cvae_trains_from_python():
    pyro.clear_param_store()
    torch.manual_seed(0)
    result = fit(CVAE((8, 8), quadrants=2, latent_dim=4, hidden=(32,)), "digits", epochs=2)
    assert result.metrics[-1]["test_elbo"] > result.metrics[0]["test_elbo"]
    assert result.summary["log_px_of"] == "y|x"


@pytest.mark.parametrize(
    "kind, cvae, model, message",
    [
        ("cvae", {"quadrants": 0}, {}, "1, 2 or 3"),
        ("cvae-baseline", {"baseline_run": "x"}, {}, "--baseline-run is for --model cvae"),
        ("cvae", {}, {"prior": "mog:3"}, "drop --prior"),
        ("cvae", {}, {"arch": "conv"}, "drop --arch"),
    ],
)
def test_bad_cvae_settings_are_refused(kind, cvae, model, message):
    config = small_config(cvae=cvae, model={"kind": kind, **model})
    with pytest.raises(PyroVAEError, match=message):
        validate(config)


def test_a_baseline_of_another_task_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", "--model", "cvae-baseline", "--quadrants", "2", "--epochs", "1",
                 "--hidden", "16", "--out", str(tmp_path / "b"), "--quiet"]) == 0  # fmt: skip
    args = ["train", "--model", "cvae", "--baseline-run", str(tmp_path / "b"), "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "c")]) == 2
    assert "fills in 2 quadrant(s) of digits, not 1" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
