"""User components registered in a plugin module are selectable from the CLI and TOML."""

from pathlib import Path

import pytest

from pyro_vae import PyroVAEError, load_run
from pyro_vae.cli import main
from pyro_vae.config import Config, dumps, load, validate

from .helpers import run_cli

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


def test_a_plugin_that_raises_on_import_is_one_line_naming_it(tmp_path, capsys):
    plugin = tmp_path / "boom.py"
    plugin.write_text("x = 1 / 0\n")
    args = ["train", "--plugin", str(plugin), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"plugin '{plugin}' failed while importing: ZeroDivisionError: division by zero" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_spec_argument_the_component_cannot_use_is_refused_before_training(tmp_path, capsys):
    """Degrees of freedom 0 used to surface as 'the loss became NaN ... try a lower --lr'."""
    args = ["train", "--plugin", str(EXAMPLES / "custom_likelihood.py"), "--likelihood"]
    args += ["student:0", "--binarize", "none", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "likelihood 'student:0': DF='0' must be a finite number > 0" in err
    assert not (tmp_path / "run").exists()


def test_a_run_finds_a_moved_plugin_with_plugin(tmp_path):
    first, moved = tmp_path / "a" / "mine.py", tmp_path / "b" / "mine.py"
    first.parent.mkdir(), moved.parent.mkdir()
    first.write_text((EXAMPLES / "swap_prior.py").read_text())
    run = tmp_path / "run"
    args = ["train", "--plugin", str(first), "--prior", "laplace", "--epochs", "1"]
    assert main([*args, "--hidden", "16", "--quiet", "--out", str(run)]) == 0
    first.rename(moved)
    lost = run_cli("evaluate", str(run))  # a new process: nothing registered yet
    assert lost.returncode == 2
    assert "if the plugin has moved, give its new place with --plugin FILE" in lost.stderr
    found = run_cli("evaluate", str(run), "--plugin", str(moved))
    assert found.returncode == 0, found.stderr
    assert load_run(run, plugins=[str(moved)]).prior.__class__.__name__ == "LaplacePrior"


def test_a_dataset_plugin_trains_and_evaluates_from_the_cli(tmp_path):
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    (snippet,) = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "noise" in s]
    plugin = tmp_path / "my_data.py"
    plugin.write_text(snippet.replace('"noise"', '"noise-cli"'))
    run = tmp_path / "run"
    args = ["train", "--data-plugin", str(plugin), "--dataset", "noise-cli", "--epochs", "1"]
    assert main([*args, "--binarize", "none", "--hidden", "8", "--quiet", "--out", str(run)]) == 0
    config = load(run / "config.toml")
    assert config.data.plugins == [str(plugin)] and config.model.plugins == []
    found = run_cli("evaluate", str(run))  # a new process imports the data plugin again
    assert found.returncode == 0, found.stderr


TINY_KIND = '''
from pyro_vae import PyroVAEError, models
from tests.helpers import tiny_vae


def refuse_wide(config):
    if config.model.latent_dim > 8:
        raise PyroVAEError("model 'tiny' takes at most 8 latent dimensions")


@models.register("tiny", validate=refuse_wide)
def tiny(config, image_shape, num_classes, checkpoint, prepared):
    """A one-layer VAE from scratch (tests/helpers.py)."""
    return tiny_vae(image_shape, config.model.latent_dim, hidden=16)
'''


def test_a_model_kind_from_a_plugin_trains_evaluates_and_validates(tmp_path, capsys):
    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_KIND)
    run = tmp_path / "run"
    args = ["train", "--plugin", str(plugin), "--model", "tiny", "--epochs", "2", "--quiet"]
    assert main([*args, "--latent-dim", "4", "--out", str(run)]) == 0
    assert type(load_run(run)).__name__ == "TinyVAE"
    assert main(["evaluate", str(run)]) == 0
    assert main([*args, "--latent-dim", "9", "--out", str(tmp_path / "wide")]) == 2
    assert "model 'tiny' takes at most 8 latent dimensions" in capsys.readouterr().err


def test_estimator_capabilities_are_attributes_of_their_registry_entries():
    from pyro_vae import estimators

    assert not estimators["tail"].has_bound and estimators["trace"].has_bound
    assert estimators["dreg"].works_under_ddp and not estimators["iwae"].works_under_ddp
    assert estimators["trace"].enumerated and estimators["meanfield"].enumerated is None
    assert estimators["dreg"].bound_as == "iwae:{K}"
    with pytest.raises(ValueError, match="attributes \\['fast'\\] unknown"):
        estimators.register("mine", fast=True)
