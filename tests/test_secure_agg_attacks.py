"""Secure aggregation against a misbehaving owner or party: tampering, replay, inconsistent lists, forged
consistency signatures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secure_agg import (
    ConsistencyRequest,
    ConsistencySignature,
    PartyPolicy,
    SecAggConfig,
    SecAggError,
    SecAggParty,
    SecAggServer,
    UnmaskRequest,
    UnmaskShares,
    crypto,
    shamir,
)


def wire(msg):
    """A message as the other side sees it."""
    return type(msg).from_wire(*msg.to_wire())


class Round:
    """One round driven by hand, so a test can interfere between the steps."""

    def __init__(self, n: int, *, length: int = 6, round_id: int = 0, session: str = "s",
                 config: SecAggConfig | None = None, policy: PartyPolicy | None = None) -> None:
        self.config = config or SecAggConfig()
        self.n, self.length = n, length
        self.server = SecAggServer(self.config, n, length, round_id, session)
        self.parties = [SecAggParty(self.config, u, n, round_id, session, policy=policy) for u in range(n)]
        self.inputs = {}
        rng = np.random.default_rng(n)
        self.vectors = [rng.uniform(-1, 1, length) for _ in range(n)]
        self.weights = [int(w) for w in rng.integers(1, 50, n)]

    def advertise(self, skip=()):
        self.adverts = {p.party_id: wire(p.advertise()) for p in self.parties if p.party_id not in skip}
        for advert in self.adverts.values():
            self.server.receive_advertise(advert)
        self.rosters = {u: wire(r) for u, r in self.server.close_advertise().items()}
        return self

    def share(self, skip=()):
        for u, roster in self.rosters.items():
            if u not in skip:
                self.server.receive_shares(wire(self.parties[u].share_keys(roster)))
        self.relays = {u: wire(r) for u, r in self.server.close_shares().items()}
        return self

    def mask(self, skip=()):
        for u, relay in self.relays.items():
            if u not in skip:
                self.inputs[u] = wire(self.parties[u].contribute(self.vectors[u], self.weights[u]).masked_input(relay))
                self.parties[u].receive_ack(wire(self.server.receive_masked_input(self.inputs[u])))
        self.checks = {u: wire(r) for u, r in self.server.close_inputs().items()}
        return self

    def sign(self, skip=()):
        self.signatures = {}
        for u, check in self.checks.items():
            if u not in skip:
                self.signatures[u] = wire(self.parties[u].consistency_check(check))
                self.server.receive_consistency(self.signatures[u])
        self.requests = {u: wire(r) for u, r in self.server.close_consistency().items()}
        return self

    def unmask(self, skip=()):
        self.replies = {}
        for u, request in self.requests.items():
            if u not in skip:
                self.replies[u] = wire(self.parties[u].unmask(request))
                self.server.receive_unmask(self.replies[u])
        return self

    def expected(self, members):
        return sum(self.weights[m] * np.clip(self.vectors[m], -1, 1) for m in members)


def with_keys(roster, column: str, values):
    """The roster with one column of the members' advertisements replaced, as a tampering owner would."""
    adverts = [dataclasses.replace(a, **{column: v}) for a, v in zip(roster.adverts, values, strict=True)]
    return dataclasses.replace(roster, adverts=adverts)


def flip(blob: bytes, at: int = 20) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:]


def test_hand_driven_round_with_dropouts_is_correct():
    r = Round(9).advertise().share(skip={8}).mask(skip={7}).sign(skip={3}).unmask()  # c = 2, t = 6
    result = r.server.finish()
    assert result.included == [0, 1, 2, 3, 4, 5, 6] and result.dropped == [7] and result.left_out == [8]
    assert r.server.signers == [0, 1, 2, 4, 5, 6] and r.server.responders == [0, 1, 2, 4, 5, 6]
    assert result.bad_shares == []
    np.testing.assert_allclose(result.weighted_sum, r.expected(result.included), atol=7 * 2.0 ** -16)


def test_tampered_ciphertext_is_detected():
    r = Round(4).advertise().share()
    relay = r.relays[1]
    bad = dataclasses.replace(relay, ciphertexts=[flip(relay.ciphertexts[0]), *relay.ciphertexts[1:]])
    with pytest.raises(SecAggError, match=r"share from party 0 failed authentication"):
        r.parties[1].contribute(r.vectors[1], 1).masked_input(bad)
    with pytest.raises(SecAggError, match="aborted"):  # a refusing party answers nothing more
        r.parties[1].contribute(r.vectors[1], 1).masked_input(relay)


def test_ciphertext_relayed_to_the_wrong_party_or_under_another_sender_fails():
    r = Round(4).advertise().share()
    to_one, to_two = r.relays[1], r.relays[2]
    # Party 0's ciphertext for party 1, handed to party 2 as party 0's ciphertext for it.
    misrouted = dataclasses.replace(to_two, ciphertexts=[to_one.ciphertexts[0], *to_two.ciphertexts[1:]])
    with pytest.raises(SecAggError, match="failed authentication"):
        r.parties[2].contribute(r.vectors[2], 1).masked_input(misrouted)
    # Party 1's ciphertexts from parties 0 and 2, swapped.
    c = to_one.ciphertexts
    swapped = dataclasses.replace(to_one, ciphertexts=[c[1], c[0], *c[2:]])
    with pytest.raises(SecAggError, match="failed authentication"):
        r.parties[1].contribute(r.vectors[1], 1).masked_input(swapped)


def test_replayed_shares_from_another_round_fail():
    first = Round(4, round_id=1).advertise().share()
    second = Round(4, round_id=2).advertise().share()
    # The whole relay of round 1 replayed in round 2: refused on its envelope.
    with pytest.raises(SecAggError, match="round 1.*round 2.*replay"):
        second.parties[1].contribute(second.vectors[1], 1).masked_input(first.relays[1])
    # Round 1's ciphertexts inside a round-2 envelope: they fail authentication.
    replay = dataclasses.replace(second.relays[2], ciphertexts=first.relays[2].ciphertexts)
    with pytest.raises(SecAggError, match="failed authentication"):
        second.parties[2].contribute(second.vectors[2], 1).masked_input(replay)


def test_round_and_session_are_bound_even_under_the_same_key_material():
    """Were X25519 keys ever reused, HKDF info and AEAD associated data still tie a share to its round."""
    shared = bytes(range(32))
    key1 = crypto.share_key(shared, "s", 1, 0, 1)
    blob = crypto.seal(key1, b"x" * 66, crypto.context(b"share-ad", "s", 1, 0, 1))
    assert crypto.open_sealed(key1, blob, crypto.context(b"share-ad", "s", 1, 0, 1), "share") == b"x" * 66
    for key, ad in [(crypto.share_key(shared, "s", 2, 0, 1), crypto.context(b"share-ad", "s", 2, 0, 1)),
                    (key1, crypto.context(b"share-ad", "s", 2, 0, 1)),
                    (key1, crypto.context(b"share-ad", "t", 1, 0, 1)),
                    (key1, crypto.context(b"share-ad", "s", 1, 1, 0))]:
        with pytest.raises(SecAggError, match="failed authentication"):
            crypto.open_sealed(key, blob, ad, "share")
    assert crypto.share_key(shared, "s", 1, 0, 1) != crypto.share_key(shared, "s", 1, 1, 0)


def _both(alive, dropped):
    return alive, dropped + [alive[-1]]


def _unknown(alive, dropped):
    return alive + [99], dropped


def _self_dropped(alive, dropped):
    return [a for a in alive if a != 0], sorted(dropped + [0])


def _too_few_alive(alive, dropped):
    return alive[:2], sorted(dropped + alive[2:])


def _omits_a_sharer(alive, dropped):
    return alive[:-1], dropped


def _lists_a_non_sharer(alive, dropped):
    return alive, sorted(dropped + [6])  # party 6 never shared keys


@pytest.mark.parametrize(("tamper", "reason"), [
    (_both, "both alive and dropped"),
    (_unknown, "outside the roster"),
    (_self_dropped, "although it acknowledged"),
    (_too_few_alive, "below the threshold"),
    (_omits_a_sharer, "neither alive nor dropped"),
    (_lists_a_non_sharer, "never shared keys"),
])
def test_party_refuses_inconsistent_alive_lists(tamper, reason):
    r = Round(7).advertise().share(skip={6}).mask(skip={5})  # c = 2, t = 5
    check = r.checks[0]
    assert check.alive == [0, 1, 2, 3, 4] and check.dropped == [5]
    alive, dropped = tamper(list(check.alive), list(check.dropped))
    views = dict(zip(check.alive, check.view_signatures, strict=True))
    bad = ConsistencyRequest(check.round_id, check.session, 0, sorted(alive), sorted(dropped),
                             [views.get(v, bytes(64)) for v in sorted(alive)])
    with pytest.raises(SecAggError, match=reason):
        r.parties[0].consistency_check(wire(bad))
    with pytest.raises(SecAggError):  # and it signs nothing afterwards, even for the honest request
        r.parties[0].consistency_check(check)


def test_party_signs_once_and_answers_one_unmask_request_only():
    r = Round(5).advertise().share().mask(skip={4}).sign()
    flipped = dataclasses.replace(r.checks[1], alive=[0, 1, 2, 4], dropped=[3])
    with pytest.raises(SecAggError, match="consistency_check called in stage 'consistency'"):
        r.parties[1].consistency_check(flipped)
    with pytest.raises(SecAggError, match="stage"):
        r.parties[1].consistency_check(r.checks[1])  # not even the same request twice
    first = r.parties[1].unmask(r.requests[1])
    assert 4 in first.key_owners and 4 not in first.seed_owners
    with pytest.raises(SecAggError, match="stage"):
        r.parties[1].unmask(r.requests[1])


def request_for(r: Round, u: int, alive, dropped) -> ConsistencyRequest:
    """A consistency request with the alive parties' real view signatures (what any owner can relay)."""
    alive = sorted(alive)
    return ConsistencyRequest(0, "s", u, alive, sorted(dropped), [r.inputs[v].view_signature for v in alive])


# Without colluders (c = 0, which the party must accept explicitly) t = 3 of 5: Bonawitz et al.'s setting.
NO_COLLUSION = {"config": SecAggConfig(collusion=0), "policy": PartyPolicy(min_collusion=0)}


def lying_round(lists: dict[int, list[int]], n: int = 5, **options) -> tuple[Round, dict[int, ConsistencySignature]]:
    """Every party sends its input; then the owner shows party u the alive list `lists[u]` (the rest of
    the sharers as dropped). Returns the round and each party's signature over the list it was shown."""
    r = Round(n, **(options or NO_COLLUSION)).advertise().share().mask()
    signatures = {}
    for u, alive in lists.items():
        check = request_for(r, u, alive, [v for v in range(n) if v not in alive])
        signatures[u] = wire(r.parties[u].consistency_check(wire(check)))
    return r, signatures


def unmask_request(u: int, signatures: dict[int, ConsistencySignature], signers) -> UnmaskRequest:
    signers = sorted(signers)
    return UnmaskRequest(0, "s", u, signers, [signatures[v].signature for v in signers])


# The attack of the brief: each list passes the party's own checks, and without the consistency check the
# owner would gather >= 3 shares of b0, b1 (alive for 0, 1, 2, 3 and 4) and of sk2, sk3, sk4, so learn x0 + x1.
SUBSET_SUM_LISTS = {0: [0, 1, 2], 1: [0, 1, 3], 2: [0, 1, 2], 3: [0, 1, 3], 4: [0, 1, 4]}


@pytest.mark.parametrize("strategy", ["same list", "signers in its list", "every signature"])
def test_subset_sum_attack_with_inconsistent_lists_reveals_nothing(strategy):
    """n = 5, t = 3: no list gathers 3 signatures, so no party shown one of them reveals a share."""
    r, signatures = lying_round(SUBSET_SUM_LISTS)
    assert set(signatures) == set(range(5))  # every list passed the local checks: only signatures stop it
    revealed = []
    for u, alive in SUBSET_SUM_LISTS.items():
        if strategy == "same list":  # valid signatures, too few
            signers = [v for v, other in SUBSET_SUM_LISTS.items() if other == alive]
            reason = "below the threshold 3"
        elif strategy == "signers in its list":  # enough signers, some signed another list
            signers = alive
            reason = "invalid"
        else:
            signers = range(5)
            reason = "not in the alive set"
        with pytest.raises(SecAggError, match=reason):
            revealed.append(r.parties[u].unmask(wire(unmask_request(u, signatures, signers))))
        assert r.parties[u].stage == "aborted"
        with pytest.raises(SecAggError):  # nothing more this round, whatever comes next
            r.parties[u].unmask(wire(unmask_request(u, signatures, range(5))))
    assert revealed == []


def test_an_owner_lying_about_a_dropout_cannot_rebuild_both_secrets():
    """Tell parties 0..2 that party 0 is alive and parties 3, 4 that it dropped: with a strict-majority
    threshold only one list gathers t signatures, so the owner gets t seed shares or t key shares of party
    0, never both."""
    lists = {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4], 2: [0, 1, 2, 3, 4], 3: [1, 2, 3, 4], 4: [1, 2, 3, 4]}
    r, signatures = lying_round(lists)
    t = r.server.share_threshold
    assert t == 3 and r.server.params.collusion == 0
    seed_shares, key_shares = {}, {}
    for u in range(5):
        same = [v for v in lists if lists[v] == lists[u]]  # the owner's best: 3 for parties 0..2, 2 for 3, 4
        try:
            reply = r.parties[u].unmask(wire(unmask_request(u, signatures, same)))
        except SecAggError:
            continue
        if 0 in reply.seed_owners:
            seed_shares[u] = reply.seed_shares[reply.seed_owners.index(0)]
        if 0 in reply.key_owners:
            key_shares[u] = reply.key_shares[reply.key_owners.index(0)]
    assert not (len(seed_shares) >= t and len(key_shares) >= t)
    assert len(seed_shares) == t and key_shares == {}
    # What the key shares it did get rebuild is not party 0's mask key.
    try:
        guess = shamir.combine(key_shares)
        assert crypto.public_of(guess) != r.adverts[0].s_pk
    except ValueError:
        pass


def test_reply_revealing_both_secrets_of_a_peer_is_rejected_on_the_wire():
    reply = UnmaskShares(0, "s", 1, [2], [2], [bytes(33)], [bytes(33)])
    with pytest.raises(SecAggError, match="both the seed and the mask key"):
        UnmaskShares.from_wire(*reply.to_wire())


@pytest.mark.parametrize("which", ["seed", "key"])
def test_a_bad_unmask_share_is_left_out_and_the_round_completes(which):
    """Every revealed share is checked against its dealer's commitment: a tampered one is dropped, the secret
    is rebuilt from t good ones, and the holder is named."""
    r = Round(6).advertise().share().mask(skip={5} if which == "key" else set()).sign()  # c = 1, t = 4
    for u, request in r.requests.items():
        reply = r.parties[u].unmask(request)
        if u == 1:
            if which == "seed":
                reply = dataclasses.replace(reply, seed_shares=[flip(s, 30) for s in reply.seed_shares])
            else:
                reply = dataclasses.replace(reply, key_shares=[flip(s, 30) for s in reply.key_shares])
        r.server.receive_unmask(wire(reply))
    result = r.server.finish()
    owners = result.included if which == "seed" else result.dropped
    assert result.bad_shares == [(1, owner, which) for owner in owners]
    np.testing.assert_allclose(result.weighted_sum, r.expected(result.included), atol=6 * 2.0 ** -16)


def test_round_aborts_only_when_fewer_than_t_good_shares_remain():
    r = Round(5).advertise().share().mask(skip={4}).sign()  # t = 4 and exactly 4 signers
    for u, request in r.requests.items():
        reply = r.parties[u].unmask(request)
        if u == 2:
            reply = dataclasses.replace(reply, seed_shares=[flip(s, 30) for s in reply.seed_shares])
        r.server.receive_unmask(wire(reply))
    with pytest.raises(SecAggError, match="only 3 good shares of party 0's self-mask seed.*4 are needed"):
        r.server.finish()
    assert r.server.stage == "aborted"


def test_a_dealer_with_inconsistent_committed_shares_is_identified(monkeypatch):
    """Party 3 deals seed shares that lie on no polynomial (each committed, so every holder accepts it):
    the owner's t good shares do not rebuild the committed seed, and the error names the dealer."""
    import secure_agg.party as party_module

    r = Round(5).advertise()
    honest_split = shamir.split
    rng = np.random.default_rng(7)

    def bad_split(secret, holders, threshold):
        if secret == r.parties[3]._seed:
            return {h: int(rng.integers(1, 1 << 62)).to_bytes(shamir.SHARE_BYTES, "big") for h in holders}
        return honest_split(secret, holders, threshold)

    monkeypatch.setattr(party_module.shamir, "split", bad_split)
    r.share()
    monkeypatch.setattr(party_module.shamir, "split", honest_split)
    r.mask().sign().unmask()
    with pytest.raises(SecAggError, match="party 3 dealt inconsistent shares"):
        r.server.finish()


def test_a_share_that_does_not_match_its_commitment_is_refused_by_the_holder():
    r = Round(4).advertise().share()
    relay = r.relays[1]
    bad = dataclasses.replace(relay, seed_commits=[relay.seed_commits[0], bytes(32), *relay.seed_commits[2:]])
    with pytest.raises(SecAggError, match=f"party {relay.senders[1]} dealt a share that does not match"):
        r.parties[1].contribute(r.vectors[1], 1).masked_input(bad)


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("min_survivors", 2, "roster threshold"),
    ("collusion", 0, "collusion bound"),
    ("degree", 2, "degree"),
    ("ring_bits", 32, "bit ring"),
    ("recipient", 1, "addressed to party 1"),
    ("round_id", 5, "replay"),
])
def test_party_refuses_a_manipulated_roster(field, value, reason):
    r = Round(4).advertise()
    roster = dataclasses.replace(r.rosters[0], **{field: value})
    with pytest.raises(SecAggError, match=reason):
        r.parties[0].share_keys(roster)


def test_party_refuses_a_roster_with_a_repeated_key_or_a_foreign_coin_commitment():
    r = Round(4).advertise()
    roster = r.rosters[1]
    bad = with_keys(roster, "c_pk", [roster.c_pks[0]] * len(roster.c_pks))
    with pytest.raises(SecAggError, match="not its own|repeats a public key"):
        r.parties[1].share_keys(bad)
    bad = with_keys(r.rosters[0], "c_pk", [roster.c_pks[0], roster.c_pks[0], *roster.c_pks[2:]])
    with pytest.raises(SecAggError, match="repeats a public key"):
        r.parties[0].share_keys(bad)
    commits = r.rosters[2].coin_commits
    bad = with_keys(r.rosters[2], "coin_commit", [*commits[:2], commits[0], commits[3]])
    with pytest.raises(SecAggError, match="not its own"):
        r.parties[2].share_keys(bad)


def test_party_refuses_an_ack_for_another_input():
    r = Round(3).advertise().share()
    server_ack = r.server.receive_masked_input(r.parties[0].contribute(r.vectors[0], 3).masked_input(r.relays[0]))
    with pytest.raises(SecAggError, match="did not send"):
        r.parties[0].receive_ack(dataclasses.replace(server_ack, digest=bytes(32)))


def test_server_rejects_bad_messages_without_losing_the_round():
    r = Round(4).advertise()
    shares = [r.parties[u].share_keys(r.rosters[u]) for u in range(4)]
    r.server.receive_shares(shares[0])
    with pytest.raises(SecAggError, match="twice"):
        r.server.receive_shares(shares[0])
    with pytest.raises(SecAggError, match="not to the other members"):
        r.server.receive_shares(dataclasses.replace(shares[1], receivers=[0, 2], ciphertexts=shares[1].ciphertexts[:2],
                                                    seed_commits=shares[1].seed_commits[:3],
                                                    key_commits=shares[1].key_commits[:3]))
    with pytest.raises(SecAggError, match="coin does not match"):
        r.server.receive_shares(dataclasses.replace(shares[1], coin=bytes(32)))
    with pytest.raises(SecAggError, match="share commitments for 4 members"):
        r.server.receive_shares(dataclasses.replace(shares[1], key_commits=shares[1].key_commits[:-1]))
    with pytest.raises(SecAggError, match="round 3"):
        r.server.receive_shares(dataclasses.replace(shares[1], round_id=3))
    with pytest.raises(SecAggError, match="not accepting"):
        r.server.receive_advertise(SecAggParty(r.config, 1, r.n, 0, "s").advertise())
    for s in shares[1:]:
        r.server.receive_shares(s)
    r.relays = r.server.close_shares()
    masked = r.parties[0].contribute(r.vectors[0], r.weights[0]).masked_input(r.relays[0])
    with pytest.raises(SecAggError, match="elements"):
        r.server.receive_masked_input(dataclasses.replace(masked, length=5, masked=masked.masked[:25]))
    with pytest.raises(SecAggError, match="view signature is invalid"):
        r.server.receive_masked_input(dataclasses.replace(masked, view_signature=flip(masked.view_signature)))
    r.server.receive_masked_input(masked)
    for u in (1, 2, 3):
        r.server.receive_masked_input(r.parties[u].contribute(r.vectors[u], r.weights[u]).masked_input(r.relays[u]))
    r.checks = r.server.close_inputs()
    signatures = [r.parties[u].consistency_check(r.checks[u]) for u in range(4)]
    with pytest.raises(SecAggError, match="signature is invalid"):
        r.server.receive_consistency(dataclasses.replace(signatures[0], signature=flip(signatures[0].signature)))
    with pytest.raises(SecAggError, match="signature is invalid"):  # party 1's signature claimed by party 0
        r.server.receive_consistency(dataclasses.replace(signatures[1], sender=0))
    with pytest.raises(SecAggError, match="not accepting"):
        r.server.receive_unmask(UnmaskShares(0, "s", 0, [], [], [], []))
    for sig in signatures[:3]:
        r.server.receive_consistency(sig)
    with pytest.raises(SecAggError, match="twice"):
        r.server.receive_consistency(signatures[0])
    r.server.receive_consistency(signatures[3])
    r.requests = r.server.close_consistency()
    reply = r.parties[0].unmask(r.requests[0])
    with pytest.raises(SecAggError, match="request called for"):
        r.server.receive_unmask(dataclasses.replace(reply, seed_owners=reply.seed_owners[:-1],
                                                    seed_shares=reply.seed_shares[:-1]))
    r.server.receive_unmask(reply)
    for u in (1, 2, 3):
        r.server.receive_unmask(r.parties[u].unmask(r.requests[u]))
    result = r.server.finish()
    np.testing.assert_allclose(result.weighted_sum, r.expected(range(4)), atol=4 * 2.0 ** -16)


def test_relayed_graph_or_coins_from_elsewhere_are_refused():
    r = Round(12, config=SecAggConfig(graph="sparse", degree=4)).advertise().share()
    relay = r.relays[3]
    other = [v for v in range(12) if v != 3 and v not in relay.neighbours][:4]
    bad = dataclasses.replace(relay, neighbours=sorted(other))
    with pytest.raises(SecAggError, match="differ from the graph"):
        r.parties[3].contribute(r.vectors[3], 1).masked_input(bad)
    coins = list(r.relays[4].coins)
    coins[0] = bytes(32)
    with pytest.raises(SecAggError, match="party 0's graph coin does not match its commitment"):
        r.parties[4].contribute(r.vectors[4], 1).masked_input(dataclasses.replace(r.relays[4], coins=coins))


def test_relay_from_a_non_member_is_refused():
    r = Round(6).advertise(skip={5}).share()
    relay = r.relays[2]
    bad = dataclasses.replace(relay, senders=[*relay.senders[:-1], 5])
    with pytest.raises(SecAggError, match=r"non-members \[5\]"):
        r.parties[2].contribute(r.vectors[2], 1).masked_input(bad)


def test_an_owner_equivocating_about_the_sharers_is_caught_by_the_view_signatures():
    """Party 0 is told that party 5 did not share keys (so it masks under another graph and transcript);
    the owner's check refuses its input, and a party shown 0's view signature refuses to sign."""
    r = Round(6).advertise().share()
    relay = r.relays[0]
    keep = [i for i, u in enumerate(relay.senders) if u != 5]
    lied = dataclasses.replace(relay, senders=[relay.senders[i] for i in keep],
                               ciphertexts=[relay.ciphertexts[i] for i in keep],
                               seed_commits=[relay.seed_commits[i] for i in keep],
                               key_commits=[relay.key_commits[i] for i in keep], coins=relay.coins[:-1],
                               neighbours=relay.neighbours[:-1], s_pks=relay.s_pks[:-1])
    masked = r.parties[0].contribute(r.vectors[0], r.weights[0]).masked_input(lied)
    with pytest.raises(SecAggError, match="party 0's view signature is invalid"):
        r.server.receive_masked_input(masked)
    r.inputs[0] = masked
    for u in range(1, 6):
        r.inputs[u] = r.parties[u].contribute(r.vectors[u], r.weights[u]).masked_input(r.relays[u])
    with pytest.raises(SecAggError, match="party 0's view signature is invalid"):
        r.parties[1].consistency_check(request_for(r, 1, range(6), []))


def refuses_to_unmask(party: SecAggParty, request: UnmaskRequest, reason: str) -> None:
    """The party refuses, reveals nothing, and reveals nothing afterwards either."""
    with pytest.raises(SecAggError, match=reason):
        party.unmask(request)
    assert party.stage == "aborted"
    with pytest.raises(SecAggError, match="stage 'aborted'"):
        party.unmask(request)


def test_forged_consistency_signature_is_refused():
    r = Round(5).advertise().share().mask(skip={4}).sign()
    request = r.requests[0]
    assert request.signers == [0, 1, 2, 3]
    forged = dataclasses.replace(request, signatures=[*request.signatures[:2], flip(request.signatures[2], 5),
                                                      request.signatures[3]])
    refuses_to_unmask(r.parties[0], wire(forged), "party 2's consistency signature is invalid")
    # Party 1's signature passed off as party 3's (right list, wrong key).
    swapped = dataclasses.replace(r.requests[1], signatures=[*request.signatures[:3], request.signatures[1]])
    refuses_to_unmask(r.parties[1], wire(swapped), "party 3's consistency signature is invalid")
    # A signature from the same party over the same list but another round or session.
    other = Round(5, round_id=1).advertise().share().mask(skip={4}).sign()
    replayed = dataclasses.replace(r.requests[2], signatures=other.requests[2].signatures)
    refuses_to_unmask(r.parties[2], wire(replayed), "invalid")
    assert r.parties[3].unmask(r.requests[3]).seed_owners == [0, 1, 2, 3]  # the honest request still works


def test_signature_over_a_different_alive_list_is_refused():
    """Party 2 is shown a list without party 3 (it signs that one); its signature is useless to the others."""
    lists = {u: [0, 1, 2, 3, 4] for u in range(5)}
    lists[2] = [0, 1, 2, 4]
    r, signatures = lying_round(lists, config=SecAggConfig())  # c = 1, t = 4
    refuses_to_unmask(r.parties[0], wire(unmask_request(0, signatures, [0, 1, 2, 3])), "party 2's consistency")
    refuses_to_unmask(r.parties[2], wire(unmask_request(2, signatures, [0, 1, 2, 4])), "party 0's consistency")
    reply = r.parties[1].unmask(wire(unmask_request(1, signatures, [0, 1, 3, 4])))  # t signatures: fine
    assert reply.seed_owners == [0, 1, 2, 3, 4] and reply.key_owners == []


def test_duplicate_signer_is_refused():
    r = Round(5).advertise().share().mask(skip={4}).sign()
    request = r.requests[0]
    twice = UnmaskRequest(0, "s", 0, [0, 1, 1, 2], [request.signatures[0], *request.signatures[1:2] * 2,
                                                     request.signatures[2]])
    with pytest.raises(SecAggError, match="strictly increasing"):  # on the wire
        UnmaskRequest.from_wire(*twice.to_wire())
    refuses_to_unmask(r.parties[0], twice, "repeats a signer")  # and in the party itself


def test_too_few_signatures_are_refused():
    r = Round(5).advertise().share().mask().sign()
    request = r.requests[0]
    two = dataclasses.replace(request, signers=request.signers[:2], signatures=request.signatures[:2])
    refuses_to_unmask(r.parties[0], wire(two), "only 2 consistency signatures, below the threshold 4")
    none = dataclasses.replace(request, signers=[], signatures=[])
    refuses_to_unmask(r.parties[1], wire(dataclasses.replace(none, recipient=1)), "only 0")
    mismatched = dataclasses.replace(r.requests[2], signatures=request.signatures[:-1])
    refuses_to_unmask(r.parties[2], mismatched, "5 signers but 4 signatures")


def test_signer_outside_the_alive_list_is_refused():
    """Party 4 shared keys but sent no input, so it is not in U3; even a valid signature of it cannot count."""
    r = Round(5).advertise().share().mask(skip={4}).sign()
    stray = ConsistencySignature(0, "s", 4, crypto.sign(r.parties[4]._sig_key, crypto.consistency_message(
        "s", 0, [0, 1, 2, 3, 4], r.parties[4]._transcript)))  # party 4's signature, were it shown a list naming it
    request = r.requests[0]
    bad = UnmaskRequest(0, "s", 0, [*request.signers, 4], [*request.signatures, stray.signature])
    refuses_to_unmask(r.parties[0], wire(bad), r"signers \[4\] are not in the alive set")
    with pytest.raises(SecAggError, match="not accepting"):  # the owner's stage is over; before that, too:
        r.server.receive_consistency(stray)
    early = Round(5).advertise().share().mask(skip={4})
    with pytest.raises(SecAggError, match="may not send"):
        early.server.receive_consistency(ConsistencySignature(0, "s", 4, bytes(64)))


def test_unmask_before_signing_and_the_old_direct_request_are_refused():
    r = Round(4).advertise().share().mask()
    request = UnmaskRequest(0, "s", 0, [], [])
    with pytest.raises(SecAggError, match="unmask called in stage 'masked_input'"):
        r.parties[0].unmask(request)
    with pytest.raises(SecAggError, match="not accepting"):
        r.server.receive_unmask(UnmaskShares(0, "s", 0, [], [], [], []))


def test_dropout_at_the_consistency_stage_still_completes():
    r = Round(7).advertise().share().mask(skip={6}).sign(skip={2}).unmask()  # c = 2, t = 5
    assert r.server.signers == [0, 1, 3, 4, 5] and sorted(r.requests) == [0, 1, 3, 4, 5]
    with pytest.raises(SecAggError, match="may not send"):  # a non-signer's late reply is not taken
        r.server.receive_unmask(UnmaskShares(0, "s", 2, [], [], [], []))
    result = r.server.finish()
    assert result.included == [0, 1, 2, 3, 4, 5] and result.dropped == [6]
    np.testing.assert_allclose(result.weighted_sum, r.expected(result.included), atol=6 * 2.0 ** -16)


def test_too_few_signers_abort_before_anything_is_revealed():
    r = Round(7).advertise().share().mask()
    with pytest.raises(SecAggError, match="only 4 parties signed the alive list, below the threshold 5"):
        r.sign(skip={0, 1, 2})
    assert r.server.stage == "aborted"
    with pytest.raises(SecAggError):
        r.server.finish()


def test_sparse_graph_needs_the_global_signature_threshold():
    """On a sparse graph too, a party reveals only with t > (n + c) / 2 signatures of all invited parties,
    not merely a majority of its neighbourhood."""
    n = 12
    r = Round(n, config=SecAggConfig(graph="sparse", degree=4)).advertise().share().mask()
    assert r.server.share_threshold == 7 and r.server.params.collusion == 1
    r.sign()
    request = r.requests[0]
    neighbourhood = [0, *r.relays[0].neighbours]  # 5 signatures: a majority of its neighbours, not of all
    few = UnmaskRequest(0, "s", 0, neighbourhood,
                        [request.signatures[request.signers.index(v)] for v in neighbourhood])
    refuses_to_unmask(r.parties[0], wire(few), "only 5 consistency signatures, below the threshold 7")
    r.unmask(skip={0})
    result = r.server.finish()
    np.testing.assert_allclose(result.weighted_sum, r.expected(range(n)), atol=n * 2.0 ** -16)


@pytest.mark.parametrize(("keys", "reason"), [
    (lambda k: [k[1], *k[1:]], "not its own"),  # its own key replaced
    (lambda k: [k[0], k[1], k[1], k[3]], "repeats a public key"),
])
def test_party_refuses_a_roster_with_wrong_signing_keys(keys, reason):
    r = Round(4).advertise()
    roster = r.rosters[0]
    assert len(roster.sig_pks) == 4 and roster.sig_pks[0] == r.adverts[0].sig_pk
    with pytest.raises(SecAggError, match=reason):
        r.parties[0].share_keys(with_keys(roster, "sig_pk", keys(roster.sig_pks)))
