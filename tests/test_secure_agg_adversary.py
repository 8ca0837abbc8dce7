"""Secure aggregation against an owner that colludes with up to c parties and lies about who is alive.

The owner drives real parties (real keys, shares and signatures) and may show every honest party any alive
list, drop any sharers, and present every signature it has; its colluders hand over all their shares and
sign every list. From the shares the honest parties actually reveal, the test works out exactly which sums
of honest inputs the owner can strip of all masks, and requires that none holds fewer than t - c inputs.
A negative control runs the same attack without a collusion bound and recovers single honest updates.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from secure_agg import (
    ConsistencyRequest,
    PartyPolicy,
    SecAggConfig,
    SecAggError,
    SecAggParty,
    SecAggServer,
    UnmaskRequest,
    crypto,
    round_params,
    shamir,
)
from secure_agg.encoding import decode, unpack
from secure_agg.graph import is_k_connected, ring_position

ADVERSARY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SESSION = "adv"


@dataclasses.dataclass
class Outcome:
    server: SecAggServer
    parties: list[SecAggParty]
    corrupt: set[int]
    sharers: list[int]
    inputs: dict  # sharer -> MaskedInput the owner holds
    replies: dict  # honest party -> UnmaskShares it revealed
    signed: dict  # honest party -> alive list it signed
    offered: list  # the alive lists the owner showed


ONE_COLLUDER = PartyPolicy(min_collusion=1)  # the ring attacks below need c = 1 at 25 parties


def setup(n: int, config: SecAggConfig, corrupt: set[int], skip_share=(), policy=None, length: int = 5):
    """Advertise, share (minus `skip_share`) and mask honestly; returns (server, parties, relays, inputs)."""
    rng = np.random.default_rng(n)
    vectors = [rng.uniform(-1, 1, length) for _ in range(n)]
    server = SecAggServer(config, n, length, 0, SESSION)
    parties = [SecAggParty(config, u, n, 0, SESSION, policy=policy) for u in range(n)]
    for p in parties:
        server.receive_advertise(p.advertise())
    rosters = server.close_advertise()
    for u in range(n):
        if u not in skip_share or u in corrupt:
            server.receive_shares(parties[u].share_keys(rosters[u]))
    relays = server.close_shares()
    inputs = {}
    for u, relay in relays.items():
        inputs[u] = parties[u].contribute(vectors[u], 1).masked_input(relay)
        server.receive_masked_input(inputs[u])
    return server, parties, vectors, inputs


def attack(n: int, config: SecAggConfig, corrupt, lists=None, skip_share=(), policy=None) -> Outcome:
    """Show honest party u the alive list lists[u] (the other sharers as dropped); colluders sign every
    list; each honest signer is handed every signature on its list. `corrupt` may instead be a function of
    the sharers' ring order returning (corrupt, lists): the owner picks both once it knows the coins."""
    server, parties, _, inputs = setup(n, config, set() if callable(corrupt) else corrupt, skip_share, policy)
    sharers = server.sharers
    if callable(corrupt):
        order = sorted(sharers, key=lambda u: ring_position(server._shares[u].coin, SESSION, 0, u))
        corrupt, lists = corrupt(order)
    transcript = server.transcript
    signed, signatures = {}, {}
    for u, alive in lists.items():
        alive = sorted(alive)
        request = ConsistencyRequest(0, SESSION, u, alive, [v for v in sharers if v not in alive],
                                     [inputs[v].view_signature for v in alive])
        try:
            signatures[u] = parties[u].consistency_check(request).signature
        except SecAggError:
            continue
        signed[u] = alive
    replies = {}
    for u, alive in signed.items():
        by = {v: signatures[v] for v, other in signed.items() if other == alive}
        message = crypto.consistency_message(SESSION, 0, alive, transcript)
        by.update({w: crypto.sign(parties[w]._sig_key, message) for w in corrupt if w in alive})
        signers = sorted(by)
        try:
            replies[u] = parties[u].unmask(UnmaskRequest(0, SESSION, u, signers, [by[v] for v in signers]))
        except SecAggError:
            continue
        assert len(signers) >= server.params.min_survivors  # a party reveals only with t signatures
    return Outcome(server, parties, corrupt, sharers, inputs, replies, signed, list(lists.values()))


def known_secrets(out: Outcome) -> tuple[set[int], set[int]]:
    """Honest sharers whose seed, and whose mask key, the owner can rebuild (its colluders hold a share of
    every sharer's secrets)."""
    t = out.server.params.min_survivors
    held = len(out.corrupt & set(out.sharers))
    seeds, keys = {}, {}
    for reply in out.replies.values():
        for v in reply.seed_owners:
            seeds[v] = seeds.get(v, 0) + 1
        for v in reply.key_owners:
            keys[v] = keys.get(v, 0) + 1
    honest = [v for v in out.sharers if v not in out.corrupt]
    return ({v for v in honest if seeds.get(v, 0) + held >= t}, {v for v in honest if keys.get(v, 0) + held >= t})


def smallest_learnable_sum(out: Outcome) -> int | None:
    """The fewest honest inputs in a sum the owner can strip of every mask (None: it learns none).

    A pairwise mask between honest u and v stays secret unless the owner rebuilds u's or v's mask key; a
    self mask goes only with the seed. So the honest sums it learns are exactly the unions of connected
    components of the secret-mask graph whose members' seeds it all has."""
    seeds, keys = known_secrets(out)
    honest = [v for v in out.sharers if v not in out.corrupt]
    graph = out.server.graph
    seen, sizes = set(), []
    for start in honest:
        if start in seen:
            continue
        component, stack = {start}, [start]
        while stack:
            u = stack.pop()
            for v in graph[u]:
                if v in honest and v not in component and u not in keys and v not in keys:
                    component.add(v)
                    stack.append(v)
        seen |= component
        if component <= seeds:
            sizes.append(len(component))
    return min(sizes) if sizes else None


@st.composite
def adversaries(draw):
    """(n, config, corrupt, skip_share, lists) where corrupt parties and the owner's lists are given as
    positions on the graph's ring (resolved once the coins are known), so that runs of consecutive parties,
    the cuts of a sparse ring, are drawn often."""
    graph = draw(st.sampled_from(["complete", "sparse"]))
    n = draw(st.integers(4, 8) if graph == "complete" else st.integers(8, 18))
    config = SecAggConfig(graph=graph, degree=draw(st.sampled_from([None, 2, 4, 4])))
    params = round_params(config, n)
    skip_share = draw(st.sets(st.integers(0, n - 1), max_size=min(2, n - params.min_survivors)))
    m = n - len(skip_share)
    edges: set[int] = set()  # ring positions next to a run of dropped parties: where colluders cut best

    def blocks(limit: int) -> set[int]:
        out: set[int] = set()
        for _ in range(draw(st.sampled_from([0, 1, 2, 2, 3]))):
            start, length = draw(st.integers(0, m - 1)), draw(st.sampled_from([1, 2, 2, 3]))
            out |= {(start + i) % m for i in range(length)}
            edges.update({(start - 1) % m, (start + length) % m, (start + length + 1) % m})
        return set(sorted(out)[:limit])

    # The owner's lists, as ring positions of the parties called dropped: runs of consecutive parties.
    pool = [blocks(m - params.min_survivors) for _ in range(draw(st.sampled_from([1, 1, 2, 3])))]
    choice = [draw(st.integers(0, len(pool) - 1)) for _ in range(n)]
    near = st.sampled_from(sorted(edges)) if edges else st.integers(0, m - 1)
    corrupt = draw(st.sets(st.one_of(near, st.integers(0, m - 1)), max_size=params.collusion))
    return n, config, corrupt, skip_share, pool, choice


@ADVERSARY
@given(adversaries())
def test_no_sum_of_fewer_than_t_minus_c_honest_inputs_is_ever_learned(case):
    """Any dropouts, any alive lists per party, c colluders signing everything: the owner learns no sum
    of fewer than t - c honest inputs (and never one honest update)."""
    n, config, corrupt_at, skip_share, pool, choice = case

    def lists_for(order: list[int]) -> tuple[set[int], dict[int, list[int]]]:
        corrupt = {order[i % len(order)] for i in corrupt_at}
        lists = {}
        for u in order:
            dropped = {order[i] for i in pool[choice[u]]}
            if u not in corrupt and u not in dropped:  # a party called dropped is not asked
                lists[u] = sorted(set(order) - dropped)
        return corrupt, lists

    out = attack(n, config, lists_for, skip_share)
    smallest = smallest_learnable_sum(out)
    event(f"{config.graph}: {'nothing learned' if smallest is None else 'a sum learned'}")
    params = out.server.params
    if any(not is_k_connected(out.server.graph, alive, params.collusion + 1) for alive in out.offered):
        event("offered an alive list that c colluders could split")
    assert smallest is None or smallest >= params.min_honest >= 2
    seeds, keys = known_secrets(out)
    assert not seeds & keys
    # All revealing honest parties hold one and the same alive list.
    assert len({tuple(out.signed[u]) for u in out.replies}) <= 1


def test_double_signing_colluder_cannot_unmask_an_honest_update():
    """The reviewer's attack (n = 5): colluder 4 signs both {0, 1, 4} and {2, 3, 4}. With t = 3 each list
    would reach t and the two honest halves would reveal complementary shares; with the default bound c = 1,
    t = 4 and no honest party signs a list that short, so nothing is revealed."""
    lists = {0: [0, 1, 4], 1: [0, 1, 4], 2: [2, 3, 4], 3: [2, 3, 4]}
    out = attack(5, SecAggConfig(), {4}, lists)
    assert out.server.params.collusion == 1 and out.server.params.min_survivors == 4
    assert out.signed == {} and out.replies == {}
    # Lists long enough to be signed overlap in honest parties, who sign only one: at most one list unmasks.
    lists = {0: [0, 1, 2, 4], 1: [0, 1, 2, 4], 2: [1, 2, 3, 4], 3: [1, 2, 3, 4]}
    out = attack(5, SecAggConfig(), {4}, lists)
    assert set(out.signed) == {0, 1, 2, 3} and out.replies == {}  # 3 signatures per list, t = 4
    assert smallest_learnable_sum(out) is None


def recover_update(out: Outcome, u: int) -> np.ndarray:
    """What the owner computes when it holds t shares of both of u's secrets: u's own update."""
    t, params = out.server.params.min_survivors, out.server.params
    seed = {h: r.seed_shares[r.seed_owners.index(u)] for h, r in out.replies.items() if u in r.seed_owners}
    key = {h: r.key_shares[r.key_owners.index(u)] for h, r in out.replies.items() if u in r.key_owners}
    for w in out.corrupt:  # the colluders' own copies
        seed[w], key[w] = out.parties[w]._held[u]
    seed = dict(sorted(seed.items())[:t])
    key = dict(sorted(key.items())[:t])
    b, sk = shamir.combine(seed), shamir.combine(key)
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    words = unpack(out.inputs[u].masked, params.ring_bytes)
    np.subtract(words, crypto.prg_words(crypto.self_mask_key(b, SESSION, 0, u), words.size), out=words)
    private = X25519PrivateKey.from_private_bytes(sk)
    for v in out.server.graph[u]:
        shared = crypto.agree(private, out.server._keys[v].s_pk, v)
        mask = crypto.prg_words(crypto.pair_mask_key(shared, SESSION, 0, u, v), words.size)
        (np.subtract if u < v else np.add)(words, mask, out=words)
    return decode(words, out.server.config, params)[0]


def test_negative_control_without_a_collusion_bound_one_colluder_recovers_every_honest_update():
    """Same attack, parties that accept c = 0 (t = 3): each honest update comes out on its own. This is the
    flaw the collusion bound closes, and shows the harness above does detect a leak."""
    unsafe = {"policy": PartyPolicy(min_collusion=0)}
    lists = {0: [0, 1, 4], 1: [0, 1, 4], 2: [2, 3, 4], 3: [2, 3, 4]}
    out = attack(5, SecAggConfig(collusion=0), {4}, lists, **unsafe)
    assert set(out.replies) == {0, 1, 2, 3}
    assert smallest_learnable_sum(out) == 1
    rng = np.random.default_rng(5)
    vectors = [rng.uniform(-1, 1, 5) for _ in range(5)]
    for u in range(4):
        np.testing.assert_allclose(recover_update(out, u), vectors[u], atol=2.0 ** -15)


def ring_blocks(server: SecAggServer, blocks: int, size: int) -> set[int]:
    """`blocks` runs of `size` consecutive parties on the ring, spread evenly: what splits a ring graph."""
    order = sorted(server.sharers, key=lambda u: ring_position(server._shares[u].coin, SESSION, 0, u))
    step = len(order) // blocks
    return {order[b * step + i] for b in range(blocks) for i in range(size)}


def test_dropping_blocks_of_the_ring_cannot_isolate_arcs():
    """The reviewer's attack on the sparse graph (25 parties, degree 4): declare two runs of 2 consecutive
    parties dropped, so the ring falls into two arcs, each of which would unmask on its own. The owner's
    own check aborts, and every party refuses to sign such a list."""
    n, config = 25, SecAggConfig(graph="sparse", degree=4, collusion=1)
    server, parties, _, inputs = setup(n, config, set(), policy=ONE_COLLUDER)
    assert server.params.degree == 4 and server.params.collusion == 1
    cut = ring_blocks(server, 2, 2)
    alive = [u for u in server.sharers if u not in cut]
    assert len(alive) >= server.params.min_survivors and not is_k_connected(server.graph, alive, 1)
    for u in alive[:3]:
        request = ConsistencyRequest(0, SESSION, u, alive, sorted(cut), [inputs[v].view_signature for v in alive])
        with pytest.raises(SecAggError, match="can be split"):
            parties[u].consistency_check(request)
    # One block leaves one arc, still 2-connected: one colluder cannot split it, and the parties sign.
    order = sorted(server.sharers, key=lambda u: ring_position(server._shares[u].coin, SESSION, 0, u))
    rest, used = order[2:], set(alive[:3])
    assert is_k_connected(server.graph, rest, 2)
    u = next(v for v in rest if v not in used)
    used.add(u)
    request = ConsistencyRequest(0, SESSION, u, sorted(rest), sorted(order[:2]),
                                 [inputs[v].view_signature for v in sorted(rest)])
    assert parties[u].consistency_check(request).sender == u
    # One more party gone from the middle of the arc leaves a cut vertex: one colluder there splits it.
    rest = sorted(order[2:13] + order[14:])
    assert is_k_connected(server.graph, rest, 1) and not is_k_connected(server.graph, rest, 2)
    u = next(v for v in rest if v not in used)
    request = ConsistencyRequest(0, SESSION, u, rest, sorted([*order[:2], order[13]]),
                                 [inputs[v].view_signature for v in rest])
    with pytest.raises(SecAggError, match="can be split by removing 1"):
        parties[u].consistency_check(request)


def test_honest_server_aborts_a_split_alive_set_before_asking_for_signatures():
    n, config = 25, SecAggConfig(graph="sparse", degree=4, collusion=1)
    rng = np.random.default_rng(0)
    server = SecAggServer(config, n, 3, 0, SESSION)
    parties = [SecAggParty(config, u, n, 0, SESSION, policy=ONE_COLLUDER) for u in range(n)]
    for p in parties:
        server.receive_advertise(p.advertise())
    for u, roster in server.close_advertise().items():
        server.receive_shares(parties[u].share_keys(roster))
    relays = server.close_shares()
    cut = ring_blocks(server, 2, 2)
    for u, relay in relays.items():
        masked = parties[u].contribute(rng.uniform(-1, 1, 3), 1).masked_input(relay)
        if u not in cut:
            server.receive_masked_input(masked)
    with pytest.raises(SecAggError, match="can be split.*nothing was unmasked"):
        server.close_inputs()


def test_the_owner_cannot_lower_the_degree_or_the_collusion_bound_below_the_partys_floor():
    # An owner-chosen degree 2 with no colluders assumed: the party's floor (c >= 2 of 25: 5%, at least one)
    # refuses the round, and so it does c = 1.
    with pytest.raises(SecAggError, match="collusion bound 0 is below this party's floor 2"):
        SecAggParty(SecAggConfig(graph="sparse", degree=2, collusion=0), 0, 25, 0, SESSION)
    with pytest.raises(SecAggError, match="collusion bound 1 is below this party's floor 2"):
        SecAggParty(SecAggConfig(graph="sparse", degree=2, collusion=1), 0, 25, 0, SESSION)
    # By default the owner offers the floor: c = 2, and a degree of 2 is raised to 2c + 2 = 6; a party may
    # demand more.
    assert round_params(SecAggConfig(graph="sparse", degree=2), 25).degree == 6
    with pytest.raises(SecAggError, match="degree 6 is below this party's floor 8"):
        SecAggParty(SecAggConfig(graph="sparse", degree=2), 0, 25, 0, SESSION, policy=PartyPolicy(min_degree=8))
    with pytest.raises(SecAggError, match="only 3 honest inputs"):
        SecAggParty(SecAggConfig(), 0, 5, 0, SESSION, policy=PartyPolicy(min_honest=4))
    # Three parties: one colluder assumed, so all three must stay (t = 3) and a sum holds two honest inputs.
    three = SecAggParty(SecAggConfig(), 0, 3, 0, SESSION).params
    assert (three.collusion, three.min_survivors, three.min_honest) == (1, 3, 2)
    with pytest.raises(SecAggError, match="floor 1"):
        SecAggParty(SecAggConfig(collusion=0), 0, 3, 0, SESSION)
    with pytest.raises(SecAggError, match="fewer than 2 honest"):  # two parties cannot be safe at all
        SecAggParty(SecAggConfig(), 0, 2, 0, SESSION)


def test_a_colluder_at_a_cut_vertex_cannot_isolate_the_arcs():
    """18 parties on a degree-4 ring (c = 1, t = 10): dropping positions 0, 1 and 9 leaves an alive set that
    is connected, but party 10 is a cut vertex. Were it a colluder, its known masks would let the owner
    unmask the two arcs of 7 honest parties each (fewer than t - c = 9). The alive set must stay connected
    without any c parties, so every honest party refuses the list."""
    config = SecAggConfig(graph="sparse", degree=4)

    def lists_for(order):
        dropped = {order[0], order[1], order[9]}
        alive = sorted(set(order) - dropped)
        return {order[10]}, {u: alive for u in order if u not in dropped and u != order[10]}

    out = attack(18, config, lists_for)
    assert out.server.params.min_honest == 9
    order = sorted(out.sharers, key=lambda u: ring_position(out.server._shares[u].coin, SESSION, 0, u))
    alive = out.offered[0]
    assert is_k_connected(out.server.graph, alive, 1)
    assert not is_k_connected(out.server.graph, [u for u in alive if u != order[10]], 1)
    assert out.signed == {} and out.replies == {} and smallest_learnable_sum(out) is None
