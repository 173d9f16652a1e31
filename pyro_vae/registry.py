"""Name -> component registries and the one parser for ``name[:arg[:arg]]`` specs.

Every swappable part (prior, likelihood, guide, network, dataset, estimator)
lives in a :class:`Registry`. The same spec string selects it from TOML, the
command line and Python; the library's own components are registered with the
same decorator a user would use, so a new one is selectable everywhere at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PyroVAEError

_REQUIRED = object()


def positive_int(text: str) -> int:
    """Parse a whole number >= 1 (raises ValueError with the rule it broke)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("must be a whole number >= 1")
    return value


def _float_in(text: str, ok: Callable[[float], bool], rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"must be {rule}")
    return value


def nonnegative_float(text: str) -> float:
    """Parse a finite number >= 0 (raises ValueError with the rule it broke)."""
    return _float_in(text, lambda v: v >= 0, "a finite number >= 0")


def positive_float(text: str) -> float:
    """Parse a finite number > 0 (a scale, a rate, degrees of freedom)."""
    return _float_in(text, lambda v: v > 0, "a finite number > 0")


def unit_interval_float(text: str) -> float:
    """Parse a number in [0, 1] (a probability, a mixing weight)."""
    return _float_in(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def open_unit_interval_float(text: str) -> float:
    """Parse a number strictly between 0 and 1 (a quantile, a momentum)."""
    return _float_in(text, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def check_positive(**values: Any) -> None:
    """Refuse, naming it, any of ``values`` that is not a whole number >= 1.

    For component constructors, which Python code may call without a spec string.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PyroVAEError(f"{name} must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class Arg:
    """One positional spec argument: its name (shown in usage), parser, default and an
    example value (used to build every registered component in tests)."""

    name: str
    parse: Callable[[str], Any] = positive_int
    default: Any = _REQUIRED
    example: str = "2"

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class Entry:
    """One registered component: its factory, spec arguments, and capabilities.

    The capabilities are the registry's declared attributes (``has_bound`` of an
    estimator, ``needs_enumeration`` of a model kind, ...), read as ``entry.has_bound``.
    """

    name: str
    factory: Callable[..., Any]
    args: tuple[Arg, ...]
    summary: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        attributes = self.__dict__.get("attributes", {})
        if name in attributes:
            return attributes[name]
        raise AttributeError(f"{type(self).__name__} {self.name!r} has no attribute {name!r}")

    @property
    def usage(self) -> str:
        parts = [self.name] + [a.name if a.required else f"[{a.name}]" for a in self.args]
        return ":".join(parts)

    @property
    def example(self) -> str:
        """A valid spec for this entry, e.g. ``mog:2``."""
        return ":".join([self.name] + [a.example for a in self.args])


class Registry:
    """Components of one kind (``"prior"``, ``"likelihood"``, ...) selected by spec strings.

    ``build(spec, **context)`` parses ``spec``, converts its arguments and calls the
    registered factory with the spec's arguments and the context keywords it asks
    for (e.g. ``latent_dim``). Anything that is not a string is taken to be a ready-made
    component and returned unchanged.
    """

    def __init__(self, kind: str, **attributes: Any):
        self.kind = kind
        self.attributes = attributes  # the capabilities an entry declares, with defaults
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *args: Arg, **attributes: Any) -> Callable:
        """Decorator: make ``factory`` selectable as ``name[:arg...]``, with its capabilities
        (keywords among the registry's declared attributes)."""
        if not name or ":" in name or name != name.strip():
            raise ValueError(f"bad {self.kind} name {name!r}")
        unknown = set(attributes) - set(self.attributes)
        if unknown:
            known = ", ".join(self.attributes) or "none"
            raise ValueError(f"{self.kind} attributes {sorted(unknown)} unknown; known: {known}")

        def decorate(factory: Callable) -> Callable:
            doc = (factory.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(
                name, factory, tuple(args), doc[0] if doc else "", {**self.attributes, **attributes}
            )
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def choices(self) -> str:
        """The valid specs, for error messages and ``--help``."""
        return ", ".join(e.usage for e in self.entries())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry:
        """The entry registered as ``name`` (KeyError if none)."""
        return self._entries[name]

    def parse(self, spec: str) -> tuple[Entry, dict[str, Any]]:
        """Split and convert ``spec``; raise :class:`PyroVAEError` naming the valid choices."""
        if not isinstance(spec, str):
            raise PyroVAEError(f"{self.kind} spec must be a string, got {spec!r}")
        name, *texts = spec.strip().split(":")
        entry = self._entries.get(name)
        if entry is None:
            raise PyroVAEError(
                f"unknown {self.kind} {spec!r}; choose from: {self.choices()} "
                f"(components from a plugin need --plugin FILE)"
            )
        if len(texts) > len(entry.args):
            raise PyroVAEError(f"{self.kind} {spec!r} has too many arguments; usage: {entry.usage}")
        values: dict[str, Any] = {}
        for i, arg in enumerate(entry.args):
            if i >= len(texts):
                if arg.required:
                    raise PyroVAEError(
                        f"{self.kind} {spec!r} needs {arg.name}; usage: {entry.usage}"
                    )
                values[arg.name] = arg.default
                continue
            try:
                values[arg.name] = arg.parse(texts[i])
            except ValueError as e:
                raise PyroVAEError(
                    f"{self.kind} {spec!r}: {arg.name}={texts[i]!r} {e}; usage: {entry.usage}"
                ) from None
        return entry, values

    def build(self, spec: Any, **context: Any) -> Any:
        """The component for ``spec`` (a spec string or a ready-made object).

        The factory receives the context keywords it names in its signature (all of
        them if it takes ``**kwargs``), so a simple component declares only what it uses.
        """
        if not isinstance(spec, str):
            return spec
        entry, values = self.parse(spec)
        params = inspect.signature(entry.factory).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            context = {k: v for k, v in context.items() if k in params}
        return entry.factory(**context, **values)


def import_plugins(plugins: list[str]) -> None:
    """Import modules (dotted names or ``.py`` paths) that register components.

    A run's config lists them (``[model] plugins = ["my_prior.py"]``, ``--plugin``),
    so training, evaluation and ``load_run`` see the same registrations.
    """
    for plugin in plugins:
        try:
            if plugin.endswith(".py"):
                path = Path(plugin).resolve()
                name = "pyro_vae_plugin_" + re.sub(r"\W", "_", str(path))
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError("not a Python file")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            else:
                importlib.import_module(plugin)
        except (ImportError, OSError, SyntaxError) as e:
            raise PyroVAEError(f"cannot import plugin {plugin!r}: {e}") from None
        except Exception as e:  # the plugin's own code raised: say which plugin, and what
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PyroVAEError(
                f"plugin {plugin!r} failed while importing: {type(e).__name__}"
                + (f": {first}" if first else "")
            ) from None
