"""Application-level liveness: who was heard from when, when to send the next HEARTBEAT, and round
deadlines. TCP keepalive (set in `sockets`) only detects a dead connection; these detect a peer
whose process is stuck or gone while ZeroMQ keeps reconnecting."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

Clock = Callable[[], float]


class Liveness:
    """Last time each peer was heard from; silent for longer than `timeout_s` means presumed dead."""

    def __init__(self, timeout_s: float, clock: Clock = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._seen: dict[Hashable, float] = {}

    def seen(self, peer: Hashable) -> None:
        self._seen[peer] = self._clock()

    def alive(self, peer: Hashable) -> bool:
        last = self._seen.get(peer)
        return last is not None and self._clock() - last <= self.timeout_s

    def silent(self) -> list[Hashable]:
        """Peers not heard from within the timeout."""
        now = self._clock()
        return [p for p, last in self._seen.items() if now - last > self.timeout_s]

    def forget(self, peer: Hashable) -> None:
        self._seen.pop(peer, None)


class Ticker:
    """Says when the next HEARTBEAT is due (every `interval_s`)."""

    def __init__(self, interval_s: float, clock: Clock = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next = clock() + interval_s

    def due(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True


class Deadline:
    """A point in time `seconds` from now (a round's deadline)."""

    def __init__(self, seconds: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self._clock())

    @property
    def expired(self) -> bool:
        return self._clock() >= self.at
