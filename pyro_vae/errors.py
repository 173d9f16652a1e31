"""The one exception type for problems a person can fix.

Components, the config loader and the data layer raise :class:`PyroVAEError`
with a message that says what was wrong and what to do; the CLI prints it on
one line and exits with code 2 (3 for :class:`TrainingDiverged`).
"""


class PyroVAEError(ValueError):
    """A bad spec, config value, data folder or run directory, explained for people."""


class TrainingDiverged(PyroVAEError):
    """A loss or parameter became NaN or infinite; the last good checkpoint is kept."""
