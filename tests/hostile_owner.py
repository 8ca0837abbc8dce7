"""A hostile owner, scripted: a real CurveZMQ ROUTER that speaks the protocol to real party processes, with
every message to every party its own to choose. It plays along where it must (serves the model, relays the
secure-aggregation stages through a real `SecAggServer`) and lies where an attack needs it: other settings
or state for some parties, a "new run" from an old state, identities of its own in a round, a lower
collusion bound, a party declared dropped, a round started again after its coins were seen.

The privacy tests (tests/test_owner_attacks.py) drive it against unmodified parties on their default flags;
each attack must end with the owner holding nothing it can unmask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from learning.round_binding import round_binding, state_digest
from learning.secure_update import secagg_config
from protocol import messages as m
from protocol.chunks import pack_dir
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.keys import load_allowlist
from protocol.messages import Message, MessageType
from protocol.replay import SeqCounter
from protocol.sockets import bind_router, bound_endpoint, close_router, peer_name, recv
from secure_agg import (
    ROUND,
    ConsistencyRequest,
    InputAck,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    SecAggParty,
    SecAggServer,
    Stage,
    message_from_wire,
)
from secure_agg.encoding import unpack

STAGE_S = 20.0  # how long the owner says it keeps a stage open


class CredulousServer(SecAggServer):
    """The owner's round state without the owner's own checks: it takes every masked input and every
    consistency signature, whatever view it was made under, and asks whoever it fed an input from to sign,
    however few they are (the parties' own checks are what is tested)."""

    def receive_masked_input(self, msg: MaskedInput) -> InputAck:
        self._expect(Stage.MASKED_INPUT, msg, msg.sender, self.sharers)
        np.add(self._sum, unpack(msg.masked, self.params.ring_bytes), out=self._sum)
        self._inputs.add(msg.sender)
        self._views[msg.sender] = msg.view_signature
        return InputAck(self.round_id, self.session, msg.sender, hashlib.sha256(msg.masked.data).digest())

    def receive_consistency(self, msg) -> None:
        self._expect(Stage.CONSISTENCY, msg, msg.sender, self._inputs)
        self._signatures[msg.sender] = msg.signature

    def close_inputs(self):
        self._closing(Stage.MASKED_INPUT, "close_inputs")
        self.alive = sorted(self._inputs)
        dropped = [u for u in self.sharers if u not in self._inputs]
        views = [self._views[u] for u in self.alive]
        self.stage = Stage.CONSISTENCY
        return {v: ConsistencyRequest(self.round_id, self.session, v, self.alive, dropped, views)
                for v in self.alive}

    def step(self, method, *args):
        """A stage's server step as `ROUND` names it, through this class's own version of it."""
        return getattr(self, method.__name__)(*args)


class HostileOwner:
    """The owner's socket and the parties' sessions, message by message."""

    def __init__(self, root: Path, owner_secret: Path, allow: Path, model_dir: Path) -> None:
        self.sock, self.auth = bind_router("tcp://127.0.0.1:*", owner_secret, allow)
        self.endpoint = bound_endpoint(self.sock)
        self.allowlist = load_allowlist(allow)
        self.archive = pack_dir(model_dir, root / "model.tar")
        self.identities: dict[str, bytes] = {}
        self.counters: dict[str, SeqCounter] = {}
        self.ready: set[str] = set()
        self.inbox: list[tuple[str, Message]] = []  # everything the parties sent, heartbeats aside
        self.welcome_for: Callable[[str], Message] | None = None

    def close(self) -> None:
        close_router(self.sock, self.auth)

    # ------------------------------------------------------------------------------ wire
    def send(self, name: str, msg: Message) -> None:
        self.counters.setdefault(name, SeqCounter()).stamp(msg)
        self.sock.send_multipart([self.identities[name], *encode(msg)])

    def pump(self, timeout: float = 0.2) -> tuple[str, Message] | None:
        """One party message: HELLO, CHUNK_REQUEST and READY are answered here (the join plays along)."""
        got = recv(self.sock, timeout)
        if got is None:
            return None
        try:
            name = peer_name(self.allowlist, got.peer_key, got.identity)
            msg = decode(got.frames, sender="party")
        except ProtocolError:
            return None
        self.identities[name] = got.identity
        if msg.type is MessageType.HEARTBEAT:
            return None
        self.inbox.append((name, msg))
        if msg.type is MessageType.HELLO:
            self.counters[name] = SeqCounter()
            self.ready.discard(name)
            if self.welcome_for is not None:
                self.send(name, self.welcome_for(name))
        elif msg.type is MessageType.CHUNK_REQUEST:
            self.send(name, m.chunk(msg["index"], self.archive.chunk(msg["index"])))
        elif msg.type is MessageType.READY:
            self.ready.add(name)
        return name, msg

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"the hostile owner timed out waiting for {what}")
            self.pump()

    def quiet(self, seconds: float) -> list[tuple[str, Message]]:
        """Everything the parties send within `seconds` (HELLO, chunks and READY still answered)."""
        start, end = len(self.inbox), time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump()
        return self.inbox[start:]

    # ------------------------------------------------------------------------------ joining
    def welcome(self, names: Iterable[str], run_id: str, settings_for: Callable[[str], dict], round: int = 0
                ) -> None:
        """WELCOME to each party (as to one that says HELLO from now on), each with its own settings; returns
        when all of them said READY."""
        names = list(names)

        def welcome_for(name: str) -> Message:
            return m.welcome(run_id=run_id, settings=settings_for(name), round=round,
                             **self.archive.info.welcome_fields())

        self.welcome_for = welcome_for
        for name in names:
            if name in self.identities:
                self.ready.discard(name)
                self.counters[name] = SeqCounter()  # a "restarted" owner counts from 1 again
                self.send(name, welcome_for(name))
        self.wait(lambda: set(names) <= self.ready, f"{names} to be ready")

    # ------------------------------------------------------------------------------ a secure round
    def binding(self, run_id: str, settings: dict, state: tuple[dict, dict], n: int,
                config: SecAggConfig | None = None) -> bytes:
        """What a party sent `settings` and `state` binds round `secure_round` starts to: for a sybil that
        plays along (its view must match the real parties')."""
        config = config or secagg_config([8] * n, 0)
        fields = {"config": config.to_dict(), "n_parties": n, "session": run_id, "stage_s": STAGE_S}
        return round_binding(settings, self.archive.info.model_sha256, state_digest(*state), fields)

    def secure_round(self, r: int, run_id: str, parts: dict[str, tuple[dict, dict]], *,
                     config: SecAggConfig | None = None, sybils: Iterable[SecAggParty] = (),
                     drop_inputs_of: Iterable[str] = (), refused_at: Stage | None = None,
                     refusal_s: float = 25.0, stage_timeout: float = 240.0) -> dict:
        """Start round r for the parties in `parts` (name -> (adapter, emulator) sent to it), with in-process
        `sybils` of the owner's own taking the next ids, and relay every stage through a `CredulousServer`.
        `drop_inputs_of`: real parties declared dropped although their masked input came. `refused_at`: the
        stage the parties are expected to refuse, waited for `refusal_s` only (every other stage up to
        `stage_timeout`, so a loaded machine cannot fake a refusal). Returns what happened:
        {"stages": the stages every real party completed, "received": [(stage, [party ids that sent it])],
        "result": the unmasked sum or None, "error": why the owner got no further}."""
        names, sybils = sorted(parts), list(sybils)
        n = len(names) + len(sybils)
        ids = {name: i for i, name in enumerate(names)}
        config = config or secagg_config([8] * n, 0)
        fields = {"config": config.to_dict(), "n_parties": n, "session": run_id, "stage_s": STAGE_S}
        for name in names:
            adapter, emulator = parts[name]
            self.send(name, m.round_start(round=r, deadline_s=stage_timeout, adapter=adapter, emulator=emulator,
                                          secagg={**fields, "party_id": ids[name]}))
        length = int(sum(np.asarray(v).size for v in parts[names[0]][0].values()))
        server = CredulousServer(config, n, length, r, run_id)
        for sybil in sybils:
            sybil.contribute(np.zeros(length), 1)
        inbox: dict[int, object] = {}
        outcome: dict = {"stages": [], "result": None, "error": None, "received": []}
        dropped = {ids[name] for name in drop_inputs_of}
        try:
            for stage in ROUND:
                expected = {u for u in inbox if u < len(names)} if stage.party_receives else set(range(len(names)))
                for u, msg in inbox.items():  # relay the stage's input to the real parties
                    if u < len(names):
                        self.relay(names[u], r, msg)
                for sybil in sybils:
                    if stage.party_receives is None or sybil.party_id in inbox:
                        sent = stage.take_step(sybil, inbox.get(sybil.party_id))
                        answer = server.step(stage.server_receive, sent)
                        if stage.answer is not None:
                            stage.party_takes_answer(sybil, answer)
                got = self.collect(r, stage, expected, ids, refusal_s if stage.name is refused_at else stage_timeout)
                outcome["received"].append((stage.name, sorted(got)))
                for u in sorted(got):
                    if stage.name is Stage.MASKED_INPUT and u in dropped:
                        continue  # its input came; the owner says it did not
                    answer = server.step(stage.server_receive, got[u])
                    if answer is not None:
                        self.relay(names[u], r, answer)
                if got.keys() == expected:
                    outcome["stages"].append(stage.name)
                closed = server.step(stage.server_close)
                inbox = closed if isinstance(closed, dict) else {}
                if not isinstance(closed, dict):
                    outcome["result"] = closed
        except (SecAggError, AssertionError) as exc:
            outcome["error"] = str(exc)
        for name in names:  # the round is over, whatever happened
            self.send(name, m.round_end(round=r, summary={}))
        return outcome

    def relay(self, name: str, r: int, obj) -> None:
        header, arrays = obj.to_wire()
        self.send(name, m.secagg(round=r, stage=header["type"], data=header, arrays=arrays))

    def collect(self, r: int, stage, expected: set[int], ids: dict[str, int], timeout: float) -> dict:
        """The stage's message from each expected party, until all came or `timeout` passed."""
        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while set(got) != expected and time.monotonic() < deadline:
            item = self.pump()
            if item is None:
                continue
            name, msg = item
            if msg.type is MessageType.SECAGG and msg["round"] == r and name in ids:
                obj = message_from_wire(msg["data"], dict(msg.tensors))
                if isinstance(obj, stage.party_sends):
                    got[ids[name]] = obj
        return got


def secure_messages(items: list[tuple[str, Message]]) -> list[tuple[str, str]]:
    """(party, stage) of every secure-aggregation or statistics message among `items`."""
    return [(name, msg["stage"] if msg.type is MessageType.SECAGG else msg.type.value) for name, msg in items
            if msg.type in (MessageType.SECAGG, MessageType.ROUND_STATS, MessageType.UPDATE)]


def with_collusion(config: SecAggConfig, collusion: int) -> SecAggConfig:
    return dataclasses.replace(config, collusion=collusion)
