"""The `owner --listen` node: serves parties over CurveZMQ and drives the same `OwnerSession` as the
in-process run.

One thread, one ROUTER socket. Every inbound message is decoded, authenticated (the Curve key the ZAP
handler stamped on it must be on the allowlist and match the socket identity), replay- and round-checked,
then handled; anything wrong is answered with REJECT and logged, and the owner's state is untouched.
Parties that stop sending heartbeats, or miss a deadline, are left out of the round; the round completes
with the others (FedAvg renormalises over who answered) unless fewer than `--min-parties` remain.

Advisory replies (REJECT, HEARTBEAT) never wait on a party's full queue, so a party that floods the owner
with junk and reads nothing cannot stall it. Connections refused by ZAP (unknown keys) are logged and
counted from the socket monitor; they never reach the message loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from errors import ConfigError, FedbiotError
from learning.lora import apply_delta, unflatten_state
from learning.secure_update import secagg_config
from owner.aggregation import fedavg
from owner.config import RunConfig
from owner.metrics import MetricsLog, megabytes
from owner.models import decoder_layers
from owner.session import OwnerSession
from owner.simulate import prepare_out_dir, run_dir_setup
from party.client import RUN_FINISHED
from protocol import messages as m
from protocol.chunks import ChunkSource, pack_dir
from protocol.codec import DEFAULT_LIMITS, decode, encode
from protocol.errors import ProtocolError, TransportError
from protocol.keys import load_allowlist
from protocol.liveness import Liveness
from protocol.messages import Message, MessageType
from protocol.replay import ReplayGuard, SeqCounter
from protocol.sockets import bind_router, close_router, peer_name, recv
from secure_agg import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedInput,
    SecAggError,
    SecAggServer,
    ShareKeys,
    UnmaskShares,
    message_from_wire,
)

HEARTBEAT_S = 2.0
# A DP party's accounting numbers the owner keeps for summary.json (learning.dp.DPPartyTrainer.privacy_report).
PRIVACY_REPORT = ("epsilon", "delta", "noise_multiplier", "sample_rate", "max_grad_norm", "accountant",
                  "dp_steps_total")
LOUD_REJECTS = 20  # per party, rejections printed one by one; after that every 1000th (all are in metrics)


@dataclass
class PartyLink:
    """What the owner knows about one connected party."""

    name: str
    identity: bytes
    guard: ReplayGuard = field(default_factory=ReplayGuard)
    out: SeqCounter = field(default_factory=SeqCounter)
    n_examples: int = 0
    ready: bool = False
    session_started: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0


class RoundAborted(FedbiotError):
    """Too few parties remain for a round; the last checkpoint stands and `--resume` continues."""


def party_config(config: RunConfig, run_id: str) -> dict:
    """What a party needs to train exactly as the owner's run expects (sent in WELCOME)."""
    return json.loads(json.dumps({
        "run_id": run_id, "seed": config.seed, "rounds": config.rounds, "max_length": config.max_length,
        "template": config.template, "lora": config.lora.to_dict(), "train": config.train.to_dict(),
        "secure_agg": config.secure_agg,
    }))


class OwnerServer:
    """The owner's event loop: admission, model shipping, rounds, heartbeats."""

    def __init__(self, session: OwnerSession, config: RunConfig, sock, allowlist: dict[str, bytes],
                 archive: ChunkSource, log: MetricsLog, *, min_parties: int, join_timeout: float,
                 round_timeout: float, party_timeout: float, run_id: str, monitor=None) -> None:
        self.session, self.config, self.sock, self.allowlist = session, config, sock, allowlist
        self.archive, self.log = archive, log
        self.min_parties, self.join_timeout = min_parties, join_timeout
        self.round_timeout, self.party_timeout = round_timeout, party_timeout
        self.run_id = run_id
        self.links: dict[str, PartyLink] = {}
        self.counters: dict[str, SeqCounter] = {}  # owner -> party seq survives a party's re-HELLO
        self.liveness = Liveness(party_timeout)
        self.restarted: set[str] = set()
        self.next_heartbeat = time.monotonic() + HEARTBEAT_S
        adapter, emulator = session.payload()
        self.adapter_spec = {n: (tuple(t.shape), "F32") for n, t in adapter.items()}
        self.payload_spec = {**self.adapter_spec, **{n: (tuple(t.shape), "F32") for n, t in emulator.items()}}
        self.rejected = 0
        self.rejected_by: dict[str, int] = {}
        self.refused_connections = 0
        self.round_ids: dict[str, int] = {}  # secure-aggregation party id of each party invited this round
        self.monitor = monitor if monitor is not None else refusal_monitor(sock)
        self.privacy: dict[str, dict] = {}  # each DP party's latest privacy report (summary.json "dp")

    # ------------------------------------------------------------------------------ sending
    def send_to(self, name: str, msg: Message, *, wait: bool = True) -> bool:
        """Send to a party with a session. wait=False: drop the message if the party's queue is full."""
        link = self.links[name]
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

    def watch_refusals(self) -> None:
        """Log connections ZAP refused (a key not on the allowlist); they never deliver a message."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            self.refused_connections += 1
            self.log.say(f"refused a connection on {event['endpoint'].decode(errors='replace')}: its key is not "
                         f"on the allowlist (ZAP status {int(event['value'])})")
            self.log.record("refused_connection", status=int(event["value"]))

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
            msg = decode(got.frames, sender="party", expect={MessageType.UPDATE: self.update_spec()})
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

    def update_spec(self) -> dict:
        return {} if self.config.secure_agg else self.adapter_spec

    def on_hello(self, name: str, identity: bytes, msg: Message) -> None:
        if msg["name"] != name:
            raise ProtocolError(f"HELLO names {msg['name']!r}, but the key and socket identity are {name!r}")
        if msg["n_examples"] < 1:
            raise ProtocolError("a party needs at least one training example")
        if name in self.links and self.links[name].ready:
            self.restarted.add(name)
        link = PartyLink(name, identity, n_examples=msg["n_examples"], session_started=time.monotonic(),
                         out=self.counters.setdefault(name, SeqCounter()))
        link.guard.commit(msg)
        self.links[name] = link
        self.liveness.seen(name)
        info = self.archive.info
        self.send_to(name, m.welcome(run_id=self.run_id, config=party_config(self.config, self.run_id),
                                     round=self.session.round, **info.welcome_fields()))
        self.log.say(f"{name} joined ({msg['n_examples']} examples"
                     f"{', has the model' if msg['model_sha256'] == info.model_sha256 else ''})")
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
            self.links[name].ready = True
            self.log.say(f"{name} is ready")
            return None
        if msg.type is MessageType.HEARTBEAT:
            return None
        if msg.type is MessageType.BYE:
            self.log.say(f"{name} left: {msg['reason'] or 'no reason given'}")
            self.links.pop(name, None)
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

    # ------------------------------------------------------------------------------ admission
    def ready_parties(self) -> list[str]:
        return sorted(n for n, link in self.links.items() if link.ready and self.liveness.alive(n))

    def wait_for_parties(self, first: bool) -> list[str]:
        """Block until enough parties are ready: all expected (or, after the join timeout, the minimum)."""
        self.drain()
        deadline = time.monotonic() + self.join_timeout
        announced = -1
        while True:
            ready = self.ready_parties()
            if len(ready) >= self.config.parties or (not first and len(ready) >= self.min_parties):
                return ready
            if time.monotonic() > deadline:
                if len(ready) >= self.min_parties:
                    return ready
                raise RoundAborted(
                    f"only {len(ready)} of the {self.min_parties} parties needed are ready after "
                    f"{self.join_timeout:.0f} s; {self.session.round} rounds are checkpointed, restart with --resume")
            if len(ready) != announced:
                announced = len(ready)
                self.log.say(f"waiting for parties: {announced} of {self.config.parties} ready")
            self.pump(0.5)

    # ------------------------------------------------------------------------------ rounds
    def collect(self, pending: Iterable[str], accept: Callable[[str, Message], bool], deadline: float,
                what: str) -> set[str]:
        """Pump until every pending party delivered (accept returned True), went silent, restarted, or the
        deadline passed. Returns who delivered; messages accept refuses are REJECTed."""
        pending, done = set(pending), set()
        self.liveness_grace(pending)
        while pending and time.monotonic() < deadline:
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
                    self.log.say(f"{name} is gone (silent or restarted): left out of {what}")
                    pending.discard(name)
        for name in sorted(pending):
            self.log.say(f"{name} missed the deadline for {what}: left out")
        return done

    def start_round(self, r: int, participants: list[str]) -> list[str]:
        adapter, emulator = self.session.payload()
        tensors = {**adapter, **emulator}
        ids = {name: i for i, name in enumerate(participants)}
        started = []
        secagg = {}
        if self.config.secure_agg:
            cfg = secagg_config([self.links[p].n_examples for p in participants], self.config.seed,
                                self.config.secagg_graph)
            secagg = {"config": cfg.to_dict(), "n_parties": len(participants), "session": self.run_id}
        self.round_ids = ids
        for name in participants:
            self.links[name].guard.open_round(r)
            fields = {**secagg, "party_id": ids[name]} if secagg else {}
            msg = m.round_start(round=r, deadline_s=self.round_timeout, tensors=tensors, secagg=fields)
            if self.send_to(name, msg):
                started.append(name)
        self.restarted -= set(started)
        return started

    def end_round(self, r: int, names: Iterable[str], summary: dict) -> None:
        """ROUND_END to the parties still in the session that round r was started in (not to one that
        restarted meanwhile: its new session never saw the round)."""
        for name in names:
            link = self.links.get(name)
            if link is not None and link.guard.round == r:
                link.guard.close_round()
                self.send_to(name, m.round_end(round=r, summary=summary))

    def plain_round(self, r: int, started: list[str], deadline: float) -> tuple[dict, dict]:
        updates: dict[str, Message] = {}

        def accept(name: str, msg: Message) -> bool:
            if msg.type is not MessageType.UPDATE:
                raise ProtocolError(f"expected an update, got {msg.type.value}")
            if not msg.tensors:
                raise ProtocolError("update carries no adapter tensors")
            # The weight is what the party trained on (examples longer than max_length are dropped after
            # HELLO), as in the in-process run; never more than it announced.
            if not 1 <= msg["n_examples"] <= self.links[name].n_examples:
                raise ProtocolError(f"update claims {msg['n_examples']} examples; the party announced "
                                    f"{self.links[name].n_examples}")
            updates[name] = msg
            return True

        done = self.collect(started, accept, deadline, f"round {r + 1} updates")
        self.require(done, r)
        names = sorted(done)
        states = [{k: torch.from_numpy(np.array(v)) for k, v in updates[n].tensors.items()} for n in names]
        weights = [updates[n]["n_examples"] for n in names]
        return fedavg(states, weights), {n: updates[n]["stats"] for n in names}

    def require(self, done: set[str], r: int) -> None:
        if len(done) < self.min_parties:
            raise RoundAborted(f"round {r + 1}: only {len(done)} parties answered, fewer than the minimum "
                               f"{self.min_parties}; {self.session.round} rounds are checkpointed, restart with "
                               "--resume")

    def secure_round(self, r: int, started: list[str], deadline: float) -> tuple[dict, dict]:
        """Masked aggregation: the owner relays keys and shares and learns only the weighted sum."""
        sent, _ = self.session.payload()
        names = sorted(sent)
        # Ids, party count and config exactly as announced in ROUND_START to every invited party; one whose
        # ROUND_START could not be sent simply never advertises and is left out like any early dropout.
        ids = dict(self.round_ids)
        invited = sorted(ids, key=ids.get)
        cfg = secagg_config([self.links[p].n_examples for p in invited], self.config.seed, self.config.secagg_graph)
        vector_length = sum(sent[n].numel() for n in names)
        server = SecAggServer(cfg, len(invited), vector_length, r, self.run_id)
        stats: dict[str, dict] = {}

        def stage(kind: type, handle: Callable) -> Callable[[str, Message], bool]:
            def accept(name: str, msg: Message) -> bool:
                if msg.type is MessageType.UPDATE:  # statistics only; the update itself is masked
                    stats[name] = msg["stats"]
                    return False
                if msg.type is not MessageType.SECAGG:
                    raise ProtocolError(f"expected a secure-aggregation message, got {msg.type.value}")
                obj = message_from_wire(msg["data"], dict(msg.tensors))
                if not isinstance(obj, kind):
                    raise ProtocolError(f"expected {kind.TYPE}, got {type(obj).TYPE}")
                if obj.sender != ids[name]:
                    raise ProtocolError(f"{name} is party {ids[name]} but claims to be {obj.sender}")
                handle(name, obj)
                return True
            return accept

        def reply(name: str, obj) -> None:
            header, arrays = obj.to_wire()
            self.send_to(name, m.secagg(round=r, stage=header["type"], data=header, arrays=arrays))

        names_by_id = {i: n for n, i in ids.items()}
        alive = self.collect(started, stage(AdvertiseKeys, lambda n, o: server.receive_advertise(o)), deadline,
                             f"round {r + 1} training and keys")
        self.require(alive, r)
        for pid, roster in server.close_advertise().items():
            reply(names_by_id[pid], roster)
        stage_deadline = time.monotonic() + self.party_timeout * 2
        alive = self.collect(alive, stage(ShareKeys, lambda n, o: server.receive_shares(o)), stage_deadline,
                             f"round {r + 1} key shares")
        for pid, relayed in server.close_shares().items():
            reply(names_by_id[pid], relayed)
        stage_deadline = time.monotonic() + self.party_timeout * 2
        alive = self.collect(alive, stage(MaskedInput, lambda n, o: reply(n, server.receive_masked_input(o))),
                             stage_deadline, f"round {r + 1} masked inputs")
        self.require(alive, r)
        for pid, check in server.close_inputs().items():
            reply(names_by_id[pid], check)
        stage_deadline = time.monotonic() + self.party_timeout * 2
        self.collect(alive, stage(ConsistencySignature, lambda n, o: server.receive_consistency(o)),
                     stage_deadline, f"round {r + 1} consistency check")
        signers: set[str] = set()  # only they are asked to unmask
        for pid, request in server.close_consistency().items():
            signers.add(names_by_id[pid])
            reply(names_by_id[pid], request)
        stage_deadline = time.monotonic() + self.party_timeout * 2
        self.collect(signers, stage(UnmaskShares, lambda n, o: server.receive_unmask(o)), stage_deadline,
                     f"round {r + 1} unmasking")
        result = server.finish()
        mean = unflatten_state(result.weighted_sum / result.total_weight, sent, names)
        included = sorted(names_by_id[i] for i in result.included)
        return apply_delta(sent, mean), {n: stats.get(n, {}) for n in included}

    def run_round(self, participants: list[str]) -> None:
        r = self.session.round
        start = time.perf_counter()
        before = {n: (link.bytes_down, link.bytes_up) for n, link in self.links.items()}
        self.log.say(f"round {r + 1}/{self.config.rounds}: {len(participants)} parties ({', '.join(participants)})")
        started = self.start_round(r, participants)
        deadline = time.monotonic() + self.round_timeout
        try:
            if self.config.secure_agg:
                new_adapter, stats = self.secure_round(r, started, deadline)
            else:
                new_adapter, stats = self.plain_round(r, started, deadline)
        except SecAggError as exc:
            self.end_round(r, started, {"aborted": str(exc)})
            raise RoundAborted(f"round {r + 1} aborted by secure aggregation: {exc}; {r} rounds are "
                               "checkpointed, restart with --resume") from None
        except RoundAborted:
            self.end_round(r, started, {"aborted": True})
            raise
        stats = {name: self.party_stats(name, raw) for name, raw in stats.items()}
        down = sum(link.bytes_down - before.get(n, (0, 0))[0] for n, link in self.links.items())
        up = sum(link.bytes_up - before.get(n, (0, 0))[1] for n, link in self.links.items())
        weight = {n: link.n_examples for n, link in self.links.items()}
        losses = [(s["loss_mean"], weight.get(n, 1)) for n, s in stats.items() if "loss_mean" in s]
        record = {
            "participants": sorted(stats), "parties": stats,
            "train_loss": sum(lo * w for lo, w in losses) / sum(w for _, w in losses) if losses else None,
            "mb_down": megabytes(down), "mb_up": megabytes(up), "seconds": time.perf_counter() - start,
            "secure_agg": self.config.secure_agg,
        }
        privacy = {n: {k: s[k] for k in ("epsilon", "delta")} for n, s in stats.items() if "epsilon" in s}
        if privacy:
            record["dp"] = privacy
            self.privacy.update({n: {k: v for k, v in s.items() if k in PRIVACY_REPORT} for n, s in stats.items()
                                 if "epsilon" in s})
        self.session.complete_round(new_adapter, record)
        self.end_round(r, started, {"participants": sorted(stats)})
        loss = f"train loss {record['train_loss']:.4f}, " if record["train_loss"] is not None else ""
        self.log.say(f"round {r + 1}/{self.config.rounds} done with {len(stats)} parties: {loss}"
                     f"down {record['mb_down']:.2f} MB, up {record['mb_up']:.2f} MB, {record['seconds']:.1f} s")
        if privacy:
            self.log.say("privacy spent: " + ", ".join(f"{n} epsilon {v['epsilon']:.3f} (delta {v['delta']:.2g})"
                                                      for n, v in sorted(privacy.items())))

    def party_stats(self, name: str, raw: object) -> dict:
        clean, dropped = clean_stats(raw)
        if dropped:
            self.log.say(f"{name}: ignored malformed statistics: {', '.join(dropped)}")
        return clean

    def run(self) -> dict:
        first = True
        while not self.session.done:
            participants = self.wait_for_parties(first)
            first = False
            self.run_round(participants)
        summary = self.session.finish({
            "mb_down_total": sum(h.get("mb_down", 0.0) for h in self.session.history),
            "mb_up_total": sum(h.get("mb_up", 0.0) for h in self.session.history),
            "secure_agg": self.config.secure_agg, "rejected_messages": self.rejected,
            "refused_connections": self.refused_connections,
            "party_examples": sum(link.n_examples for link in self.links.values()),
            **({"dp": dict(sorted(self.privacy.items()))} if self.privacy else {}),
        })
        return summary


    def goodbye(self, reason: str) -> None:
        """BYE to every party; one whose queue is full (not reading) is not waited for."""
        for name in list(self.links):
            self.send_to(name, m.bye(reason), wait=False)


def clean_stats(raw: object) -> tuple[dict, list[str]]:
    """What a party reported about its round, kept only where it is what it claims to be (a party's numbers
    go into metrics and the weighted train loss, so a malformed one must not reach them), and the names of
    what was dropped."""
    if not isinstance(raw, dict):
        return {}, [type(raw).__name__]
    clean, dropped = {}, []
    for key, value in raw.items():
        if key == "accountant_history" and _number_rows(value):
            clean[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            clean[key] = value
        elif isinstance(value, str) and len(value) <= 64:
            clean[key] = value
        else:
            dropped.append(str(key)[:32])
    if "epsilon" in clean and "delta" not in clean:
        dropped.append("epsilon (no delta)")
        clean.pop("epsilon")
    return clean, dropped


def inbound_limit(model: torch.nn.Module, config: RunConfig) -> int:
    """The largest frame a party may send: its adapter update, as float32 (plain) or in a ring of at most 64
    bits (masked), with room to spare. ZeroMQ drops a connection whose frame is bigger before buffering it,
    so an allowlisted party cannot make the owner hold hundreds of MB per message."""
    layers = decoder_layers(model)
    bottom, top = config.adapter_layout(len(layers))
    adapter = [*layers[:bottom], *layers[len(layers) - top:]]
    numel = sum(config.lora.r * (mod.in_features + mod.out_features)
                for layer in adapter for mod in layer.modules() if isinstance(mod, torch.nn.Linear))
    return min(8 * numel + (1 << 20), DEFAULT_LIMITS.max_frame_bytes)


def _number_rows(value: object) -> bool:
    """A list (at most 10,000) of short lists of finite numbers: the shape of an accountant history."""
    return isinstance(value, list) and len(value) <= 10_000 and all(
        isinstance(row, list) and len(row) <= 8 and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in row)
        for row in value)


def refusal_monitor(sock: zmq.Socket) -> zmq.Socket:
    """A monitor of `sock` that reports only ZAP refusals (see `OwnerServer.watch_refusals`)."""
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def run_id_for(out_dir: Path, seed: int) -> str:
    return "run-" + hashlib.sha256(f"{Path(out_dir).resolve()}|{seed}".encode()).hexdigest()[:16]


def serve(config: RunConfig, args: argparse.Namespace, log: MetricsLog) -> dict:
    """`owner --listen`: validate inputs, bind, prepare the session, serve rounds, export."""
    out_dir = Path(args.out)
    if args.resume and (out_dir / "config.json").is_file():
        saved = RunConfig.load(out_dir / "config.json")
        saved.rounds = config.rounds
        config = saved
    min_parties = args.min_parties or config.parties
    if not 1 <= min_parties <= config.parties:
        raise ConfigError(f"--min-parties must be between 1 and --parties ({config.parties})")
    if config.secure_agg and min_parties < 2:
        raise ConfigError("secure aggregation needs at least 2 parties per round (--min-parties >= 2), "
                          "or pass --no-secure-agg")
    for flag, value in (("--join-timeout", args.join_timeout), ("--round-timeout", args.round_timeout),
                        ("--party-timeout", args.party_timeout)):
        if not value > 0:
            raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")
    allowlist = load_allowlist(args.allow)
    base, owner_data = OwnerSession.load_inputs(config, log)
    limit = inbound_limit(base.model, config)
    prepare_out_dir(out_dir, args.resume)
    # Bind before writing into --out: a busy port must not leave a half-started run behind.
    sock, auth = bind_router(args.listen, args.key, args.allow, max_msg_size=limit)
    monitor = refusal_monitor(sock)  # from the start: parties may knock while the owner pre-aligns
    server = None
    try:
        with run_dir_setup(out_dir, args.resume):
            config.save(out_dir / "config.json")
            log.path = out_dir / "metrics.jsonl"
            log.say(f"listening on {args.listen} for {config.parties} parties ({len(allowlist)} keys allowed)")
            session = OwnerSession.create(config, out_dir, log, base, owner_data, resume=args.resume)
            archive = pack_dir(session.compressed_dir, out_dir / "compressed.tar")
            log.say(f"compressed model archive: {megabytes(archive.info.model_size):.1f} MB in "
                    f"{archive.info.n_chunks} chunks")
            server = OwnerServer(session, config, sock, allowlist, archive, log, min_parties=min_parties,
                                 join_timeout=args.join_timeout, round_timeout=args.round_timeout,
                                 party_timeout=args.party_timeout, run_id=run_id_for(out_dir, config.seed),
                                 monitor=monitor)
        summary = server.run()
        server.goodbye(RUN_FINISHED)
        return summary
    except BaseException as exc:
        if server is not None:
            server.goodbye(f"owner stopped: {exc or type(exc).__name__}"[:200])
        raise
    finally:
        if server is not None:
            time.sleep(0.2)  # let the BYEs leave before the socket closes
        sock.disable_monitor()
        monitor.close(linger=0)
        close_router(sock, auth)
