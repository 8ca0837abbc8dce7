"""The party's ledger: one masked input per (session, round) ever, and never both shares of one peer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from secure_agg import SecAggConfig, SecAggError, SecAggLedger, SecAggParty, SecAggServer


def run_until_masked(tmp_path, n=4, session="s", round_id=3, ledgers=None):
    """One round up to the masked inputs; party u uses ledgers[u] (a file under tmp_path) if given."""
    config = SecAggConfig()
    ledgers = ledgers or {}
    server = SecAggServer(config, n, 5, round_id, session)
    parties = [SecAggParty(config, u, n, round_id, session, ledger=ledgers.get(u)) for u in range(n)]
    for p in parties:
        server.receive_advertise(p.advertise())
    for u, roster in server.close_advertise().items():
        server.receive_shares(parties[u].share_keys(roster))
    return server, parties, server.close_shares()


def test_a_second_masked_input_for_the_same_round_is_refused_across_restarts(tmp_path):
    path = tmp_path / "work" / "secagg-ledger.json"
    _, parties, relays = run_until_masked(tmp_path, ledgers={0: SecAggLedger(path)})
    parties[0].contribute(np.zeros(5), 1).masked_input(relays[0])
    assert SecAggLedger(path).entry("s", 3) == {"input_sent": True, "revealed": {}}
    # The party restarts (a new object and a new ledger reading the same file); the owner reruns round 3.
    _, again, relays = run_until_masked(tmp_path, ledgers={0: SecAggLedger(path)})
    with pytest.raises(SecAggError, match="already sent a masked input for round 3"):
        again[0].contribute(np.zeros(5), 1).masked_input(relays[0])
    assert again[0].stage == "aborted"
    # Another round, or another session, is a fresh contribution.
    _, other, relays = run_until_masked(tmp_path, round_id=4, ledgers={0: SecAggLedger(path)})
    other[0].contribute(np.zeros(5), 1).masked_input(relays[0])
    _, other, relays = run_until_masked(tmp_path, session="t", ledgers={0: SecAggLedger(path)})
    other[0].contribute(np.zeros(5), 1).masked_input(relays[0])
    data = json.loads(path.read_text())
    assert set(data["rounds"]) == {"s", "t"} and set(data["rounds"]["s"]) == {"3", "4"}


def test_a_refused_input_claims_nothing(tmp_path):
    """A masked_input that fails its checks (here: NaN) leaves the round unclaimed."""
    path = tmp_path / "ledger.json"
    _, parties, relays = run_until_masked(tmp_path, ledgers={0: SecAggLedger(path)})
    with pytest.raises(SecAggError, match="NaN"):
        parties[0].contribute(np.full(5, np.nan), 1).masked_input(relays[0])
    assert SecAggLedger(path).entry("s", 3)["input_sent"] is False


def test_revealing_the_other_share_of_a_peer_is_refused(tmp_path):
    ledger = SecAggLedger(tmp_path / "ledger.json")
    ledger.record_reveal("s", 1, [0, 2], [3])
    ledger.record_reveal("s", 1, [0], [3])  # the same again is harmless
    with pytest.raises(SecAggError, match="revealed party 3's key share before"):
        SecAggLedger(tmp_path / "ledger.json").record_reveal("s", 1, [3], [])
    with pytest.raises(SecAggError, match="revealed party 2's seed share before"):
        ledger.record_reveal("s", 1, [], [2])
    with pytest.raises(SecAggError, match="both shares"):
        ledger.record_reveal("s", 2, [5], [5])
    ledger.record_reveal("s", 2, [], [2])  # another round: independent
    assert ledger.entry("s", 1)["revealed"] == {0: "seed", 2: "seed", 3: "key"}


def test_party_consults_the_ledger_before_revealing(tmp_path):
    """A party whose ledger says it revealed peer 1's key share in this round refuses to reveal its seed."""
    path = tmp_path / "ledger.json"
    SecAggLedger(path).record_reveal("s", 3, [], [1])
    server, parties, relays = run_until_masked(tmp_path, ledgers={0: SecAggLedger(path)})
    for u, relay in relays.items():
        parties[u].receive_ack(server.receive_masked_input(parties[u].contribute(np.zeros(5), 1).masked_input(relay)))
    for u, check in server.close_inputs().items():
        server.receive_consistency(parties[u].consistency_check(check))
    requests = server.close_consistency()
    with pytest.raises(SecAggError, match="revealed party 1's key share before"):
        parties[0].unmask(requests[0])
    reply = parties[1].unmask(requests[1])  # a party without that record reveals as usual
    assert reply.seed_owners == [0, 1, 2, 3]


def test_a_corrupt_ledger_is_an_error_and_is_left_alone(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(SecAggError, match="corrupt"):
        SecAggLedger(path).claim_input("s", 0)
    assert path.read_text() == "{not json"
    path.write_text(json.dumps({"version": 9, "rounds": {}}))
    with pytest.raises(SecAggError, match="unknown format"):
        SecAggLedger(path).entry("s", 0)
    assert not list(tmp_path.glob("*.tmp"))
