"""The one error type users see: every bad input the project detects raises a subclass of it."""


class FedbiotError(Exception):
    """A user-facing error: the CLIs print its message as one line and exit with status 2."""


class DataError(FedbiotError):
    """A data file is missing, unreadable or lacks required fields."""


class ModelError(FedbiotError):
    """A model cannot be loaded or does not fit the method (no decoder layer list, bad s or beta)."""


class ConfigError(FedbiotError):
    """An option value is out of range or options contradict each other."""


class RunUntrained(FedbiotError):
    """Every round ran, but the adapter is the one the run started with: outputs exist, success does not."""
