"""How the `owner --listen` node listens: `ServeOptions`, apart from the server (`owner.server`, which imports
torch and ZeroMQ) so that the owner's command-line options take their defaults from it without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeOptions:
    """How the owner listens (the `--listen` group of `owner`)."""

    listen: str
    out: Path
    key: Path
    allow: Path
    resume: bool = False
    min_parties: int | None = None  # default: every party
    join_timeout: float = 600.0
    round_timeout: float = 1800.0
    party_timeout: float = 60.0
