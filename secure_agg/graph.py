"""Who masks with whom: the complete graph, or SecAgg+'s Harary graph under a random relabelling.

The relabelling is a public function of (session, round, members), so every party recomputes its own
neighbourhood and the owner cannot hand a victim a neighbourhood of its choosing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def neighbour_graph(members: Sequence[int], degree: int, session: str, round_id: int) -> dict[int, list[int]]:
    """Map every member to its sorted neighbours; `degree` is even, or len(members) - 1 (complete)."""
    ids = sorted(members)
    n = len(ids)
    if degree >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    if degree % 2:
        raise ValueError(f"a sparse degree must be even, got {degree}")
    label = (b"fedbiot-secagg/1/graph\0" + session.encode() + b"\0" + round_id.to_bytes(8, "big")
             + b"".join(u.to_bytes(4, "big") for u in ids))
    digest = hashlib.sha256(label).digest()
    order = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big"))).permutation(n)
    position = {ids[int(order[i])]: i for i in range(n)}
    at = [ids[int(order[i])] for i in range(n)]
    half = degree // 2
    return {u: sorted(at[(position[u] + d) % n] for d in range(-half, half + 1) if d) for u in ids}
