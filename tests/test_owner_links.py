"""The owner's links survive a party that leaves at any moment: after its BYE nothing the owner sends to it
raises, a stage waiting for it ends at once, and its identity slot is free again. Real CurveZMQ sockets on
127.0.0.1; the party is a plain DEALER speaking the protocol."""

from __future__ import annotations

import io
import shutil
import time

import pytest
import zmq

from owner.links import OwnerLinks
from owner.metrics import MetricsLog
from protocol import messages as m
from protocol.chunks import pack_dir
from protocol.codec import decode, encode
from protocol.keys import generate_keypair, load_allowlist
from protocol.messages import MessageType
from protocol.replay import SeqCounter
from protocol.sockets import bind_router, bound_endpoint, close_router, connect_dealer, identity_limit


@pytest.fixture()
def owner(tmp_path):
    keys = {"owner": generate_keypair(tmp_path / "owner", "owner"),
            "alice": generate_keypair(tmp_path / "alice", "alice")}
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(keys["alice"][0], allow / "alice.key")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"x" * 1000)
    archive = pack_dir(tmp_path / "model", tmp_path / "model.tar")
    ctx = zmq.Context()
    sock, auth = bind_router("tcp://127.0.0.1:*", keys["owner"][1], allow, context=ctx)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    lines = io.StringIO()
    links = OwnerLinks(sock, load_allowlist(allow), archive, MetricsLog(None, stream=lines), run_id="run-1",
                       party_timeout=30.0, monitor=monitor,
                       welcome=lambda: m.welcome(run_id="run-1", settings={}, round=0,
                                                 **archive.info.welcome_fields()))
    party = connect_dealer(bound_endpoint(sock), keys["alice"][1], keys["owner"][0], name="alice", context=ctx)
    yield links, party, lines
    party.close(linger=0)
    sock.disable_monitor()
    monitor.close(linger=0)
    close_router(sock, auth)
    ctx.destroy(linger=0)


def say(party, counter: SeqCounter, msg) -> None:
    counter.stamp(msg)
    party.send_multipart(encode(msg))


def pump_until(links: OwnerLinks, check, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "the owner did not get there in time"
        links.pump(0.1)


@pytest.mark.parametrize("stage", ["hello", "ready", "mid-stage"])
def test_a_party_that_says_bye_at_any_point_is_simply_gone(owner, stage):
    links, party, lines = owner
    counter = SeqCounter()
    say(party, counter, m.hello(name="alice", n_examples=4))
    pump_until(links, lambda: "alice" in links.links)
    assert decode(party.recv_multipart(), sender="owner").type is MessageType.WELCOME
    if stage != "hello":
        say(party, counter, m.ready(links.archive.info.model_sha256, "run-1"))
        pump_until(links, lambda: links.links["alice"].ready)
    identity = links.links["alice"].identity
    say(party, counter, m.bye("party interrupted"))
    if stage == "mid-stage":  # the owner is waiting for this party's message of a round stage when it leaves
        start = time.monotonic()
        done = links.collect({"alice"}, lambda name, msg: True, time.monotonic() + 20, "round 1 key shares")
        assert done == set() and time.monotonic() - start < 10
    else:
        pump_until(links, lambda: "alice" not in links.links)
    assert "alice" not in links.links and "alice left: party interrupted" in lines.getvalue()
    assert links.send_to("alice", m.heartbeat()) is False  # no KeyError: a relay to a gone party is a no-op
    assert links.ready_parties() == []
    assert identity not in identity_limit(links.sock).live(links.allowlist["alice"])  # its slot is free
