"""The owner's side of the connections: one ROUTER socket, the parties' sessions, liveness and admission.

Every inbound message is decoded, authenticated (the Curve key the ZAP handler stamped on it must be on the
allowlist and match the socket identity), replay- and round-checked, then handled; anything wrong is
answered with REJECT and logged, and the owner's state is untouched. Control messages (HELLO, chunk
requests, READY, heartbeats, BYE) are handled here; round messages are handed to the round driver.

Advisory replies (REJECT, HEARTBEAT) never wait on a party's full queue, so a party that floods the owner
with junk and reads nothing cannot stall it. Connections refused by ZAP (unknown keys) are logged and
counted from the socket monitor; they never reach the message loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from console.progress import checkpointed, duration
from errors import FedbiotError
from owner.metrics import MetricsLog
from protocol import messages as m
from protocol.chunks import ChunkSource
from protocol.codec import decode, encode
from protocol.errors import ProtocolError, TransportError
from protocol.liveness import Liveness
from protocol.messages import Message, MessageType
from protocol.replay import ReplayGuard, SeqCounter
from protocol.sockets import identity_limit, peer_name, recv
from secure_agg import SecAggError

HEARTBEAT_S = 2.0
WAIT_LINE_S = 60.0  # while waiting for parties (to join, or for their updates), a line at least this often
LOUD_REJECTS = 20  # per party, rejections printed one by one; after that every 1000th (all are in metrics)


@dataclass
class PartyLink:
    """What the owner knows about one connected party."""

    name: str
    identity: bytes
    guard: ReplayGuard = field(default_factory=ReplayGuard)
    out: SeqCounter = field(default_factory=SeqCounter)
    n_examples: int = 0  # as announced in HELLO: exact, or its power-of-two ceiling
    last_round: int = -1  # the last round of this run it finished or sent a masked input for, as READY said
    ready: bool = False
    session_started: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0


class RoundAborted(FedbiotError):
    """Too few parties remain for a round; the last checkpoint stands and `--resume` continues."""


class OwnerLinks:
    """Sessions with the parties over one ROUTER socket: sending, receiving, liveness, admission."""

    def __init__(self, sock, allowlist: dict[str, bytes], archive: ChunkSource, log: MetricsLog, *, run_id: str,
                 welcome: Callable[[], Message], party_timeout: float, monitor) -> None:
        self.sock, self.allowlist, self.archive, self.log = sock, allowlist, archive, log
        self.run_id = run_id  # what a READY must name: its `last_round` is about this run, no other
        self.welcome = welcome  # the WELCOME for a party that says HELLO (run settings, current round)
        self.links: dict[str, PartyLink] = {}
        self.counters: dict[str, SeqCounter] = {}  # owner -> party seq survives a party's re-HELLO
        self.liveness = Liveness(party_timeout)
        self.restarted: set[str] = set()
        self.next_heartbeat = time.monotonic() + HEARTBEAT_S
        self.update_spec: dict = {}  # what a plain UPDATE must carry (set by the round driver)
        self.rejected = 0
        self.rejected_by: dict[str, int] = {}
        self.refused_connections = 0
        self.monitor = monitor
        self.identities = identity_limit(sock)  # at most a few live identities per party key (protocol.identities)
        if self.identities is not None:
            self.identities.on_refuse = self.on_identity_refused

    # ------------------------------------------------------------------------------ sending
    def send_to(self, name: str, msg: Message, *, wait: bool = True) -> bool:
        """Send to a party with a session. wait=False: drop the message if the party's queue is full. A party
        that left (BYE) or was never there is reported unreachable, never a KeyError."""
        link = self.links.get(name)
        if link is None:
            return False
        sent = self.transmit(name, link.identity, link.out, msg, wait=wait)
        link.bytes_down += sent
        return sent > 0

    def transmit(self, name: str, identity: bytes, counter: SeqCounter, msg: Message, *, wait: bool) -> int:
        """Stamp, encode and send; returns the bytes sent, 0 when the party cannot be reached."""
        counter.stamp(msg)
        frames = encode(msg)
        try:
            self.sock.send_multipart([identity, *frames], flags=0 if wait else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if wait:
                self.log.say(f"cannot reach {name}: send of {msg.type.value} timed out")
            return 0
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise TransportError(f"send of {msg.type.value} to {name} failed: {exc}") from None
            if wait:  # advisory messages to a vanished party are not worth a line each
                self.log.say(f"cannot reach {name}: not connected")
            return 0
        return sum(len(f) for f in frames)

    def heartbeats(self) -> None:
        if time.monotonic() < self.next_heartbeat:
            return
        self.next_heartbeat = time.monotonic() + HEARTBEAT_S
        for name, link in list(self.links.items()):
            if link.ready and self.liveness.alive(name):
                self.send_to(name, m.heartbeat(), wait=False)

    def goodbye(self, reason: str) -> None:
        """BYE to every party; one whose queue is full (not reading) is not waited for."""
        for name in list(self.links):
            self.send_to(name, m.bye(reason), wait=False)

    def watch_refusals(self) -> None:
        """Log connections ZAP refused (a key not on the allowlist); they never deliver a message."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            self.refused_connections += 1
            self.log.say(f"refused a connection on {event['endpoint'].decode(errors='replace')}: its key is not "
                         f"on the allowlist (ZAP status {int(event['value'])})")
            self.log.record("refused_connection", status=int(event["value"]))

    def on_identity_refused(self, error: ProtocolError) -> None:
        self.rejected += 1
        self.log.record("reject", party="", reason=error.reason, ref_type="")

    def release(self, identity: bytes) -> None:
        """Free a party identity's slot in the per-key limit (it said BYE or was replaced)."""
        if self.identities is not None:
            self.identities.release(identity)

    # ------------------------------------------------------------------------------ receiving
    def reject(self, identity: bytes | None, name: str | None, error: ProtocolError) -> None:
        """Answer a bad message with REJECT (when the sender is an allowlisted party) and log why; state is
        untouched. The REJECT is dropped rather than waited for if the party does not read its queue."""
        self.rejected += 1
        who = name or (identity.decode(errors="replace")[:64] if identity else "unknown peer")
        count = self.rejected_by[who] = self.rejected_by.get(who, 0) + 1
        if count <= LOUD_REJECTS or count % 1000 == 0:
            more = f" ({count} so far)" if count > LOUD_REJECTS else ""
            self.log.say(f"rejected a message from {who}{more}: {error.reason}")
        self.log.record("reject", party=who, reason=error.reason, ref_type=error.msg_type or "")
        if name is None:
            return
        if name in self.links:
            self.send_to(name, m.reject_for(error), wait=False)
        elif identity is not None:  # authenticated but no session (e.g. the owner restarted): say HELLO
            self.transmit(name, identity, self.counters.setdefault(name, SeqCounter()), m.reject_for(error),
                          wait=False)

    def pump(self, timeout: float) -> tuple[str, Message] | None:
        """Receive one message. Control messages are handled here; round messages are returned."""
        self.heartbeats()
        self.watch_refusals()
        got = recv(self.sock, timeout)
        if got is None:
            return None
        name = None
        try:
            name = peer_name(self.allowlist, got.peer_key, got.identity)
            msg = decode(got.frames, sender="party", expect={MessageType.UPDATE: self.update_spec})
            if msg.type is MessageType.HELLO:
                self.on_hello(name, got.identity, msg)
                return None
            link = self.links.get(name)
            if link is None:
                raise ProtocolError("hello required: no session with this party (send HELLO first)",
                                    msg_type=msg.type.value, seq=msg.seq)
            link.guard.check(msg)
            link.bytes_up += sum(len(f) for f in got.frames)
            self.liveness.seen(name)
            handled = self.on_control(name, msg)  # raises before any side effect when the content is bad
            link.guard.commit(msg)  # only now: a refused message leaves the guard untouched
            return handled
        except ProtocolError as exc:
            self.reject(got.identity, name, exc)
            return None

    def on_hello(self, name: str, identity: bytes, msg: Message) -> None:
        if msg["name"] != name:
            raise ProtocolError(f"HELLO names {msg['name']!r}, but the key and socket identity are {name!r}")
        if msg["n_examples"] < 1:
            raise ProtocolError("a party needs at least one training example")
        old = self.links.get(name)
        if old is not None and old.ready:
            self.restarted.add(name)
        if old is not None and old.identity != identity:
            self.release(old.identity)
        link = PartyLink(name, identity, n_examples=msg["n_examples"], session_started=time.monotonic(),
                         out=self.counters.setdefault(name, SeqCounter()))
        link.guard.commit(msg)
        self.links[name] = link
        self.liveness.seen(name)
        self.send_to(name, self.welcome())
        has_model = msg["model_sha256"] == self.archive.info.model_sha256
        # A party announces a ceiling (the next power of two, unless it shares the exact size): say it as one
        self.log.say(f"{name} joined (at most {msg['n_examples']} examples{', has the model' if has_model else ''})")
        self.log.record("join", party=name, n_examples=msg["n_examples"])

    def on_control(self, name: str, msg: Message) -> tuple[str, Message] | None:
        if msg.type is MessageType.CHUNK_REQUEST:
            index = msg["index"]
            if not 0 <= index < self.archive.info.n_chunks:
                raise ProtocolError(f"chunk {index} does not exist (archive has {self.archive.info.n_chunks})")
            # Not waited for: an honest party keeps a few requests in flight and reads its queue; one that
            # asks for chunks and reads nothing must not stall the owner (it can ask again).
            self.send_to(name, m.chunk(index, self.archive.chunk(index)), wait=False)
            return None
        if msg.type is MessageType.READY:
            if msg["model_sha256"] != self.archive.info.model_sha256:
                raise ProtocolError("READY for a model archive this run does not serve")
            if msg["run_id"] != self.run_id:
                raise ProtocolError(f"READY for run {msg['run_id']!r}; this run is {self.run_id!r}")
            link = self.links[name]
            link.ready, link.last_round = True, msg["last_round"]
            done = f" (took part in this run up to round {link.last_round + 1})" if link.last_round >= 0 else ""
            self.log.say(f"{name} is ready{done}")
            return None
        if msg.type is MessageType.HEARTBEAT:
            return None
        if msg.type is MessageType.BYE:
            self.log.say(f"{name} left: {msg['reason'] or 'no reason given'}")
            link = self.links.pop(name, None)
            if link is not None:
                self.release(link.identity)
            self.liveness.forget(name)
            return None
        return name, msg

    def liveness_grace(self, names: Iterable[str]) -> None:
        """Count these parties as just heard from: the owner itself was busy (aligning), not them. Only the
        parties being waited for: one already given up on must not come back to life."""
        for name in names:
            if name in self.links:
                self.liveness.seen(name)

    def drain(self) -> None:
        """Handle everything queued while the owner was busy (alignment), so liveness is current."""
        for _ in range(10_000):
            if not self.sock.poll(0):
                return
            item = self.pump(0)
            if item is not None:
                name, msg = item
                self.reject(None, name, ProtocolError(f"unexpected {msg.type.value} between rounds"))

    def collect(self, pending: Iterable[str], accept: Callable[[str, Message], bool], deadline: float,
                what: str) -> set[str]:
        """Pump until every pending party delivered (accept returned True), went silent, restarted, left, or
        the deadline passed. Returns who delivered; messages accept refuses are REJECTed."""
        pending, done = set(pending), set()
        self.liveness_grace(pending)
        last_line = time.monotonic()
        while pending and time.monotonic() < deadline:
            if time.monotonic() - last_line >= WAIT_LINE_S:  # never quiet while parties train
                last_line = time.monotonic()
                self.log.say(f"waiting for {what}: {len(done)} of {len(done) + len(pending)} in, still waiting for "
                             f"{', '.join(sorted(pending))} (deadline in {duration(deadline - last_line)})")
            item = self.pump(0.2)
            if item is not None:
                name, msg = item
                try:
                    if name in pending and accept(name, msg):
                        pending.discard(name)
                        done.add(name)
                    elif name not in pending:
                        raise ProtocolError(f"unexpected {msg.type.value} while waiting for {what}")
                except (ProtocolError, SecAggError) as exc:
                    err = exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc))
                    err.msg_type, err.seq = msg.type.value, msg.seq
                    self.reject(None, name, err)
            for name in sorted(pending):
                if name in self.restarted or not self.liveness.alive(name) or name not in self.links:
                    self.log.say(f"{name} is gone (silent, restarted or left): left out of {what}")
                    pending.discard(name)
        for name in sorted(pending):
            self.log.say(f"{name} missed the deadline for {what}: left out")
        return done

    # ------------------------------------------------------------------------------ admission
    def ready_parties(self) -> list[str]:
        return sorted(n for n, link in self.links.items() if link.ready and self.liveness.alive(n))

    def wait_for_parties(self, wanted: int, minimum: int, join_timeout: float, first: bool, done_rounds: int
                         ) -> list[str]:
        """Block until enough parties are ready: all `wanted` (or, after the join timeout, the minimum)."""
        self.drain()
        deadline = time.monotonic() + join_timeout
        announced, last_line = -1, 0.0
        while True:
            ready = self.ready_parties()
            if len(ready) >= wanted or (not first and len(ready) >= minimum):
                return ready
            now = time.monotonic()
            if now > deadline:
                if len(ready) >= minimum:
                    return ready
                raise RoundAborted(
                    f"only {len(ready)} of the {minimum} parties needed are ready after {join_timeout:.0f} s; "
                    f"{checkpointed(done_rounds)}, restart with --resume")
            if len(ready) != announced or now - last_line >= WAIT_LINE_S:
                announced, last_line = len(ready), now
                left = duration(deadline - now)
                then = (f"in {left} it starts with those ready if at least {minimum}, else stops" if first and
                        minimum < wanted else f"gives up in {left} (--join-timeout)")
                names = f" ({', '.join(ready)})" if ready else ""
                self.log.say(f"waiting for parties: {announced} of {wanted if first else minimum} ready{names}; "
                             f"{then}")
            self.pump(0.5)
