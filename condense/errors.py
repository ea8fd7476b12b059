"""Errors users see: each says what is wrong and where (file, row, config key)."""


class CondenseError(Exception):
    """Base of condense's user-facing errors; the CLI prints them without a traceback."""


class ConfigError(CondenseError):
    """A config file or --set override is invalid."""


class InputError(CondenseError):
    """The input data cannot be read as promised (missing files, mismatched rows, bad dims)."""


class StageError(CondenseError):
    """A stage cannot run on what it was given (for example k larger than the rows)."""
