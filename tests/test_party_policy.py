"""A networked party's own privacy policy, attacked by the owner it protects from. A party that is told to
send an unmasked update, to re-run a round it already masked, or to join a round weaker than its floors
refuses before training and sends nothing; the owner's socket (a real CurveZMQ ROUTER on 127.0.0.1) is
watched to prove it. Positive controls show the same party does send when the round is acceptable."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
import zmq

from learning.lora import LoraSettings, lora_state
from learning.party_model import PartyModel
from learning.run_settings import PartyRunSettings
from learning.secure_update import secagg_config
from learning.training import TrainSettings
from owner.compress import compress, save_compressed
from party.link import OwnerGone
from party.session import PartyNode, PartyOptions
from protocol import messages as m
from protocol.codec import decode, encode
from protocol.keys import generate_keypair
from protocol.messages import MessageType
from protocol.replay import SeqCounter
from protocol.sockets import bind_router, bound_endpoint, close_router, recv
from secure_agg import SecAggError
from secure_agg.identity import ConsortiumRoster, Identity, generate_identity
from tests.tiny_models import byte_tokenizer, tiny_model

RUN = "run-policy-test"
LORA = LoraSettings(r=4, alpha=8)
TRAIN = TrainSettings(local_steps=2, batch_size=2, lr=1e-2)
SILENCE_S = 1.5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    keys = {"owner": generate_keypair(root / "owner", "owner"), "alice": generate_keypair(root / "alice", "alice")}
    generate_identity(root / "alice", "alice")
    allow = root / "allow"
    allow.mkdir()
    shutil.copy(keys["alice"][0], allow / "alice.key")
    model, manifest = compress(tiny_model("llama", 8), 2, 0.5, "tiny")
    save_compressed(model, byte_tokenizer(), manifest, root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?",
                                        "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}) + "\n"
                            for i in range(8)))
    roster = ConsortiumRoster.from_public_files([root / "alice"])
    identity = Identity.load(root / "alice" / "alice.id_secret")
    return {"root": root, "keys": keys, "allow": allow, "data": data, "roster": roster, "identity": identity}


@pytest.fixture()
def owner_socket(world):
    ctx = zmq.Context()
    router, auth = bind_router("tcp://127.0.0.1:*", world["keys"]["owner"][1], world["allow"], context=ctx)
    yield router, bound_endpoint(router)
    close_router(router, auth)
    ctx.destroy(linger=0)


def make_party(world, endpoint: str, tmp_path, **options) -> tuple[PartyNode, list[str]]:
    lines: list[str] = []
    opts = PartyOptions(endpoint=endpoint, key=world["keys"]["alice"][1], owner_key=world["keys"]["owner"][0],
                        data=str(world["data"]), work_dir=tmp_path / "work", timeout=5.0,
                        **{"roster": world["roster"], "identity": world["identity"],
                           "privacy_dir": tmp_path / "privacy", **options})
    node = PartyNode(opts, log=lines.append)
    node.rounds.join(PartyRunSettings(run_id=RUN, seed=0, rounds=3, max_length=64, template="plain", lora=LORA,
                                      train=TRAIN, secure_agg=True))
    party = PartyModel.load(world["root"] / "model", LORA, 0)
    node.rounds.trainer = party.trainer("alice", party.tokenize(node.examples, 64, "plain"), LORA, TRAIN, 0)
    node.manifest, node.link.welcomed = party.manifest, True
    node.party = party
    return node, lines


def round_start(node: PartyNode, secagg: dict | None = None, r: int = 0, moved: float = 0.0):
    """ROUND_START with the model's LoRA as the global state (`moved` added to the adapter's: another state)."""
    adapter = {k: v.numpy() + moved for k, v in lora_state(node.party.model, node.manifest.adapter_layers).items()}
    emulator = {k: v.numpy() for k, v in lora_state(node.party.model, node.manifest.emulator_layers).items()}
    return m.round_start(round=r, deadline_s=5, adapter=adapter, emulator=emulator, secagg=secagg or {})


def secure_fields(n: int = 3, **config) -> dict:
    cfg = dataclasses.replace(secagg_config([8] * n, 0), **config)
    return {"config": cfg.to_dict(), "n_parties": n, "session": RUN, "party_id": 0, "stage_s": 2.0}


def received(sock, seconds: float = SILENCE_S) -> list[MessageType]:
    """Every message type the owner's socket gets within `seconds`, liveness (HEARTBEAT) aside."""
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        item = recv(sock, 0.1)
        if item is not None:
            kind = decode(item.frames, sender="party").type
            if kind is not MessageType.HEARTBEAT:
                got.append(kind)
    return got


def run_until(node: PartyNode, msg, sock, want: MessageType, limit_s: float = 120.0) -> list[MessageType]:
    """Run the round in a thread while this test owner heartbeats the party (it is alive, only slow), until
    the party sends `want` or `limit_s` passes; returns the message types the owner got."""
    import threading  # noqa: PLC0415

    worker = threading.Thread(target=run, args=(node, msg), daemon=True)
    worker.start()
    got, counter, identity = [], SeqCounter(), None
    end = time.monotonic() + limit_s
    while time.monotonic() < end and want not in got:
        item = recv(sock, 0.3)
        if item is not None:
            identity = item.identity
            got.append(decode(item.frames, sender="party").type)
        if identity is not None and want not in got:
            beat = m.heartbeat()
            counter.stamp(beat)
            sock.send_multipart([identity, *encode(beat)])
    worker.join(30)
    return got


def run(node: PartyNode, msg) -> None:
    node.link.last_heard = time.monotonic()  # the owner "just spoke": the round starts now
    try:
        node.rounds.run_round(msg)
    except (SecAggError, OwnerGone):
        pass  # a positive control waits for the owner's answer, which this test owner never gives
    finally:
        time.sleep(0.2)


def test_a_plain_round_is_refused_and_no_update_leaves(world, owner_socket, tmp_path):
    sock, endpoint = owner_socket
    node, lines = make_party(world, endpoint, tmp_path)
    try:
        run(node, round_start(node))
        assert any("refused round 1" in line and "unmasked" in line for line in lines), lines
        assert not any("training" in line for line in lines)
        assert MessageType.UPDATE not in received(sock)
    finally:
        node.close(0)


def test_with_allow_plain_the_same_round_sends_its_update(world, owner_socket, tmp_path):
    sock, endpoint = owner_socket
    node, lines = make_party(world, endpoint, tmp_path, require_secure_agg=False)
    try:
        assert MessageType.UPDATE in run_until(node, round_start(node), sock, MessageType.UPDATE)
    finally:
        node.close(0)


@pytest.mark.parametrize("attack, fields, match", [
    ("too few parties", secure_fields(n=2), "at least 3"),
    ("another run's session", {**secure_fields(), "session": "run-other"}, "session"),
    ("collusion bound 0 among 10", secure_fields(n=10, collusion=0), "collusion bound"),
    ("sparse degree 2", secure_fields(n=10, graph="sparse", degree=2, collusion=0), "floor"),
])
def test_a_round_below_the_partys_floors_is_refused_before_training(world, owner_socket, tmp_path, attack, fields,
                                                                     match):
    sock, endpoint = owner_socket
    node, lines = make_party(world, endpoint, tmp_path)
    try:
        run(node, round_start(node, fields))
        refusal = [line for line in lines if line.startswith("refused round 1")]
        assert refusal and match in refusal[0], (attack, lines)
        assert not any("training" in line for line in lines), attack
        assert received(sock) == [], attack
    finally:
        node.close(0)


def test_a_round_already_advertised_is_never_taken_part_in_again_even_after_a_restart(world, owner_socket,
                                                                                      tmp_path):
    sock, endpoint = owner_socket
    node, lines = make_party(world, endpoint, tmp_path)
    try:  # first time: the party trains and advertises its keys (the round then stalls here: no owner answers)
        assert MessageType.SECAGG in run_until(node, round_start(node, secure_fields()), sock, MessageType.SECAGG)
        assert node.work.ledger.entry(RUN, 0)["claimed"]  # claimed before its keys left: no redraw of the round
        assert node.rounds.last_contributed() == 0  # what READY reports, so a resumed owner leaves it out
    finally:
        node.close(0)
    again, lines = make_party(world, endpoint, tmp_path)  # a restarted party reads the same ledger
    try:
        run(again, round_start(again, secure_fields()))
        assert any("already took part in round 1 of this run" in line for line in lines), lines
        assert received(sock) == []
        # The next round from the same global state is a repetition too; from a new state it is fine.
        run(again, round_start(again, secure_fields(), r=1))
        assert any("already took part from this global state" in line for line in lines), lines
        assert received(sock) == []
        next_round = round_start(again, secure_fields(), r=1, moved=1e-3)
        assert MessageType.SECAGG in run_until(again, next_round, sock, MessageType.SECAGG)
    finally:
        again.close(0)


def test_hello_hides_the_exact_data_size_unless_the_party_allows_it(world, owner_socket, tmp_path):
    _, endpoint = owner_socket
    node, _ = make_party(world, endpoint, tmp_path)
    shared, _ = make_party(world, endpoint, tmp_path / "shared", share_data_size=True)
    try:
        assert len(node.examples) == 8 and node.announced_examples() == 8
        node.examples = node.examples[:5]
        assert node.announced_examples() == 8  # the power-of-two ceiling
        shared.examples = shared.examples[:5]
        assert shared.announced_examples() == 5
    finally:
        node.close(0)
        shared.close(0)


def readies(sock, seconds: float = SILENCE_S) -> list:
    """The READY messages the owner's socket gets within `seconds`."""
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        item = recv(sock, 0.1)
        if item is not None:
            msg = decode(item.frames, sender="party")
            if msg.type is MessageType.READY:
                got.append(msg)
    return got


def welcome_for(node: PartyNode, run_id: str, sha: str):
    settings = dataclasses.replace(node.rounds.settings, run_id=run_id).to_dict()
    return m.welcome(run_id=run_id, settings=settings, model_sha256=sha, model_size=1000, chunk_size=1000,
                     n_chunks=1, round=0)


def test_a_new_run_is_not_shortened_by_an_earlier_runs_ledger(world, owner_socket, tmp_path):
    sock, endpoint = owner_socket
    node, _ = make_party(world, endpoint, tmp_path)
    sha = "ab" * 32
    shutil.copytree(world["root"] / "model", node.work.model)  # the model is on disk: WELCOME -> READY
    node.work.save_state(model_sha256=sha)
    try:
        node.work.ledger.claim_input(RUN, 0)  # the earlier run: both rounds masked and finished
        node.work.ledger.claim_input(RUN, 1)
        node.rounds.rounds_done = 2
        node.on_welcome(welcome_for(node, "run-next", sha))
        [ready] = readies(sock)
        assert (ready["run_id"], ready["last_round"]) == ("run-next", -1)  # nothing of run-next was done
        node.on_welcome(welcome_for(node, RUN, sha))  # rejoining the earlier run still says what it did there
        [ready] = readies(sock)
        assert (ready["run_id"], ready["last_round"]) == (RUN, 1)
    finally:
        node.close(0)


def test_an_owner_ending_the_run_untrained_is_the_partys_last_line_and_no_success(world, owner_socket, tmp_path):
    sock, endpoint = owner_socket
    node, lines = make_party(world, endpoint, tmp_path)
    import threading  # noqa: PLC0415

    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(node.run()), daemon=True)
    worker.start()
    item = None
    while item is None and worker.is_alive():  # the party's first heartbeat tells the owner its identity
        item = recv(sock, 0.5)
    bye = m.bye(f"{m.RUN_UNTRAINED}: no round was aggregated (2 of 2 rounds skipped)")
    SeqCounter().stamp(bye)
    sock.send_multipart([item.identity, *encode(bye)])
    worker.join(30)
    assert codes == [1]
    assert lines[-1] == ("the owner ended the run without training the adapter: run ended untrained: no round was "
                         "aggregated (2 of 2 rounds skipped)"), lines
