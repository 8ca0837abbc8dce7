"""Secure-aggregation building blocks: wire validation, Shamir sharing, the graph, the ring encoding."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.messages import TOKEN_PATTERN
from secure_agg import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    MaskedInput,
    Roster,
    SecAggConfig,
    SecAggError,
    SecAggParty,
    SecAggServer,
    UnmaskRequest,
    message_from_wire,
    round_params,
    shamir,
)
from secure_agg.crypto import context, prg_words
from secure_agg.encoding import decode, encode, pack, unpack
from secure_agg.graph import is_k_connected, neighbour_graph
from secure_agg.identity import ConsortiumRoster, Identity, Member
from secure_agg.messages import MESSAGE_TYPES

FAST = settings(max_examples=40, deadline=None)


def all_messages():
    """Every message type from a real four-party round with one dropout, its members signed by their
    identities."""
    config = SecAggConfig()
    server = SecAggServer(config, 4, 5, 0, "wire")
    identities = [Identity(f"member-{u}", Ed25519PrivateKey.generate()) for u in range(4)]
    peers = ConsortiumRoster(tuple(Member(i.name, f"{u:040d}", i.public) for u, i in enumerate(identities)))
    parties = [SecAggParty(config, u, 4, 0, "wire", identity=identities[u], peers=peers) for u in range(4)]
    out = [p.advertise() for p in parties]
    for m in out:
        server.receive_advertise(m)
    rosters = server.close_advertise()
    out += rosters.values()
    shares = [parties[u].share_keys(rosters[u]) for u in range(4)]
    out += shares
    for s in shares:
        server.receive_shares(s)
    relays = server.close_shares()
    out += relays.values()
    for u in range(3):
        masked = parties[u].contribute(np.linspace(-1, 1, 5), u + 1).masked_input(relays[u])
        ack = server.receive_masked_input(masked)
        parties[u].receive_ack(ack)
        out += [masked, ack]
    checks = server.close_inputs()
    out += checks.values()
    signatures = [parties[u].consistency_check(checks[u]) for u in range(3)]
    out += signatures
    for sig in signatures:
        server.receive_consistency(sig)
    requests = server.close_consistency()
    out += requests.values()
    replies = [parties[u].unmask(requests[u]) for u in range(3)]
    out += replies
    for r in replies:
        server.receive_unmask(r)
    server.finish()
    return out


MESSAGES = all_messages()


def through_json(msg):
    header, arrays = msg.to_wire()
    header = json.loads(json.dumps(header))
    return header, {k: np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape) for k, a in arrays.items()}


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_every_message_survives_json_and_byte_copies():
    kinds = {type(m).__name__ for m in MESSAGES}
    assert len(kinds) == 10
    for msg in MESSAGES:
        header, arrays = through_json(msg)
        assert all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in arrays.values())
        assert same(message_from_wire(header, arrays), msg), type(msg).__name__


def corruptions():
    """(description, function of (header, arrays) -> (header, arrays)) for each way to break a message."""
    def set_header(key, value):
        return lambda h, a: ({**h, key: value}, a)

    def drop_header(key):
        return lambda h, a: ({k: v for k, v in h.items() if k != key}, a)

    def first_array(fn):
        def apply(h, a):
            name = sorted(a)[0]
            return h, {**a, name: fn(a[name])}
        return apply

    return [
        ("wrong type", set_header("type", "secagg.other")),
        ("wrong version", set_header("version", 1)),
        ("extra field", set_header("extra", 1)),
        ("missing field", drop_header("session")),
        ("bool round", set_header("round", True)),
        ("negative round", set_header("round", -1)),
        ("float round", set_header("round", 1.0)),
        ("bad session", set_header("session", "s\u00e9")),
        ("empty session", set_header("session", "")),
        ("array dtype", first_array(lambda x: x.astype(np.int8))),
        ("array shape", first_array(lambda x: np.concatenate([x.reshape(-1), [0]]).astype(np.uint8))),
        ("array missing", lambda h, a: (h, {k: v for k, v in a.items() if k != sorted(a)[0]})),
        ("array extra", lambda h, a: (h, {**a, "zz": np.zeros(1, np.uint8)})),
        ("not an array", first_array(lambda x: x.tobytes())),
    ]


@pytest.mark.parametrize(("what", "corrupt"), corruptions(), ids=[c[0] for c in corruptions()])
def test_from_wire_rejects_corrupted_messages(what, corrupt):
    checked = 0
    for msg in MESSAGES:
        header, arrays = msg.to_wire()
        if what.startswith("array") and not arrays and what != "array extra":
            continue
        if what == "not an array" and not arrays:
            continue
        bad_header, bad_arrays = corrupt(header, arrays)
        with pytest.raises(SecAggError):
            type(msg).from_wire(bad_header, bad_arrays)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("ids", [[2, 1], [1, 1], [-1], [70000], [True], ["1"], "1,2"])
def test_id_lists_must_be_sorted_unique_ints_in_range(ids):
    header, arrays = ConsistencyRequest(0, "s", 1, [0, 1, 2], [], [bytes(64)] * 3).to_wire()
    with pytest.raises(SecAggError):
        ConsistencyRequest.from_wire({**header, "alive": ids}, arrays)
    header, arrays = UnmaskRequest(0, "s", 1, [0, 1, 2], [bytes(64)] * 3).to_wire()
    with pytest.raises(SecAggError):  # a repeated or unsorted signer is refused before any signature check
        UnmaskRequest.from_wire({**header, "signers": ids}, arrays)


def test_consistency_messages_wire_form():
    request = next(m for m in MESSAGES if isinstance(m, UnmaskRequest))
    header, arrays = request.to_wire()
    assert header["type"] == "unmask_request" and set(header) == {"type", "version", "round", "session",
                                                                   "recipient", "signers"}
    assert arrays["signatures"].shape == (len(request.signers), 64) and len(request.signers) == 3
    with pytest.raises(SecAggError, match="signatures"):  # one row per signer
        UnmaskRequest.from_wire(header, {"signatures": arrays["signatures"][:-1]})
    with pytest.raises(SecAggError, match="signatures"):
        UnmaskRequest.from_wire(header, {"signatures": np.zeros((3, 63), np.uint8)})
    signature = next(m for m in MESSAGES if isinstance(m, ConsistencySignature))
    header, arrays = signature.to_wire()
    assert header["type"] == "consistency_signature" and arrays["signature"].shape == (64,)
    with pytest.raises(SecAggError, match="signature"):
        ConsistencySignature.from_wire(header, {"signature": arrays["signature"][:32]})
    check = next(m for m in MESSAGES if isinstance(m, ConsistencyRequest))
    header, arrays = check.to_wire()
    assert header["type"] == "consistency_request" and arrays["view_signatures"].shape == (3, 64)
    assert check.alive == [0, 1, 2] and check.dropped == [3]
    with pytest.raises(SecAggError, match="view_signatures"):  # one view signature per alive party
        ConsistencyRequest.from_wire(header, {"view_signatures": arrays["view_signatures"][:-1]})
    with pytest.raises(SecAggError, match="recipient"):
        ConsistencyRequest.from_wire({**header, "recipient": 1 << 16}, arrays)
    # Every type doubles as the SECAGG message's stage token on the ZeroMQ wire.
    assert all(re.fullmatch(TOKEN_PATTERN, kind) for kind in MESSAGE_TYPES)


def test_masked_input_length_must_match_its_array_and_ring():
    msg = next(m for m in MESSAGES if isinstance(m, MaskedInput))
    header, arrays = msg.to_wire()
    for bad in ({**header, "length": header["length"] + 1}, {**header, "ring_bits": 36},
                {**header, "ring_bits": 48}):
        with pytest.raises(SecAggError):
            MaskedInput.from_wire(bad, arrays)


def test_roster_key_rows_must_match_neighbours_and_members():
    roster = next(m for m in MESSAGES if isinstance(m, Roster))
    header, arrays = roster.to_wire()
    with pytest.raises(SecAggError, match="c_pk"):
        Roster.from_wire(header, {**arrays, "c_pk": arrays["c_pk"][:-1]})
    assert arrays["sig_pk"].shape == (len(roster.members), 32)
    with pytest.raises(SecAggError, match="sig_pk"):
        Roster.from_wire(header, {**arrays, "sig_pk": arrays["sig_pk"][:-1]})


def test_unknown_message_type_and_non_dict_inputs():
    with pytest.raises(SecAggError, match="unknown"):
        message_from_wire({"type": "nope"}, {})
    with pytest.raises(SecAggError):
        AdvertiseKeys.from_wire(["not", "a", "dict"], {})


def is_probable_prime(n: int) -> bool:
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_prime_is_the_smallest_prime_above_2_256():
    assert shamir.PRIME == 2**256 + 297 and is_probable_prime(shamir.PRIME)
    assert not any(is_probable_prime(2**256 + k) for k in range(1, 297, 2))


@FAST
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 20), data=st.data())
def test_any_t_shares_rebuild_the_secret_and_fewer_do_not(secret, n, data):
    holders = sorted(data.draw(st.sets(st.integers(0, 200), min_size=n, max_size=n)))
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, holders, t)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    subset = data.draw(st.permutations(holders))[:t]
    assert shamir.combine({h: shares[h] for h in subset}) == secret
    if t > 1:
        fewer = {h: shares[h] for h in subset[:-1]}
        try:
            assert shamir.combine(fewer) != secret
        except ValueError:
            pass


def test_a_wrong_share_changes_the_result():
    shares = shamir.split(bytes(range(32)), [0, 1, 2], 3)
    shares[1] = (int.from_bytes(shares[1], "big") ^ 1).to_bytes(33, "big")
    try:
        assert shamir.combine(shares) != bytes(range(32))
    except ValueError:
        pass


def coins_for(members, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.bytes(32) for m in members}


@pytest.mark.parametrize(("n", "k"), [(5, 2), (10, 4), (21, 6), (50, 12), (100, 14)])
def test_sparse_graph_is_regular_symmetric_and_follows_the_coins(n, k):
    members = list(range(0, 2 * n, 2))  # ids need not be contiguous
    coins = coins_for(members)
    g = neighbour_graph(coins, k, "sess", 3)
    assert set(g) == set(members)
    for u, ns in g.items():
        assert len(ns) == k and len(set(ns)) == k and u not in ns and set(ns) <= set(members)
        assert all(u in g[v] for v in ns)
    assert g == neighbour_graph(coins, k, "sess", 3)
    assert g != neighbour_graph(coins, k, "sess", 4)
    assert g != neighbour_graph(coins, k, "other", 3)
    assert g != neighbour_graph(coins_for(members, 1), k, "sess", 3)  # other coins, another graph
    # Removing a party only deletes it from the ring: the others keep their order.
    fewer = neighbour_graph({m: c for m, c in coins.items() if m != members[0]}, k, "sess", 3)
    assert set(fewer) == set(members[1:])
    # The Harary graph H(k, n) is k-connected, and not (k + 1)-connected.
    assert is_k_connected(g, members, k) and not is_k_connected(g, members, k + 1)


def test_graph_degree_rules():
    assert neighbour_graph(coins_for([0, 1, 2]), 4, "s", 0) == {0: [1, 2], 1: [0, 2], 2: [0, 1]}
    with pytest.raises(ValueError):
        neighbour_graph(coins_for(range(10)), 3, "s", 0)
    from secure_agg.config import sparse_degree
    assert sparse_degree(SecAggConfig(graph="sparse"), 100) == 14
    # At 100 parties the floor is 5 colluders, so a lower degree is raised to 2c + 2 = 12.
    assert sparse_degree(SecAggConfig(graph="sparse", degree=5), 100) == 12
    assert sparse_degree(SecAggConfig(graph="sparse", degree=2), 20) == 4  # c >= 1 needs 2c + 2
    assert sparse_degree(SecAggConfig(graph="sparse"), 5) == 4
    assert sparse_degree(SecAggConfig(), 100) == 99


def brute_force_connectivity(graph, nodes):
    """Vertex connectivity by trying every removal set (small graphs only)."""
    nodes = sorted(nodes)
    for size in range(len(nodes)):
        for cut in itertools.combinations(nodes, size):
            rest = [u for u in nodes if u not in cut]
            if len(rest) <= 1:
                return size
            seen, stack = {rest[0]}, [rest[0]]
            while stack:
                for v in graph[stack.pop()]:
                    if v in rest and v not in seen:
                        seen.add(v)
                        stack.append(v)
            if len(seen) < len(rest):
                return size
    return len(nodes) - 1


@FAST
@given(n=st.integers(3, 11), data=st.data())
def test_k_connectivity_matches_brute_force(n, data):
    """The flow-based check against trying every cut, on random graphs (sparse rings with holes included)."""
    if data.draw(st.booleans()):
        k = data.draw(st.sampled_from([2, 4, 6]))
        graph = neighbour_graph(coins_for(range(n), data.draw(st.integers(0, 99))), k, "s", 0)
    else:
        edges = data.draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))))
        graph = {u: sorted({b for a, b in edges if a == u and b != u} | {a for a, b in edges if b == u and a != u})
                 for u in range(n)}
    nodes = data.draw(st.sets(st.integers(0, n - 1), min_size=1))
    kappa = brute_force_connectivity(graph, nodes)
    for k in range(1, 5):
        assert is_k_connected(graph, nodes, k) == (kappa >= k and len(nodes) > k)


@FAST
@given(values=st.lists(st.integers(-(2**39) + 1, 2**39 - 1), min_size=1, max_size=50))
def test_pack_unpack_and_signed_decode(values):
    config = SecAggConfig(frac_bits=0)
    params = round_params(config, 3)
    assert params.ring_bits == 24
    big = round_params(SecAggConfig(), 10)
    words = np.array(values + [3, 2], dtype=np.int64).view(np.uint64)
    packed = pack(words, big.ring_bytes)
    assert packed.dtype == np.uint8 and packed.size == words.size * big.ring_bytes
    back = unpack(packed, big.ring_bytes)
    mask = np.uint64((1 << big.ring_bits) - 1)
    np.testing.assert_array_equal(back, words & mask)
    # Masks wrap around; decode still recovers the signed values.
    noise = np.random.default_rng(len(values)).integers(0, 2**63, words.size, dtype=np.uint64)
    total, weight, clipped = decode(unpack(pack(words + noise, big.ring_bytes), big.ring_bytes) - noise,
                                    SecAggConfig(frac_bits=0), big)
    np.testing.assert_array_equal(total, np.array(values, dtype=np.float64))
    assert weight == 3 and clipped == 2


def test_stochastic_rounding_is_unbiased():
    config = SecAggConfig(frac_bits=4)
    params = round_params(config, 3)
    x = np.full(200_000, 0.3)  # 0.3 * 16 = 4.8 levels: 4 or 5
    levels = encode(x, 1, config, params, np.random.default_rng(0))[:-2].view(np.int64)
    assert set(np.unique(levels)) == {4, 5}
    assert abs(levels.mean() / 16 - 0.3) < 0.001
    with pytest.raises(SecAggError, match="1-D float"):
        encode(np.zeros((2, 2)), 1, config, params, np.random.default_rng(0))


def test_encoding_appends_the_weight_and_the_clipped_count():
    config = SecAggConfig(clip=0.5, frac_bits=4)
    params = round_params(config, 3)
    x = np.array([0.1, 0.6, -0.7, 0.5, -0.5, 2.0])  # three beyond the bound; +-0.5 itself is not clipped
    words = encode(x, 3, config, params, np.random.default_rng(0))
    assert words.size == x.size + 2 and int(words[-2]) == 3 and int(words[-1]) == 3
    levels = words[:-2].view(np.int64)
    assert levels[1] == levels[3] == 3 * 8 and levels[5] == 3 * 8 and levels[2] == -3 * 8


def test_prg_streams_are_keyed_and_contexts_unambiguous():
    a, b = prg_words(bytes(32), 1000), prg_words(bytes([1] * 32), 1000)
    assert a.dtype == np.uint64 and a.shape == (1000,)
    np.testing.assert_array_equal(a, prg_words(bytes(32), 1000))
    assert not np.array_equal(a, b)
    contexts = {context(p, s, r, *ids) for p, s, r, ids in itertools.product(
        [b"x", b"xy"], ["s", "s\x00"], [1, 256], [(1, 2), (2, 1), (12,)])}
    assert len(contexts) == 2 * 2 * 2 * 3
