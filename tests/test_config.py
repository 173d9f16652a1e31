"""Config: TOML round trip, overrides, validation; spec strings through the registries."""

import dataclasses
import sys
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_vae import PyroVAEError, priors
from pyro_vae.config import Config, apply_overrides, dumps, from_dict, load, validate
from pyro_vae.inference.elbos import estimators

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_toml_round_trip_keeps_every_field(tmp_path):
    config = Config()
    config.data.data_dir = 'C:\\data "quoted"'
    config.model.hidden = [400, 200]
    config.train.lr = 3e-4
    path = tmp_path / "c.toml"
    path.write_text(dumps(config))
    assert load(path) == config


def _field_values(kind):
    """Any value of a config field's type, strings with newlines, quotes and unicode included."""
    optional = type(None) in typing.get_args(kind)
    if optional:
        (kind,) = (a for a in typing.get_args(kind) if a is not type(None))
    values = {
        str: st.text(),
        int: st.integers(min_value=-(2**63), max_value=2**63 - 1),
        float: st.floats(allow_nan=False),
        bool: st.booleans(),
        list[int]: st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        list[str]: st.lists(st.text()),
    }[kind]
    return st.one_of(st.none(), values) if optional else values


def _configs():
    sections = {}
    for name, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls)
        fields = {f.name: _field_values(hints[f.name]) for f in dataclasses.fields(cls)}
        sections[name] = st.builds(cls, **fields)
    return st.builds(Config, **sections)


@settings(max_examples=200, deadline=None)
@given(_configs())
def test_every_field_type_round_trips_through_toml(config):
    assert from_dict(tomllib.loads(dumps(config))) == config


def test_a_vae_run_config_has_no_semi_section_unless_set():
    assert "[semi]" not in dumps(Config())
    config = Config()
    config.model.kind = "m2"
    assert "[semi]" in dumps(config)


def test_none_fields_are_left_out_of_toml_and_come_back_as_none(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(dumps(Config()))
    assert "data_dir" not in path.read_text()
    assert load(path).data.data_dir is None


def test_set_overrides_parse_values_by_field_type():
    config = apply_overrides(
        Config(),
        ["model.hidden=400,200", "train.lr=0.01", "train.epochs=3", "model.prior=normal-learned"],
    )
    assert config.model.hidden == [400, 200]
    assert config.train.lr == 0.01 and config.train.epochs == 3
    assert config.model.prior == "normal-learned"
    assert Config().model.hidden == [400], "defaults are not mutated"


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("model.foo=1", "unknown config key model.foo; valid keys: kind, arch, hidden"),
        ("nope.epochs=1", "unknown config section 'nope'"),
        ("train.epochs=many", "train.epochs must be of type int"),
        ("train.epochs", "--set needs section.key=value"),
    ],
)
def test_bad_overrides_are_refused_with_the_valid_choices(assignment, message):
    with pytest.raises(PyroVAEError, match=message):
        apply_overrides(Config(), [assignment])


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs must be of type int"),
        ({"train": {"epochs": True}}, "train.epochs must be of type int"),
        ({"model": {"hidden": [400, "x"]}}, "model.hidden must be a list of whole numbers"),
        ({"extra": {}}, r"unknown config section \[extra\]"),
        ({"train": 3}, r"config \[train\] must be a table"),
        ({"train": {"seconds": 10**400}}, r"train.seconds is too large"),
    ],
)
def test_wrong_types_in_toml_are_refused(tree, message):
    with pytest.raises(PyroVAEError, match=message):
        from_dict(tree)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.epochs", "-1", "train.epochs must be >= 1"),
        ("model.latent_dim", "0", "model.latent_dim must be >= 1"),
        ("inference.iw_samples", "0", "inference.iw_samples must be >= 1"),
        ("train.lr", "0", "train.lr must be a finite number > 0"),
        ("train.lr", "nan", "train.lr must be a finite number > 0"),
        ("train.beta1", "1", "train.beta1 must be in"),
        ("train.beta2", "nan", "train.beta2 must be in"),
        ("data.dataset", "cifar", "unknown dataset 'cifar'; choose from: digits"),
        ("data.binarize", "sometimes", "unknown binarization 'sometimes'"),
        ("train.device", "tpu", "unknown device 'tpu'"),
        ("model.prior", "gauss", "unknown prior 'gauss'; choose from: flow:N, "),
        ("inference.elbo", "iwae:0", "iwae:0.*K='0' must be a whole number >= 1"),
        ("inference.elbo", "renyi:1:5", "must not be 1"),
    ],
)
def test_validation_refuses_out_of_range_values_before_any_work(field, value, message):
    config = apply_overrides(Config(), [f"{field}={value}"])
    with pytest.raises(PyroVAEError, match=message):
        validate(config)


def test_bad_toml_syntax_is_our_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\nepochs = 1")
    with pytest.raises(PyroVAEError, match="cannot read config file"):
        load(path)
    with pytest.raises(PyroVAEError, match="does not exist"):
        load(tmp_path / "missing.toml")


def test_spec_parser_converts_arguments_and_explains_usage():
    entry, values = estimators.parse("renyi:0.5:10")
    assert entry.name == "renyi" and values == {"ALPHA": 0.5, "K": 10}
    with pytest.raises(PyroVAEError, match="needs K; usage: iwae:K"):
        estimators.parse("iwae")
    with pytest.raises(PyroVAEError, match="too many arguments; usage: normal"):
        priors.parse("normal:3")


def test_a_user_registered_component_is_selectable_by_name(monkeypatch):
    from pyro_vae import VAE
    from pyro_vae.components.priors import StandardNormalPrior

    monkeypatch.setattr(priors, "_entries", dict(priors._entries))

    @priors.register("wide")
    class WidePrior(StandardNormalPrior):
        """N(0, 9 I)."""

        def __init__(self, latent_dim):
            super().__init__(latent_dim)
            self.scale.mul_(3)

    assert "wide" in priors.choices()
    prior = VAE((8, 8), latent_dim=2, prior="wide").prior()
    assert prior.stddev.tolist() == [3.0, 3.0]
    z = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    expected = torch.distributions.Normal(0.0, 3.0).log_prob(z).sum(-1)  # [-4.85, -5.09]
    torch.testing.assert_close(prior.log_prob(z), expected)
