"""User components registered in a plugin module are selectable from the CLI and TOML."""

from pathlib import Path

import pytest

from pyro_vae import PyroVAEError, load_run
from pyro_vae.cli import main
from pyro_vae.config import Config, dumps, load, validate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "plugin, flag, spec, component",
    [
        ("swap_prior.py", "--prior", "laplace", "LaplacePrior"),
        ("custom_likelihood.py", "--likelihood", "student:3", "StudentTLikelihood"),
    ],
)
def test_example_components_train_from_the_cli_and_load_back(
    plugin, flag, spec, component, tmp_path
):
    run = tmp_path / "run"
    args = ["train", "--plugin", str(EXAMPLES / plugin), flag, spec, "--binarize", "none"]
    args += ["--epochs", "1", "--hidden", "32", "--latent-dim", "4", "--quiet", "--out", str(run)]
    assert main(args) == 0
    vae = load_run(run)
    assert component in {type(vae.prior).__name__, type(vae.likelihood).__name__}


def test_relative_plugin_paths_in_toml_resolve_against_the_file(tmp_path):
    (tmp_path / "mine.py").write_text((EXAMPLES / "swap_prior.py").read_text())
    config = Config()
    config.model.plugins = ["mine.py"]
    config.model.prior = "laplace"
    (tmp_path / "c.toml").write_text(dumps(config))
    loaded = validate(load(tmp_path / "c.toml"))
    assert loaded.model.plugins == [str(tmp_path / "mine.py")]


@pytest.mark.parametrize("plugin", ["no_such_module_here", "/no/such/file.py"])
def test_a_plugin_that_cannot_be_imported_is_our_error(plugin):
    config = Config()
    config.model.plugins = [plugin]
    with pytest.raises(PyroVAEError, match=f"cannot import plugin '{plugin}'"):
        validate(config)
