"""The names of a secure round's stages, in order: the one vocabulary of the party's and the owner's state
machines, the round table (`secure_agg.round`), the transports' progress lines and the tests' fault hooks."""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    ADVERTISE = "advertise"  # each party's public keys and commitments (after its training, when networked)
    SHARE_KEYS = "share_keys"  # Shamir shares of its secrets, encrypted for each peer
    MASKED_INPUT = "masked_input"  # its masked update, acknowledged by the owner
    CONSISTENCY = "consistency"  # its signature over the alive list
    UNMASK = "unmask"  # the shares that unmask the sum, and nothing else


STAGES = tuple(Stage)


def previous(stage: Stage) -> Stage | None:
    """The stage a party must have completed to take `stage`'s step (None for the first)."""
    at = STAGES.index(stage)
    return STAGES[at - 1] if at else None
