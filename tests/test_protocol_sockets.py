"""Keys and real CurveZMQ sockets on 127.0.0.1: allowed parties talk and are identified by their public
key; unknown keys, parties pinning the wrong owner key, and oversize frames get nothing through."""

from __future__ import annotations

import logging
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import zmq
import zmq.auth

from errors import ConfigError
from protocol import messages as m
from protocol.codec import decode, tensor_spec
from protocol.errors import ProtocolError, TransportError
from protocol.identities import IdentityLimit, IdentityRefused
from protocol.keys import generate_keypair, load_allowlist, load_public, load_secret
from protocol.messages import MessageType
from protocol.replay import SeqCounter
from protocol.sockets import (
    DEALER_RCVHWM,
    DEALER_SNDHWM,
    ROUTER_RCVHWM,
    ROUTER_SNDHWM,
    bind_router,
    bound_endpoint,
    close_router,
    connect_dealer,
    identity_limit,
    peer_name,
    recv,
    send,
)

SILENCE_S = 1.5  # how long "nothing arrives" is waited for
ARRIVE_S = 10.0  # upper bound for something that must arrive


@pytest.fixture()
def keys(tmp_path):
    """Owner key, allowed party `alice`, and `mallory`, whose key the owner does not list."""
    out = {"owner": generate_keypair(tmp_path / "owner", "owner")}
    for name in ("alice", "mallory"):
        out[name] = generate_keypair(tmp_path / name, name)
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(out["alice"][0], allow / "alice.key")
    out["allow"] = allow
    return out


@pytest.fixture()
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture()
def server(keys, ctx):
    router, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx)
    yield router, bound_endpoint(router)
    close_router(router, auth)


def _dealer(ctx, endpoint, keys, name, *, pinned="owner", identity=None, **kw):
    return connect_dealer(endpoint, keys[name][1], keys[pinned][0], name=name, identity=identity, context=ctx, **kw)


def _hello(name="alice"):
    return SeqCounter().stamp(m.hello(name=name, n_examples=10))


def test_allowed_party_exchanges_messages_and_is_identified_by_key(keys, ctx, server):
    router, endpoint = server
    dealer = _dealer(ctx, endpoint, keys, "alice")
    try:
        send(dealer, _hello())
        got = recv(router, ARRIVE_S)
        assert got is not None
        assert got.peer_key == load_public(keys["alice"][0]) and re.fullmatch(rb"alice/[0-9a-f]{16}", got.identity)
        assert decode(got.frames, sender="party").type is MessageType.HELLO
        assert peer_name(load_allowlist(keys["allow"]), got.peer_key, got.identity) == "alice"

        send(
            router,
            m.welcome(run_id="r", settings={}, model_sha256="0" * 64, model_size=0, chunk_size=1, n_chunks=0, round=0),
            got.identity,
        )
        back = recv(dealer, ARRIVE_S)
        assert back is not None and back.identity is None
        assert decode(back.frames, sender="owner").type is MessageType.WELCOME

        tensors = {"w.lora_A.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
        send(dealer, m.update(round=0, n_examples=10, tensors=tensors))
        got = recv(router, ARRIVE_S)
        update = decode(got.frames, expect={MessageType.UPDATE: tensor_spec(tensors)})
        assert np.array_equal(update.tensors["w.lora_A.weight"], tensors["w.lora_A.weight"])
    finally:
        dealer.close(linger=0)


def test_unknown_key_gets_nothing_through(keys, ctx, server):
    router, endpoint = server
    intruder = _dealer(ctx, endpoint, keys, "mallory")
    try:
        send(intruder, _hello("mallory"))
        assert recv(router, SILENCE_S) is None
        assert recv(intruder, 0.1) is None
    finally:
        intruder.close(linger=0)
    assert _allowed_party_gets_through(ctx, endpoint, keys, router)  # the server itself is fine


def test_party_pinning_wrong_owner_key_cannot_talk(keys, ctx, server):
    router, endpoint = server
    fooled = _dealer(ctx, endpoint, keys, "alice", pinned="mallory")
    try:
        send(fooled, _hello())
        assert recv(router, SILENCE_S) is None
        assert recv(fooled, 0.1) is None
    finally:
        fooled.close(linger=0)
    assert _allowed_party_gets_through(ctx, endpoint, keys, router)


def _allowed_party_gets_through(ctx, endpoint, keys, router) -> bool:
    dealer = _dealer(ctx, endpoint, keys, "alice")
    try:
        send(dealer, _hello())
        got = recv(router, ARRIVE_S)
        return got is not None and got.peer_key == load_public(keys["alice"][0])
    finally:
        dealer.close(linger=0)


def test_oversize_frame_is_dropped_by_the_socket(keys, ctx):
    router, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx, max_msg_size=4096)
    dealer = _dealer(ctx, bound_endpoint(router), keys, "alice")
    try:
        big = {"w": np.zeros(4096, dtype=np.float32)}
        send(dealer, m.update(round=0, n_examples=1, tensors=big))
        assert recv(router, SILENCE_S) is None
        send(dealer, SeqCounter(2).stamp(m.heartbeat()))  # the party reconnects; small messages pass
        got = recv(router, ARRIVE_S)
        assert got is not None and decode(got.frames).type is MessageType.HEARTBEAT
    finally:
        dealer.close(linger=0)
        close_router(router, auth)


@pytest.mark.parametrize("identity", [b"alice", b"alice/" + b"0" * 16, b"mallory", b"mallory/xyz",
                                      b"mallory/" + b"A" * 16])
def test_spoofed_identity_is_detected(keys, ctx, identity):
    shutil.copy(keys["mallory"][0], keys["allow"] / "mallory.key")
    router, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx)
    dealer = _dealer(ctx, bound_endpoint(router), keys, "mallory", identity=identity)
    try:
        send(dealer, _hello("alice"))
        got = recv(router, ARRIVE_S)
        assert got is not None and got.identity == identity
        with pytest.raises(ProtocolError, match="must be its name, '/' and 16 random hex digits"):
            peer_name(load_allowlist(keys["allow"]), got.peer_key, got.identity)
        with pytest.raises(ProtocolError, match="not on the allowlist"):
            peer_name({"alice": load_public(keys["alice"][0])}, got.peer_key, got.identity)
    finally:
        dealer.close(linger=0)
        close_router(router, auth)


def test_another_party_cannot_take_over_a_routing_slot(keys, ctx):
    """Each party process draws the random part of its identity itself: another allowlisted party, which
    never sees it, cannot present it, so ROUTER_HANDOVER never hands it this party's replies."""
    shutil.copy(keys["mallory"][0], keys["allow"] / "mallory.key")
    router, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx)
    alice = _dealer(ctx, bound_endpoint(router), keys, "alice")
    mallory = _dealer(ctx, bound_endpoint(router), keys, "mallory")
    try:
        send(alice, _hello("alice"))
        got = recv(router, ARRIVE_S)
        assert peer_name(load_allowlist(keys["allow"]), got.peer_key, got.identity) == "alice"
        send(mallory, _hello("mallory"))
        assert recv(router, ARRIVE_S).identity != got.identity
        send(router, SeqCounter().stamp(m.heartbeat()), got.identity)
        assert recv(alice, ARRIVE_S) is not None and recv(mallory, SILENCE_S) is None
        assert connect_dealer("tcp://127.0.0.1:1", keys["alice"][1], keys["owner"][0], name="alice",
                              context=ctx).getsockopt(zmq.IDENTITY) != got.identity  # fresh per socket
    finally:
        for sock in (alice, mallory):
            sock.close(linger=0)
        close_router(router, auth)


def test_router_send_to_absent_party_raises(server):
    router, _ = server
    with pytest.raises(TransportError, match="not connected"):
        send(router, m.heartbeat(), b"nobody")
    with pytest.raises(TransportError, match="needs the party's identity"):
        send(router, m.heartbeat())


def test_bind_errors_are_config_errors(keys, ctx, tmp_path):
    with pytest.raises(ConfigError, match="cannot listen"):
        bind_router("tcp://256.0.0.1:1", keys["owner"][1], keys["allow"], context=ctx)
    with pytest.raises(ConfigError, match="no secret key"):
        bind_router("tcp://127.0.0.1:*", keys["owner"][0], keys["allow"], context=ctx)
    router, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx)
    try:  # a failed bind left no authenticator behind, but a live router holds its context's ZAP endpoint
        with pytest.raises(ConfigError, match="one router per context"):
            bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx)
    finally:
        close_router(router, auth)


# ---------------------------------------------------------------------------------------------- keys


def test_keygen_writes_zmq_certificates(tmp_path):
    public, secret = generate_keypair(tmp_path / "k", "bob")
    assert (public.name, secret.name) == ("bob.key", "bob.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (pub, None)
    assert load_secret(secret) == (pub, sec) and load_public(public) == pub
    assert zmq.curve_public(sec) == pub
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path / "k", "bob")
    assert generate_keypair(tmp_path / "k", "bob", overwrite=True)[0] == public
    assert load_public(public) != pub


@pytest.mark.parametrize("name", ["", "../x", "-x", "a b", "a" * 65])
def test_keygen_refuses_bad_names(tmp_path, name):
    with pytest.raises(ConfigError, match="key name"):
        generate_keypair(tmp_path, name)


def test_key_loading_errors(tmp_path):
    public, _ = generate_keypair(tmp_path, "bob")
    with pytest.raises(ConfigError, match="does not exist"):
        load_public(tmp_path / "nobody.key")
    with pytest.raises(ConfigError, match="no secret key"):
        load_secret(public)
    (tmp_path / "junk.key").write_text("hello\n")
    with pytest.raises(ConfigError, match="not a CurveZMQ certificate"):
        load_public(tmp_path / "junk.key")
    (tmp_path / "short.key").write_text('curve\n    public-key = "abc"\n')
    with pytest.raises(ConfigError, match="malformed public key"):
        load_public(tmp_path / "short.key")


def test_allowlist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_allowlist(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no \\*.key files"):
        load_allowlist(tmp_path / "empty")
    a, _ = generate_keypair(tmp_path / "keys", "a")
    generate_keypair(tmp_path / "keys", "b")
    allow = load_allowlist(tmp_path / "keys")  # *.key_secret files are not public keys
    assert sorted(allow) == ["a", "b"] and allow["a"] == load_public(a)
    shutil.copy(a, tmp_path / "keys" / "c.key")
    with pytest.raises(ConfigError, match="same public key"):
        load_allowlist(tmp_path / "keys")


FLOOD_SCRIPT = """
import sys, time
import zmq
from protocol.sockets import bind_router, bound_endpoint, close_router, connect_dealer
owner_secret, owner_public, allow, alice_secret, stall_s = sys.argv[1:6]
ctx = zmq.Context()
router, auth = bind_router("tcp://127.0.0.1:*", owner_secret, allow, context=ctx)
dealer = connect_dealer(bound_endpoint(router), alice_secret, owner_public, name="alice", context=ctx)
dealer.send(b"hello")
assert router.poll(10_000)
identity = router.recv_multipart()[0]
sent = 0
for _ in range(5000):  # far beyond both high-water marks: the dealer's receive queue fills and stays full
    try:
        router.send_multipart([identity, b"x" * 100], flags=zmq.NOBLOCK)
        sent += 1
    except zmq.Again:
        pass
time.sleep(float(stall_s))  # the reader is busy for longer than any connection timeout
got = 0
while dealer.poll(2_000):
    dealer.recv_multipart()
    got += 1
print(sent, got)
dealer.close(linger=0)
close_router(router, auth)
ctx.term()
"""


def test_a_reader_stalled_behind_a_full_queue_survives(keys, tmp_path):
    """A node that reads nothing for a while (the owner aligning, a party loading its model) while its peer
    keeps sending must not crash: with ZMTP heartbeats libzmq 4.3 aborts the process in this situation."""
    probe = connect_dealer("tcp://127.0.0.1:1", keys["alice"][1], keys["owner"][0], name="alice")
    assert probe.getsockopt(zmq.HEARTBEAT_IVL) == 0 and probe.getsockopt(zmq.TCP_KEEPALIVE) == 1
    probe.close(linger=0)
    proc = subprocess.run(
        [sys.executable, "-c", FLOOD_SCRIPT, str(keys["owner"][1]), str(keys["owner"][0]), str(keys["allow"]),
         str(keys["alice"][1]), "12"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sent, got = map(int, proc.stdout.split())
    assert sent > ROUTER_SNDHWM + DEALER_RCVHWM and got == sent  # nothing lost either: the sender waited


# ------------------------------------------------------------------------------- inbound memory bounds


def test_high_water_marks_are_set_on_both_sockets(keys, ctx, server):
    router, endpoint = server
    dealer = _dealer(ctx, endpoint, keys, "alice")
    try:
        assert (router.getsockopt(zmq.RCVHWM), router.getsockopt(zmq.SNDHWM)) == (ROUTER_RCVHWM, ROUTER_SNDHWM)
        assert (dealer.getsockopt(zmq.RCVHWM), dealer.getsockopt(zmq.SNDHWM)) == (DEALER_RCVHWM, DEALER_SNDHWM)
        assert max(ROUTER_RCVHWM, ROUTER_SNDHWM, DEALER_RCVHWM, DEALER_SNDHWM) < 1000  # below libzmq's default
    finally:
        dealer.close(linger=0)
    with pytest.raises(ConfigError, match="high-water marks"):
        _dealer(ctx, endpoint, keys, "alice", rcv_hwm=0)


def test_a_party_flooding_a_busy_owner_is_held_back_not_buffered(keys, ctx):
    """The owner reads nothing for a while; a party sending 1 MiB messages as fast as it can gets only the
    owner's receive high-water mark's worth (plus what TCP holds) queued there, then its own sends stall
    instead of the owner's memory growing. The flooder keeps next to nothing on its side (SNDHWM 1), so
    what it got sent sits at the owner: libzmq's default RCVHWM would have let some 1000 MiB in."""
    router, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx,
                               max_msg_size=2 * 2**20)
    dealer = _dealer(ctx, bound_endpoint(router), keys, "alice", max_msg_size=2 * 2**20, snd_hwm=1)
    try:
        send(dealer, _hello())
        assert recv(router, ARRIVE_S) is not None  # connected and admitted
        blob, sent = b"x" * 2**20, 0
        while sent < 400:
            try:
                dealer.send(blob, flags=zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                if dealer.poll(1000, zmq.POLLOUT) == 0:  # no room for a second: the owner holds it back
                    break
        assert ROUTER_RCVHWM <= sent < ROUTER_RCVHWM + 48  # 48: TCP's buffers, at 1 MiB a message
        got = 0
        while recv(router, SILENCE_S) is not None:
            got += 1
        assert got == sent  # nothing was lost: the party waited for the owner
    finally:
        dealer.close(linger=0)
        close_router(router, auth)


def test_one_key_cannot_open_more_identities_than_the_limit(keys, ctx, caplog):
    router, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], keys["allow"], context=ctx,
                               identities=IdentityLimit(max_per_key=1))
    endpoint = bound_endpoint(router)
    first, second = _dealer(ctx, endpoint, keys, "alice"), _dealer(ctx, endpoint, keys, "alice")
    try:
        send(first, _hello())
        got = recv(router, ARRIVE_S)
        assert got is not None and got.identity == first.getsockopt(zmq.IDENTITY)
        with caplog.at_level(logging.WARNING, logger="protocol.identities"):
            send(second, _hello())
            assert recv(router, SILENCE_S) is None  # dropped inside recv, never handed to the owner
        assert "party 'alice' already uses 1 socket identities (the limit)" in caplog.text
        assert second.getsockopt(zmq.IDENTITY).decode() in caplog.text
        assert identity_limit(router).refusals == {load_public(keys["alice"][0]): 1}

        counter = SeqCounter(2)
        for _ in range(3):  # the first identity keeps working, also while the second keeps knocking
            send(second, counter.stamp(m.heartbeat()))
            send(first, counter.stamp(m.heartbeat()))
            got = recv(router, ARRIVE_S)
            assert got is not None and got.identity == first.getsockopt(zmq.IDENTITY)
            assert decode(got.frames).type is MessageType.HEARTBEAT
        send(router, SeqCounter().stamp(m.heartbeat()), got.identity)
        assert recv(first, ARRIVE_S) is not None

        identity_limit(router).release(first.getsockopt(zmq.IDENTITY))  # e.g. the first said BYE
        send(second, counter.stamp(m.heartbeat()))
        got = recv(router, ARRIVE_S)
        assert got is not None and got.identity == second.getsockopt(zmq.IDENTITY)
    finally:
        for sock in (first, second):
            sock.close(linger=0)
        close_router(router, auth)


def test_the_default_limit_admits_a_restarted_party_but_not_a_third_identity(keys, ctx, server):
    router, endpoint = server
    limit = identity_limit(router)
    assert limit is not None and limit.max_per_key == 2
    dealers = [_dealer(ctx, endpoint, keys, "alice") for _ in range(3)]
    try:
        for dealer in dealers[:2]:  # the old process and its restarted successor
            send(dealer, _hello())
            got = recv(router, ARRIVE_S)
            assert got is not None and got.identity == dealer.getsockopt(zmq.IDENTITY)
        send(dealers[2], _hello())
        assert recv(router, SILENCE_S) is None
        assert limit.live(load_public(keys["alice"][0])) == [d.getsockopt(zmq.IDENTITY) for d in dealers[:2]]
    finally:
        for dealer in dealers:
            dealer.close(linger=0)


# ------------------------------------------------------------------------------------ IdentityLimit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_identity_limit_bookkeeping():
    clock, seen = FakeClock(), []
    limit = IdentityLimit(2, idle_s=30, names={"alice": b"K" * 40}, clock=clock, on_refuse=seen.append)
    limit.admit(b"K" * 40, b"a1")
    clock.now += 10
    limit.admit(b"K" * 40, b"a2")
    limit.admit(b"other", b"o1")  # keys are counted separately
    clock.now += 25  # a1 silent for 35 s, a2 for 25 s
    limit.admit(b"K" * 40, b"a2")  # a known identity is always admitted (and refreshed)
    limit.admit(b"K" * 40, b"a3")  # takes the slot of a1, idle past 30 s
    assert limit.live(b"K" * 40) == [b"a2", b"a3"]
    with pytest.raises(IdentityRefused, match="party 'alice' already uses 2 socket identities") as refused:
        limit.admit(b"K" * 40, b"a1")  # a1 is back, but both slots are live now: refused, state untouched
    assert limit.live(b"K" * 40) == [b"a2", b"a3"] and limit.refusals == {b"K" * 40: 1}
    limit.report(refused.value)
    assert seen == [refused.value] and refused.value.identity == b"a1"
    limit.release(b"a2")
    limit.admit(b"K" * 40, b"a1")
    assert limit.live(b"K" * 40) == [b"a3", b"a1"] and limit.live(b"other") == [b"o1"]


def test_refusals_are_logged_rate_limited(caplog):
    limit = IdentityLimit(1)
    limit.admit(b"unknown12345xyz", b"x")
    with caplog.at_level(logging.WARNING, logger="protocol.identities"):
        for _ in range(2000):
            with pytest.raises(IdentityRefused, match=r"key unknown12345\.\.\. already uses 1") as refused:
                limit.admit(b"unknown12345xyz", b"y")
            limit.report(refused.value)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 + 2  # the first three, then the 1000th and the 2000th
    assert "(2000 so far)" in lines[-1] and limit.refusals[b"unknown12345xyz"] == 2000


@pytest.mark.parametrize(("kwargs", "why"), [({"max_per_key": 0}, ">= 1"), ({"idle_s": 0}, "positive")])
def test_identity_limit_settings_are_checked(kwargs, why):
    with pytest.raises(ConfigError, match=why):
        IdentityLimit(**kwargs)
