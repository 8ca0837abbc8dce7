"""Errors of the wire layer: every rejected input raises ProtocolError with one readable reason."""

from __future__ import annotations

from errors import FedbiotError


class ProtocolError(FedbiotError):
    """A message, chunk or archive was rejected; the receiver logs `reason` and keeps serving.

    `msg_type` and `seq` are filled in when the decoder got far enough to read them, so the
    owner can name the offending message in its REJECT reply.
    """

    def __init__(self, reason: str, *, msg_type: str | None = None, seq: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.msg_type = msg_type
        self.seq = seq


class TransportError(FedbiotError):
    """A socket operation failed: the peer is not connected, or a send timed out."""
