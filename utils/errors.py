"""User-facing errors.

Anything a user can cause (a missing file, a misspelt config key, a checkpoint that does not fit) raises a
:class:`UserError` with a one-line message that names the problem. Entry scripts catch it and print the line instead
of a traceback; internal invariants stay ``assert``.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


class ConfigError(UserError, ValueError):
    """A config file or key is wrong."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class WeightsMissingError(UserError, FileNotFoundError):
    """A weights file or folder is missing; the message names the download command."""


class DataError(UserError):
    """A dataset or prompt file is missing, empty or malformed."""
