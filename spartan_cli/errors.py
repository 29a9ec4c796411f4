"""Errors a user can fix. The CLI turns each into one line on stderr and exit code 1."""


class SpartanError(Exception):
    """Base class: the message names the bad value, what was expected, and the fix."""


class ConfigError(SpartanError):
    """A setting has a bad value or an unknown key."""


class ModelError(SpartanError):
    """A model cannot be found, loaded or gated."""


class DataError(SpartanError):
    """A dataset cannot be found, read or packed."""


class CheckpointError(SpartanError):
    """A checkpoint directory is missing files, truncated or from another schema."""


class TaskError(SpartanError):
    """A task is unknown or cannot be expressed with the model's tokenizer."""
