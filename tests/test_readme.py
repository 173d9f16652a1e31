"""The README stays true: every Python snippet runs, and its flag table is the parser's."""

import re
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, PyroVAEError, architectures, estimators, guides, likelihoods, priors
from pyro_vae.cli import build_parser
from pyro_vae.data import datasets

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Snippets run in an empty folder and register components in copies of the registries."""
    monkeypatch.chdir(tmp_path)
    for registry in (priors, likelihoods, guides, estimators, architectures, datasets):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    return tmp_path


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.strip().splitlines()[-1][:40])
def test_every_python_snippet_runs(snippet, isolated):
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)


def test_the_spelled_out_model_and_guide_are_the_librarys(isolated):
    (snippet,) = [s for s in SNIPPETS if "class SpelledOutVAE" in s]
    namespace = {}
    exec(snippet, namespace)
    spelled_out = namespace["vae"]
    library = VAE((28, 28), latent_dim=50, hidden=[400], prior="normal")
    library.load_state_dict(spelled_out.state_dict())
    x = torch.bernoulli(torch.full((16, 784), 0.3), generator=torch.Generator().manual_seed(0))
    losses = []
    for vae in (spelled_out, library):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        losses.append(Trace_ELBO().loss(vae.model, vae.guide, x))
    assert losses[0] == losses[1]


def test_the_plugin_snippet_registers_a_prior_whose_argument_is_checked(isolated):
    (snippet,) = [s for s in SNIPPETS if '@priors.register("laplace"' in s]
    exec(snippet, {})
    assert VAE((8, 8), latent_dim=3, prior="laplace:0.7").prior().stddev.tolist() == pytest.approx(
        [0.7 * 2**0.5] * 3
    )
    with pytest.raises(PyroVAEError, match="B='0' must be a finite number > 0"):
        priors.parse("laplace:0")


def test_the_train_flag_table_lists_every_flag_of_the_parser():
    section = README[README.index("### `pyro-vae train") : README.index("Precedence:")]
    documented = set(re.findall(r"`(--[a-z0-9-]+)", section))
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {o for a in train._actions for o in a.option_strings if o.startswith("--")}
    assert flags - {"--help"} == documented


def test_every_toml_block_is_a_config_that_validates(tmp_path):
    from pyro_vae.config import load, validate

    blocks = re.findall(r"```toml\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        path = tmp_path / f"{i}.toml"
        path.write_text(block)
        validate(load(path))
