"""Who masks with whom, and whether a set of parties can be split.

The sparse graph is SecAgg+'s Harary graph H(k, m) over the parties that shared keys, laid on a ring in
the order of each party's own coin: position = SHA-256(context, coin), the coin being 32 random bytes the
party committed to when it advertised its keys and revealed only after the roster fixed the members. The
owner thus learns the positions only after it chose the members, and corrupt parties fixed their coins
before seeing the honest ones; afterwards the owner can only delete parties from the ring, as it could by
declaring them dropped.

`is_k_connected` is what makes a dropout pattern harmless: if the graph induced on the parties whose inputs
are summed stays connected after removing any c of them (the colluders), every proper subset of the honest
inputs is tied to the rest by a pairwise mask whose key stays secret, so no subset sum can be isolated.
"""

from __future__ import annotations

import functools
import hashlib
from collections import deque
from collections.abc import Collection, Mapping, Sequence

from secure_agg import crypto


def ring_position(coin: bytes, session: str, round_id: int, party: int) -> bytes:
    return hashlib.sha256(crypto.context(b"graph-position", session, round_id, party) + coin).digest()


def neighbour_graph(coins: Mapping[int, bytes], degree: int, session: str,
                    round_id: int) -> dict[int, list[int]]:
    """Map every party in `coins` to its sorted neighbours; `degree` is even, or >= len(coins) - 1 (complete)."""
    ids = sorted(coins)
    n = len(ids)
    if degree >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    if degree % 2:
        raise ValueError(f"a sparse degree must be even, got {degree}")
    at = sorted(ids, key=lambda u: (ring_position(coins[u], session, round_id, u), u))
    position = {u: i for i, u in enumerate(at)}
    half = degree // 2
    return {u: sorted(at[(position[u] + d) % n] for d in range(-half, half + 1) if d) for u in ids}


def _local_connectivity(adjacent: Mapping[int, set[int]], s: int, t: int, k: int) -> int:
    """Vertex-disjoint s-t paths (s, t not adjacent), counted up to k: unit-capacity max flow on the split
    graph (each vertex v is v_in -> v_out with capacity 1)."""
    cap: dict[tuple[int, int], int] = {}
    arcs: dict[int, list[int]] = {}

    def add(a: int, b: int, c: int) -> None:
        if (a, b) not in cap:
            arcs.setdefault(a, []).append(b)
            arcs.setdefault(b, []).append(a)
            cap[(a, b)] = 0
            cap.setdefault((b, a), 0)
        cap[(a, b)] += c

    big = k + 1
    for v, ns in adjacent.items():
        add(2 * v, 2 * v + 1, big if v in (s, t) else 1)
        for w in ns:
            add(2 * v + 1, 2 * w, big)
    source, sink = 2 * s + 1, 2 * t
    flow = 0
    while flow < k:
        parent = {source: source}
        queue = deque([source])
        while queue and sink not in parent:
            a = queue.popleft()
            for b in arcs[a]:
                if b not in parent and cap[(a, b)] > 0:
                    parent[b] = a
                    queue.append(b)
        if sink not in parent:
            break
        b = sink
        while b != source:
            a = parent[b]
            cap[(a, b)] -= 1
            cap[(b, a)] += 1
            b = a
        flow += 1
    return flow


@functools.lru_cache(maxsize=64)
def _k_connected(edges: tuple[tuple[int, tuple[int, ...]], ...], k: int) -> bool:
    adjacent = {u: set(ns) for u, ns in edges}
    n = len(adjacent)
    if n <= k:
        return False
    if all(len(ns) == n - 1 for ns in adjacent.values()):
        return True
    # Esfahanian-Hakimi: with v of least degree, the connectivity is the least of deg(v), the local
    # connectivities from v to every vertex not adjacent to it, and those between non-adjacent neighbours
    # of v (a minimum cut either misses v, or holds v and separates two of its neighbours).
    v = min(adjacent, key=lambda u: (len(adjacent[u]), u))
    if len(adjacent[v]) < k:
        return False
    pairs = [(v, w) for w in sorted(adjacent) if w != v and w not in adjacent[v]]
    ns = sorted(adjacent[v])
    pairs += [(x, y) for i, x in enumerate(ns) for y in ns[i + 1:] if y not in adjacent[x]]
    return all(_local_connectivity(adjacent, a, b, k) >= k for a, b in pairs)


def is_k_connected(graph: Mapping[int, Sequence[int]], nodes: Collection[int], k: int) -> bool:
    """True iff the subgraph of `graph` induced on `nodes` has more than k vertices and stays connected after
    removing any k - 1 of them (vertex connectivity >= k)."""
    keep = set(nodes)
    edges = tuple((u, tuple(sorted(v for v in graph[u] if v in keep))) for u in sorted(keep))
    if k <= 0:
        return True
    return _k_connected(edges, k)
