"""Per-peer replay and round guard.

Every header carries the sender's `seq`, strictly increasing within a session (a session starts with the
party's HELLO; the owner then replaces that party's guard, since a restarted party counts from 1 again).
Round-scoped messages must belong to the round in progress: a stale UPDATE from an earlier round, or one
sent before the round opened, is refused. A refused message leaves the guard untouched.
"""

from __future__ import annotations

from protocol.errors import ProtocolError
from protocol.messages import MAX_SEQ, Message


class SeqCounter:
    """The sender's side: stamps each outgoing message with the next sequence number."""

    def __init__(self, start: int = 1) -> None:
        self._next = start

    def next(self) -> int:
        value = self._next
        if value > MAX_SEQ:
            raise ProtocolError("sequence numbers exhausted")
        self._next += 1
        return value

    def stamp(self, msg: Message) -> Message:
        msg.seq = self.next()
        return msg


class ReplayGuard:
    """The receiver's side, one per peer.

    `round` is the round in progress (None between rounds); `last_round` the highest round ever opened.
    The receiver of ROUND_START/ROUND_END moves them through `accept`; the sender of those (the owner)
    moves its per-party guard with `open_round` / `close_round`.
    """

    def __init__(self) -> None:
        self.last_seq = -1
        self.round: int | None = None
        self.last_round = -1

    def check(self, msg: Message) -> None:
        """Raise ProtocolError if `msg` is a replay or out of round; changes nothing."""
        try:
            if msg.seq <= self.last_seq:
                raise ProtocolError(f"replayed or reordered message: seq {msg.seq} <= last accepted {self.last_seq}")
            role = msg.spec.round_role
            r = msg.get("round")
            if role == "opens":
                if r <= self.last_round:
                    raise ProtocolError(f"round {r} was already opened (last opened: {self.last_round})")
            elif role in ("in", "closes"):
                if self.round is None:
                    raise ProtocolError(f"{msg.type.value} for round {r} while no round is in progress")
                if r != self.round:
                    raise ProtocolError(f"{msg.type.value} for round {r} during round {self.round}")
        except ProtocolError as exc:
            exc.msg_type, exc.seq = msg.type.value, msg.seq
            raise

    def commit(self, msg: Message) -> None:
        """Record an accepted message (call only after `check` passed)."""
        self.last_seq = msg.seq
        role = msg.spec.round_role
        if role == "opens":
            self.open_round(msg["round"])
        elif role == "closes":
            self.close_round()

    def accept(self, msg: Message) -> None:
        """check + commit."""
        self.check(msg)
        self.commit(msg)

    def open_round(self, round: int) -> None:
        if round <= self.last_round:
            raise ProtocolError(f"round {round} was already opened (last opened: {self.last_round})")
        self.round = round
        self.last_round = round

    def close_round(self) -> None:
        self.round = None
