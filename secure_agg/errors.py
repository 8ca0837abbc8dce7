"""The error every secure-aggregation failure raises: one clear reason, and nothing half-revealed."""

from __future__ import annotations

from errors import FedbiotError


class SecAggError(FedbiotError):
    """A secure-aggregation round cannot go on: bad message, inconsistent lists, too few parties, overflow.

    Raised before anything is unmasked, so catching it never leaves a partial aggregate behind.
    """
