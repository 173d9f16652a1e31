"""The one exception type for problems a person can fix.

Components, the config loader and the data layer raise :class:`PyroVAEError`
with a message that says what was wrong and what to do; the CLI prints it on
one line and exits with code 2.
"""


class PyroVAEError(ValueError):
    """A bad spec, config value, data folder or run directory, explained for people."""
