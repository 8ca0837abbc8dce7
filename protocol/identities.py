"""How many socket identities one party key may use at once on the owner's ROUTER.

A party chooses its own socket identity, so one allowlisted key could open any number of connections under
fresh identities, and the owner would keep a queue and a routing slot for each. `IdentityLimit` admits at
most `max_per_key` live identities per CurveZMQ key: a restarted party (new random identity) fits in the
second slot while its dead predecessor's is still held, and an identity silent for `idle_s` gives its slot
to a newcomer. Messages from further identities are refused before the owner decodes or stores anything.
Pure bookkeeping (no sockets), so the owner can consult it wherever it receives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from errors import ConfigError
from protocol.errors import ProtocolError

DEFAULT_IDENTITIES_PER_KEY = 2
DEFAULT_IDENTITY_IDLE_S = 30.0  # 15 party heartbeats (every 2 s): an identity this quiet has died
LOUD_REFUSALS = 3  # per key, then one line per 1000
_log = logging.getLogger("protocol.identities")


class IdentityRefused(ProtocolError):
    """A message from one identity too many for its key; the owner drops it and keeps serving."""

    def __init__(self, reason: str, *, peer_key: bytes | None, identity: bytes) -> None:
        super().__init__(reason)
        self.peer_key = peer_key
        self.identity = identity


class IdentityLimit:
    """At most `max_per_key` live socket identities per sender key (see the module docstring).

    `names` maps keys to party names for readable log lines; `on_refuse` (optional) is called with each
    refusal after the rate-limited log line, for instance to count it in the owner's metrics."""

    def __init__(
        self,
        max_per_key: int = DEFAULT_IDENTITIES_PER_KEY,
        idle_s: float = DEFAULT_IDENTITY_IDLE_S,
        *,
        names: Mapping[str, bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_refuse: Callable[[IdentityRefused], None] | None = None,
    ) -> None:
        if max_per_key < 1:
            raise ConfigError(f"identities per key must be >= 1, got {max_per_key}")
        if not idle_s > 0:
            raise ConfigError(f"identity idle time must be a positive number of seconds, got {idle_s}")
        self.max_per_key = max_per_key
        self.idle_s = idle_s
        self.on_refuse = on_refuse
        self._clock = clock
        self._names: dict[bytes, str] = {}
        self.learn_names(names or {})
        self._live: dict[bytes | None, dict[bytes, float]] = {}  # key -> identity -> last seen
        self.refusals: dict[bytes | None, int] = {}

    def learn_names(self, names: Mapping[str, bytes]) -> None:
        """Name the parties (name -> key, as `keys.load_allowlist` gives) in log lines."""
        self._names.update({key: name for name, key in names.items()})

    def admit(self, peer_key: bytes | None, identity: bytes) -> None:
        """Record a message from `identity` under `peer_key`; raises IdentityRefused (state untouched) when
        the key already has `max_per_key` live identities and none of them has been idle for `idle_s`."""
        now = self._clock()
        live = self._live.setdefault(peer_key, {})
        if identity not in live and len(live) >= self.max_per_key:
            stalest = min(live, key=live.__getitem__)
            if now - live[stalest] < self.idle_s:
                self.refusals[peer_key] = self.refusals.get(peer_key, 0) + 1
                raise IdentityRefused(
                    f"{self.who(peer_key)} already uses {len(live)} socket identities (the limit); "
                    f"refusing identity {_show(identity)!r}", peer_key=peer_key, identity=identity)
            del live[stalest]
        live[identity] = now

    def release(self, identity: bytes) -> None:
        """Free an identity's slot at once (its party said BYE or was given up on)."""
        for key, live in list(self._live.items()):
            live.pop(identity, None)
            if not live:
                del self._live[key]

    def live(self, peer_key: bytes | None) -> list[bytes]:
        """The identities holding `peer_key`'s slots, most recently seen last."""
        live = self._live.get(peer_key, {})
        return sorted(live, key=live.__getitem__)

    def report(self, error: IdentityRefused) -> None:
        """Log a refusal (the first few per key, then every 1000th) and pass it to `on_refuse`."""
        count = self.refusals.get(error.peer_key, 0)
        if count <= LOUD_REFUSALS or count % 1000 == 0:
            more = f" ({count} so far)" if count > 1 else ""
            _log.warning("dropped a message%s: %s", more, error.reason)
        if self.on_refuse is not None:
            self.on_refuse(error)

    def who(self, peer_key: bytes | None) -> str:
        name = self._names.get(peer_key) if peer_key is not None else None
        if name is not None:
            return f"party {name!r}"
        return f"key {peer_key[:12].decode(errors='replace')}..." if peer_key else "an unauthenticated peer"


def _show(identity: bytes) -> str:
    return identity.decode(errors="replace")[:80]
