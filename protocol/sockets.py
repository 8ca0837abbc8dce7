"""CurveZMQ sockets: the owner's ROUTER (bind) and a party's DEALER (connect).

Every connection is encrypted (CurveZMQ). The owner authenticates parties through ZAP against the public
keys in its allowlist directory; a party pins the owner's public key, so it talks to nobody else. The
ZAP handler stamps each inbound message with the sender's public key (`User-Id`), which `recv` returns:
the owner knows *who* sent a message from the key, not from the self-chosen socket identity.

Inbound memory is bounded three ways: MAXMSGSIZE per frame, receive high-water marks per connection (a
peer that sends faster than the node reads is held back by TCP, not buffered), and on the owner an
`IdentityLimit` that admits at most a few socket identities per party key (`recv` drops the rest).
"""

from __future__ import annotations

import os
import re
import secrets
import time
import weakref
from collections.abc import Callable, Mapping
from typing import NamedTuple

import zmq
from zmq.auth.base import Authenticator
from zmq.auth.thread import ThreadAuthenticator

from errors import ConfigError
from protocol.codec import DEFAULT_LIMITS, Limits, encode
from protocol.errors import ProtocolError, TransportError
from protocol.identities import IdentityLimit, IdentityRefused
from protocol.keys import load_allowlist, load_pinned, load_secret
from protocol.messages import Message

SEND_TIMEOUT_MS = 10_000
IDENTITY_RANDOM_BYTES = 8
_RANDOM_PART = re.compile(rb"[0-9a-f]{%d}" % (2 * IDENTITY_RANDOM_BYTES))
# Dead connections are found by TCP, not by ZMTP heartbeats: libzmq 4.3 aborts the whole process
# ("Assertion failed: _input_stopped") when a ZMTP heartbeat times out on a connection whose receive queue
# is full, which a flooding peer or a busy node (the owner aligning, a party loading its model) can cause.
# Keepalive probes an idle connection; TCP_MAXRT bounds how long unacknowledged data may wait. Liveness of
# the peer *process* is the application HEARTBEAT's job (protocol.liveness).
KEEPALIVE_IDLE_S = 20
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 4
MAX_RETRANSMIT_MS = 60_000
# High-water marks, in messages per connection (libzmq's default is 1000 each way). An honest party has a
# handful of messages in flight (CHUNK_REQUESTs within its window, a HEARTBEAT, one UPDATE or SECAGG stage),
# so a full queue means a peer sending faster than the node reads: TCP then holds it back. Worst-case
# buffered bytes per connection are about HWM x MAXMSGSIZE. The owner's send queue bounds what a party that
# asks for chunks and reads none makes the owner hold (16 x 4 MiB); sends without waiting are dropped.
ROUTER_RCVHWM = 16
ROUTER_SNDHWM = 16
DEALER_RCVHWM = 16
DEALER_SNDHWM = 64  # a party's own messages queued across a reconnect (2 minutes of HEARTBEATs)
MAX_LATE_DROPS = 1024
_ROUTER_LIMITS: weakref.WeakKeyDictionary[zmq.Socket, IdentityLimit] = weakref.WeakKeyDictionary()


class Received(NamedTuple):
    """One inbound message: the sender's z85 Curve public key (None on the party side, where the only
    peer is the pinned owner), its socket identity (ROUTER only) and the raw frames for `decode`."""

    peer_key: bytes | None
    identity: bytes | None
    frames: list[bytes]


def _common_options(sock: zmq.Socket, max_msg_size: int, send_timeout_ms: int, rcv_hwm: int, snd_hwm: int) -> None:
    """Set before bind/connect: a connection's queues take the high-water marks in force when it opens."""
    if rcv_hwm < 1 or snd_hwm < 1:
        raise ConfigError("high-water marks must be >= 1 (0 would mean unbounded)")
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
    sock.setsockopt(zmq.RCVHWM, rcv_hwm)
    sock.setsockopt(zmq.SNDHWM, snd_hwm)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 0)  # see KEEPALIVE_IDLE_S
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
    sock.setsockopt(zmq.TCP_MAXRT, MAX_RETRANSMIT_MS)
    sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)


_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d+|\*)")


def check_endpoint(endpoint: str, flag: str, listen: bool = False) -> str:
    """`endpoint` if it is a ZeroMQ TCP address (tcp://HOST:PORT; a listener may give port * for any free one),
    else a ConfigError naming `flag`, the expected form and, for a bare HOST:PORT, the address meant."""
    m = _TCP.fullmatch(endpoint.strip()) if isinstance(endpoint, str) else None
    example = "tcp://0.0.0.0:5555" if listen else "tcp://owner.example.org:5555"
    if m is None:
        meant = f": did you mean tcp://{endpoint}?" if re.fullmatch(r"[^\s:/]+:\d+", str(endpoint)) else ""
        raise ConfigError(f"{flag} {endpoint}: an address is tcp://HOST:PORT, e.g. {example}{meant}")
    port = m.group(2)
    if port == "*" and not listen or port != "*" and not 1 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {endpoint}: the port must be a number from 1 to 65535")
    return endpoint.strip()


def bind_router(
    endpoint: str,
    server_secret_file: str | os.PathLike[str],
    allow_dir: str | os.PathLike[str],
    *,
    max_msg_size: int = DEFAULT_LIMITS.max_frame_bytes,
    context: zmq.Context | None = None,
    send_timeout_ms: int = SEND_TIMEOUT_MS,
    rcv_hwm: int = ROUTER_RCVHWM,
    snd_hwm: int = ROUTER_SNDHWM,
    identities: IdentityLimit | None = None,
) -> tuple[zmq.Socket, ThreadAuthenticator]:
    """The owner's socket: CurveZMQ server, ZAP against `allow_dir`'s *.key files, ROUTER_MANDATORY (a
    send to a gone party raises instead of vanishing), ROUTER_HANDOVER (a reconnecting party with the same
    identity replaces its old connection), MAXMSGSIZE per frame, RCVHWM / SNDHWM per party connection.
    `identities` (default: `IdentityLimit()` naming the allowlisted parties) is what `recv` on this socket
    enforces; `identity_limit(sock)` returns it. One router per context (ZAP is bound per context).
    `bound_endpoint(sock)` tells the port when `endpoint` ends in ":*". Close with `close_router(sock, auth)`."""
    public, secret = load_secret(server_secret_file)
    allowed = load_allowlist(allow_dir)
    ctx = context or zmq.Context.instance()
    auth = _start_authenticator(ctx)
    sock = None
    try:
        auth.configure_curve(domain="*", location=os.fspath(allow_dir))
        if set(auth.certs.get("*", {})) != set(allowed.values()):
            raise ConfigError(f"ZAP could not load the allowlist in {allow_dir}")
        sock = ctx.socket(zmq.ROUTER)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_server = True
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        _common_options(sock, max_msg_size, send_timeout_ms, rcv_hwm, snd_hwm)
        limit = identities if identities is not None else IdentityLimit()
        limit.learn_names(allowed)
        _ROUTER_LIMITS[sock] = limit
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot listen on {endpoint}: {exc}") from None
        return sock, auth
    except BaseException:
        if sock is not None:
            sock.close(linger=0)
        auth.stop()
        raise


def _start_authenticator(ctx: zmq.Context) -> ThreadAuthenticator:
    """Start the ZAP handler. Sockets close asynchronously, so the inproc ZAP endpoint of an authenticator
    stopped a moment ago may still be bound: retry briefly before giving up."""
    for _ in range(100):
        auth = ThreadAuthenticator(ctx)
        try:
            auth.start()
            return auth
        except zmq.ZMQError as exc:
            if auth.pipe is not None:  # started no thread yet: close by hand (stop() would block on it)
                auth.pipe.close(linger=0)
                auth.pipe = None
            Authenticator.stop(auth)
            if exc.errno != zmq.EADDRINUSE:
                raise ConfigError(f"cannot start the ZAP authenticator: {exc}") from None
            time.sleep(0.02)
    raise ConfigError("a ZAP authenticator is already running in this ZeroMQ context (one router per context)")


def routing_identity(name: str) -> bytes:
    """`NAME/<16 random hex digits>`: the party's name, which the owner checks against the sender's key, and
    a part drawn fresh by each party process. ROUTER_HANDOVER gives a routing slot to whichever connection
    presents its identity last; since nobody else can guess the random part, no other allowlisted party
    can take over this party's slot and receive the owner's messages to it."""
    return f"{name}/{secrets.token_hex(IDENTITY_RANDOM_BYTES)}".encode()


def connect_dealer(
    endpoint: str,
    client_secret_file: str | os.PathLike[str],
    server_public_file: str | os.PathLike[str],
    *,
    name: str,
    identity: bytes | None = None,
    max_msg_size: int = DEFAULT_LIMITS.max_frame_bytes,
    context: zmq.Context | None = None,
    send_timeout_ms: int = SEND_TIMEOUT_MS,
    rcv_hwm: int = DEALER_RCVHWM,
    snd_hwm: int = DEALER_SNDHWM,
    before_connect: Callable[[zmq.Socket], object] | None = None,
) -> zmq.Socket:
    """A party's socket: CurveZMQ client pinned to the owner's public key. `name` is the party's name (the
    stem of its key file in the owner's allowlist); the socket identity is `routing_identity(name)` unless
    `identity` gives another (tests). ZeroMQ reconnects by itself, keeping the identity; messages sent
    meanwhile wait in the queue. `before_connect(sock)` runs before the connection starts: a monitor attached
    later can miss the first handshake."""
    public, secret = load_secret(client_secret_file)
    server_key = load_pinned(server_public_file, "--owner-key")
    identity = routing_identity(name) if identity is None else identity
    if not name or not 1 <= len(identity) <= 255:
        raise ConfigError("the party name must be non-empty and the socket identity 1-255 bytes")
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_key
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5_000)
        _common_options(sock, max_msg_size, send_timeout_ms, rcv_hwm, snd_hwm)
        if before_connect is not None:
            before_connect(sock)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot connect to {endpoint}: {exc}") from None
        return sock
    except BaseException:
        sock.close(linger=0)
        raise


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint a socket actually bound (resolves a ":*" port)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def identity_limit(sock: zmq.Socket) -> IdentityLimit | None:
    """The identity limit `recv` enforces on a router made by `bind_router` (None for other sockets). The
    owner calls `.release(identity)` when a party says BYE or is given up on, and may set `.on_refuse`."""
    return _ROUTER_LIMITS.get(sock)


def close_router(sock: zmq.Socket, auth: ThreadAuthenticator) -> None:
    _ROUTER_LIMITS.pop(sock, None)
    sock.close(linger=0)
    auth.stop()


def send(sock: zmq.Socket, msg: Message, identity: bytes | None = None, *, limits: Limits = DEFAULT_LIMITS) -> None:
    """Encode and send `msg`; on a ROUTER, `identity` names the party. Raises ProtocolError for a message
    that does not pass its own schema, TransportError when the party is gone or the send times out."""
    frames = encode(msg, limits=limits)
    if sock.type == zmq.ROUTER:
        if not identity:
            raise TransportError("a ROUTER send needs the party's identity")
        frames = [identity, *frames]
    elif identity is not None:
        raise TransportError("only a ROUTER send takes an identity")
    try:
        sock.send_multipart(frames, copy=False)
    except zmq.Again:
        raise TransportError(f"send of {msg.type.value} timed out") from None
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            who = identity.decode(errors="replace") if identity else "peer"
            raise TransportError(f"{who} is not connected") from None
        raise TransportError(f"send of {msg.type.value} failed: {exc}") from None


def recv(sock: zmq.Socket, timeout: float | None) -> Received | None:
    """Wait up to `timeout` seconds (None: forever) for one message; None when nothing came. On a router
    from `bind_router`, messages from identities beyond the per-key limit are dropped here (logged, never
    returned), so the caller only sees admitted identities."""
    limit = _ROUTER_LIMITS.get(sock) if sock.type == zmq.ROUTER else None
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    late_drops = 0  # past the deadline, keep looking only through what is queued already (bounded)
    while late_drops < MAX_LATE_DROPS:
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if sock.poll(wait_ms, zmq.POLLIN) == 0:
            return None
        got = _recv_now(sock)
        if limit is None or got.identity is None:
            return got
        try:
            limit.admit(got.peer_key, got.identity)
            return got
        except IdentityRefused as exc:
            limit.report(exc)
        late_drops += wait_ms == 0
    return None


def _recv_now(sock: zmq.Socket) -> Received:
    parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    identity = None
    if sock.type == zmq.ROUTER:
        identity, parts = parts[0].bytes, parts[1:]
    peer_key = None
    if parts:
        try:
            user = parts[0].get("User-Id")
        except zmq.ZMQError:  # no ZAP on this side: the property does not exist
            user = None
        peer_key = user.encode() if isinstance(user, str) else user
    return Received(peer_key, identity, [p.bytes for p in parts])


def peer_name(allowlist: Mapping[str, bytes], peer_key: bytes | None, identity: bytes | None) -> str:
    """The allowlisted party that sent a message, known by its key. Its socket identity must be
    `routing_identity` of that name, so the owner's replies by identity go to the same key's connection."""
    names = [name for name, key in allowlist.items() if key == peer_key]
    if not names:
        raise ProtocolError("message from a key that is not on the allowlist")
    prefix = names[0].encode() + b"/"
    if identity is None or not identity.startswith(prefix) or not _RANDOM_PART.fullmatch(identity[len(prefix):]):
        shown = identity.decode(errors="replace")[:80] if identity else ""
        raise ProtocolError(f"party {names[0]!r} uses socket identity {shown!r}; it must be its name, '/' and "
                            f"{2 * IDENTITY_RANDOM_BYTES} random hex digits")
    return names[0]
