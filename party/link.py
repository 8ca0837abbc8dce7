"""The party's link to the owner: one CurveZMQ DEALER socket pinned to the owner's public key, so it talks to
nobody else; the handshake watch that turns a refused key or a wrong owner key into one clear error instead of
retries until the timeout; heartbeats, so the owner can tell a busy party from a dead one; HELLO once per
established connection (a message can only be lost with its connection: an owner busy pre-aligning for minutes
gets one HELLO, not one per timer tick); and every owner message schema- and replay-checked before the session
sees it (a bad one is logged and dropped)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from console.progress import duration
from errors import FedbiotError
from protocol import messages as m
from protocol.codec import decode
from protocol.errors import ProtocolError, TransportError
from protocol.messages import RUN_FINISHED, RUN_UNTRAINED, Message, MessageType
from protocol.replay import ReplayGuard, SeqCounter
from protocol.sockets import connect_dealer, recv, send

HEARTBEAT_S = 2.0
CONNECT_LINE_S = 10.0  # while no connection is up, a line this often: the address and the time left
WAIT_LINE_S = 60.0  # once connected, a line after this long without a message from the owner, and as often again
SILENT_S = 10.0  # heartbeats come every HEARTBEAT_S: this long without any means the owner is busy (or gone)
REHELLO_S = 300.0  # fallback only: HELLO is repeated when a new connection comes up (see watch_handshakes)
HELLO_RETRY_S = 2.0  # after a "hello required" REJECT, at most one HELLO per this many seconds
MAX_FAILED_HANDSHAKES = 3  # consecutive CurveZMQ handshake failures before the owner key is declared wrong


class OwnerGone(FedbiotError):
    """The owner ended the run (BYE) or stayed silent past the timeout."""


class OwnerRefused(FedbiotError):
    """The connection cannot work: the owner refuses this party's key, or is not the pinned owner."""


class OwnerUnreachable(FedbiotError):
    """No connection to the owner came up within the connect timeout."""


class OwnerLink:
    """The connection to the owner. `hello` builds this party's HELLO (the session knows what it holds);
    `expect` is what decode checks a ROUND_START's tensors against, once the model is loaded."""

    def __init__(self, endpoint: str, key: Path, owner_key: Path, name: str, timeout: float,
                 hello: Callable[[], Message], log: Callable[[str], None], connect_timeout: float | None = None
                 ) -> None:
        self.endpoint, self.key, self.owner_key, self.name = endpoint, key, owner_key, name
        self.timeout, self.make_hello, self.log = timeout, hello, log
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.context = zmq.Context()  # its own: closing it waits until queued messages (BYE, shares) left
        monitors: list[zmq.Socket] = []  # attached before the connection starts, so no handshake goes unseen
        self.sock = connect_dealer(endpoint, key, owner_key, name=name, context=self.context,
                                   before_connect=lambda sock: monitors.append(sock.get_monitor_socket(
                                       zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                       | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)))
        self.monitor = monitors[0]
        self.failed_handshakes = 0
        self.handshakes = 0  # connections established so far
        self.hello_handshake = 0  # the value of `handshakes` when the last HELLO was sent
        self.out = SeqCounter()
        self.guard = ReplayGuard()
        self.expect: dict = {}
        self.last_heard = self.started = self.last_message = self.last_line = time.monotonic()
        self.waiting_for = "the owner's welcome"  # what the party waits for, in its waiting lines
        self.last_hello = 0.0
        self.next_heartbeat = 0.0
        self.welcomed = False
        self.finished = False  # the owner ended the run normally (BYE "run finished")

    def send(self, msg: Message) -> None:
        self.out.stamp(msg)
        try:
            send(self.sock, msg)
        except TransportError as exc:
            self.log(f"send failed ({exc}); the owner will see this party as silent")

    def hello(self) -> None:
        self.last_hello = time.monotonic()
        self.hello_handshake = self.handshakes
        self.send(self.make_hello())

    def watch_handshakes(self) -> None:
        """Turn a refused key or a wrong pinned owner key into one clear error instead of silent retries."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, value = event["event"], int(event["value"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed_handshakes = 0
                self.handshakes += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if value == 400:
                    raise OwnerRefused(f"the owner at {self.endpoint} refused this party's key "
                                       f"({self.key}): it must put {self.name}.key in its allowlist")
                self.log(f"the owner could not check this party's key (status {value}); retrying")
            else:
                self.failed_handshakes += 1
                if self.failed_handshakes >= MAX_FAILED_HANDSHAKES:
                    raise OwnerRefused(
                        f"the encrypted handshake with {self.endpoint} failed {self.failed_handshakes} "
                        f"times: --owner-key {self.owner_key} is not the key of the owner listening there")

    def receive(self, timeout: float) -> Message | None:
        """One checked owner message, or None. Handles heartbeats, REJECT, BYE and re-HELLO itself."""
        self.watch_handshakes()
        now = time.monotonic()
        if now >= self.next_heartbeat and self.welcomed:
            self.next_heartbeat = now + HEARTBEAT_S
            self.send(m.heartbeat())
        if not self.welcomed and self.handshakes and (
                self.handshakes != self.hello_handshake or now - self.last_hello > REHELLO_S):
            self.hello()  # the first connection, a new one (the last HELLO may have died with the old), or late
        self.report_wait(now)
        if now - self.last_heard > self.timeout:
            raise OwnerGone(f"no word from the owner at {self.endpoint} for {self.timeout:.0f} s (--timeout)")
        got = recv(self.sock, timeout)
        if got is None:
            return None
        try:
            msg = decode(got.frames, sender="owner", expect=self.expect)
            if msg.type is MessageType.WELCOME:
                self.guard = ReplayGuard()  # a (re)started owner counts from 1 again
            if msg.type is not MessageType.REJECT:  # a REJECT changes no state; a restarted owner's
                self.guard.check(msg)              # first one must get through to trigger HELLO
                self.guard.commit(msg)
        except ProtocolError as exc:
            self.log(f"dropped a bad message from the owner: {exc.reason}")
            return None
        self.last_heard = time.monotonic()
        if msg.type is MessageType.HEARTBEAT:
            return None
        self.last_message = self.last_heard
        if msg.type is MessageType.REJECT:
            self.log(f"the owner rejected our {msg['ref_type'] or 'message'}: {msg['reason']}")
            # A restarted owner knows no session: say HELLO once (queued heartbeats bring a burst of these).
            if msg["reason"].startswith("hello required") and (
                    self.welcomed or time.monotonic() - self.last_hello > HELLO_RETRY_S):
                self.welcomed = False
                self.hello()
            return None
        if msg.type is MessageType.BYE:
            self.finished = msg["reason"] == RUN_FINISHED
            if self.finished:
                raise OwnerGone(f"the owner ended the run: {msg['reason']}")
            if msg["reason"].startswith(RUN_UNTRAINED):  # every round ran, nothing was learnt: no success
                raise OwnerGone(f"the owner ended the run without training the adapter: {msg['reason']}")
            raise OwnerGone(f"the owner stopped before the end of the run: {msg['reason'] or 'no reason given'}")
        return msg

    def report_wait(self, now: float) -> None:
        """Say what the party waits for when it has waited a while: with no connection up, every CONNECT_LINE_S
        (the address, the time left before the connect timeout, which ends the run as an error); once connected,
        after WAIT_LINE_S without an owner message, whether the owner still sends heartbeats or how long it has
        been silent and the time left before --timeout."""
        if not self.handshakes:
            waited = now - self.started
            if waited > self.connect_timeout:
                raise OwnerUnreachable(
                    f"no connection to the owner at {self.endpoint} after {self.connect_timeout:.0f} s "
                    "(--connect-timeout): check the address and port, that `owner --listen` runs there, and that a "
                    "firewall lets this machine reach that port")
            if now - self.last_line >= CONNECT_LINE_S:
                self.last_line = now
                self.log(f"no connection to {self.endpoint} yet after {duration(waited)}: is the owner running "
                         f"there, with the port open to this machine? (gives up in "
                         f"{duration(self.connect_timeout - waited)})")
            return
        if now - max(self.last_message, self.last_line) < WAIT_LINE_S:
            return
        self.last_line = now
        silent = now - self.last_heard
        state = (f"no word from it for {duration(silent)}, it may be busy aligning; gives up in "
                 f"{duration(self.timeout - silent)}" if silent >= SILENT_S else "the owner is alive")
        self.log(f"waiting for {self.waiting_for} from {self.endpoint} ({state})")

    def close(self, linger_ms: int) -> None:
        """Close the socket and wait up to `linger_ms` for queued messages to leave (socket close alone returns at
        once; terminating the context is what waits)."""
        if self.sock.closed:
            return
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)
        self.context.term()
