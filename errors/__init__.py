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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how a library's error is
    quoted inside one of ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """Every line of an exception's message joined with " | " (its type's name when it has none): how the CLIs
    print a FedbiotError, as one line even when a library's text runs over several."""
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__
