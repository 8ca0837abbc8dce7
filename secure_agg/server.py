"""The owner's side of one round: collects, relays, and unmasks only the sum.

Stages: receive_advertise* -> close_advertise() -> receive_shares* -> close_shares() ->
receive_masked_input* -> close_inputs() -> receive_consistency* -> close_consistency() -> receive_unmask*
-> finish(). The caller decides when a stage closes (all answered, or a timeout); whoever has not answered
by then is treated as dropped:
- lost before sharing keys: left out (nobody masks with it);
- lost after sharing keys: its pairwise masks are removed through its Shamir-shared mask key;
- lost before signing or before the unmask reply: its input stays in the sum, its self mask is rebuilt.
Fewer than the threshold at any closing aborts the round (SecAggError) before anything is unmasked.
A malformed or unexpected message raises SecAggError without changing the round: the caller may treat
its sender as dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secure_agg import crypto, shamir
from secure_agg.config import SecAggConfig, round_params, share_threshold, sparse_degree
from secure_agg.encoding import decode, unpack
from secure_agg.errors import SecAggError
from secure_agg.graph import neighbour_graph
from secure_agg.messages import (
    MAX_LENGTH,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    InputAck,
    MaskedInput,
    RelayedShares,
    Roster,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    check_session,
)

_WHAT = {"seed": "self-mask seed", "key": "mask key"}


@dataclass
class ServerResult:
    """The only thing the owner learns: the weighted sum, the total weight, and who took part."""

    weighted_sum: np.ndarray  # sum over included parties of n_m * clip(x_m), float64
    total_weight: int  # sum of n_m over included parties
    included: list[int]  # parties whose input is in the sum
    dropped: list[int] = field(default_factory=list)  # shared keys, sent no input: masks removed via Shamir
    left_out: list[int] = field(default_factory=list)  # lost before sharing keys (or never advertised)

    def mean(self) -> np.ndarray:
        """FedAvg: the weighted average, divided once."""
        return self.weighted_sum / self.total_weight


class SecAggServer:
    """Owner state for round `round_id` of `session` with `n_parties` invited parties (ids 0..n-1) and input
    vectors of `vector_length` floats."""

    def __init__(self, config: SecAggConfig, n_parties: int, vector_length: int, round_id: int,
                 session: str) -> None:
        self.config = config
        self.params = round_params(config, n_parties)
        if (isinstance(vector_length, bool) or not isinstance(vector_length, int)
                or not 1 <= vector_length < MAX_LENGTH):
            raise SecAggError(f"the vector length must be an int in [1, {MAX_LENGTH}), got {vector_length!r}")
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
            raise SecAggError(f"the round id must be a non-negative int, got {round_id!r}")
        self.n_parties, self.length, self.round_id = n_parties, vector_length + 1, round_id
        self.session = check_session(session)
        self.stage = "advertise"
        self._keys: dict[int, AdvertiseKeys] = {}
        self.members: list[int] = []  # U1: advertised keys
        self.sharers: list[int] = []  # U2: shared keys (and kept enough sharing neighbours)
        self.alive: list[int] = []  # U3: sent a masked input
        self.signers: list[int] = []  # signed U3 in the consistency check
        self.responders: list[int] = []  # U4: answered the unmask request
        self.graph: dict[int, list[int]] = {}
        self.share_threshold = 0
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ciphertext
        self._sum = np.zeros(self.length, dtype=np.uint64)
        self._inputs: set[int] = set()
        self._replies: dict[int, UnmaskShares] = {}
        self._sharer_set: set[int] = set()
        self._signatures: dict[int, bytes] = {}

    # -- helpers ---------------------------------------------------------------------------------------

    def _abort(self, reason: str) -> SecAggError:
        self.stage = "aborted"
        self._sum = np.zeros(0, dtype=np.uint64)
        self._replies.clear()
        return SecAggError(f"secure aggregation round {self.round_id} aborted: {reason}; nothing was "
                           "unmasked")

    def _expect(self, stage: str, msg: Any, sender: int, allowed: Container[int]) -> None:
        if self.stage != stage:
            raise SecAggError(f"the owner is in stage {self.stage!r}, not accepting a {msg.TYPE}")
        if msg.round_id != self.round_id or msg.session != self.session:
            raise SecAggError(f"a {msg.TYPE} for round {msg.round_id} of session {msg.session!r} arrived in "
                              f"round {self.round_id} of {self.session!r} (replay?)")
        if sender not in allowed:
            raise SecAggError(f"party {sender} may not send a {msg.TYPE} now")

    def _need(self, count: int, what: str) -> None:
        if count < self.params.min_survivors:
            raise self._abort(f"only {count} parties {what}, below the threshold {self.params.min_survivors}")

    # -- stage 1: keys ---------------------------------------------------------------------------------

    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        self._expect("advertise", msg, msg.sender, range(self.n_parties))
        if msg.sender in self._keys:
            raise SecAggError(f"party {msg.sender} advertised keys twice")
        self._keys[msg.sender] = msg

    def close_advertise(self) -> dict[int, Roster]:
        """Fix the members (U1) and the neighbour graph; one roster per member."""
        if self.stage != "advertise":
            raise SecAggError(f"close_advertise in stage {self.stage!r}")
        members = sorted(self._keys)
        self._need(len(members), "advertised keys")
        all_keys = [k for m in members for k in (self._keys[m].c_pk, self._keys[m].s_pk, self._keys[m].sig_pk)]
        if len(set(all_keys)) != len(all_keys):
            raise self._abort("two parties advertised the same public key")
        degree = sparse_degree(self.config, len(members))
        self.share_threshold = share_threshold(self.config, self.params, len(members), degree)
        self.graph = neighbour_graph(members, degree, self.session, self.round_id)
        self.members = members
        self.stage = "shares"
        return {u: Roster(self.round_id, self.session, u, self.n_parties, members, self.params.min_survivors,
                          self.share_threshold, degree, self.params.ring_bits, self.graph[u],
                          [self._keys[v].c_pk for v in self.graph[u]],
                          [self._keys[v].s_pk for v in self.graph[u]],
                          [self._keys[v].sig_pk for v in members])
                for u in members}

    # -- stage 2: encrypted shares ---------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        self._expect("shares", msg, msg.sender, self.members)
        if msg.sender in self._ciphertexts:
            raise SecAggError(f"party {msg.sender} shared keys twice")
        if msg.receivers != self.graph[msg.sender]:
            raise SecAggError(f"party {msg.sender} addressed shares to {msg.receivers}, not to its "
                              f"neighbours {self.graph[msg.sender]}")
        self._ciphertexts[msg.sender] = dict(zip(msg.receivers, msg.ciphertexts, strict=True))

    def close_shares(self) -> dict[int, RelayedShares]:
        """Fix U2 and relay to each sharer the ciphertexts its sharing neighbours addressed to it.

        A sharer with fewer than t - 1 sharing neighbours could not have its secrets rebuilt, so it is left
        out (repeatedly, since leaving one out can starve another).
        """
        if self.stage != "shares":
            raise SecAggError(f"close_shares in stage {self.stage!r}")
        sharers = set(self._ciphertexts)
        self._need(len(sharers), "shared keys")
        while True:
            starved = {u for u in sharers if len(set(self.graph[u]) & sharers) + 1 < self.share_threshold}
            if not starved:
                break
            sharers -= starved
        self._need(len(sharers), "kept enough sharing neighbours")
        self.sharers = sorted(sharers)
        self._sharer_set = sharers
        self.stage = "inputs"
        relays = {}
        for v in self.sharers:
            senders = [u for u in self.graph[v] if u in sharers]
            relays[v] = RelayedShares(self.round_id, self.session, v, senders,
                                      [self._ciphertexts[u][v] for u in senders])
        self._ciphertexts.clear()
        return relays

    # -- stage 3: masked inputs ------------------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> InputAck:
        """Add the masked vector into the running sum (nothing else is kept) and acknowledge its digest."""
        self._expect("inputs", msg, msg.sender, self.sharers)
        if msg.sender in self._inputs:
            raise SecAggError(f"party {msg.sender} sent its masked input twice")
        if msg.length != self.length or msg.ring_bits != self.params.ring_bits:
            raise SecAggError(f"party {msg.sender} sent {msg.length} elements of {msg.ring_bits} bits, "
                              f"expected {self.length} of {self.params.ring_bits}")
        np.add(self._sum, unpack(msg.masked, self.params.ring_bytes), out=self._sum)
        self._inputs.add(msg.sender)
        return InputAck(self.round_id, self.session, msg.sender, hashlib.sha256(msg.masked.data).digest())

    def _holders(self, u: int) -> set[int]:
        """Parties holding shares of u's secrets: u and its neighbours that shared keys."""
        return {v for v in self.graph[u] if v in self._sharer_set} | {u}

    def close_inputs(self) -> dict[int, ConsistencyRequest]:
        """Fix U3; ask every alive party to sign it, unless some secret could not be rebuilt anyway."""
        if self.stage != "inputs":
            raise SecAggError(f"close_inputs in stage {self.stage!r}")
        self._need(len(self._inputs), "sent masked inputs")
        alive = self._inputs
        for u in self.sharers:
            live = len(self._holders(u) & alive)
            if live < self.share_threshold:
                raise self._abort(f"the shares of party {u} are held by only {live} live parties, below "
                                  f"{self.share_threshold}")
        self.alive = sorted(alive)
        dropped = [u for u in self.sharers if u not in alive]
        self.stage = "consistency"
        return {v: ConsistencyRequest(self.round_id, self.session, v, self.alive, dropped) for v in self.alive}

    # -- stage 4: consistency check --------------------------------------------------------------------

    def receive_consistency(self, msg: ConsistencySignature) -> None:
        """Keep a valid signature over U3; refuse a bad one here, since it would make every party refuse."""
        self._expect("consistency", msg, msg.sender, self._inputs)
        if msg.sender in self._signatures:
            raise SecAggError(f"party {msg.sender} signed the alive list twice")
        message = crypto.consistency_message(self.session, self.round_id, self.alive)
        if not crypto.verify(self._keys[msg.sender].sig_pk, msg.signature, message):
            raise SecAggError(f"party {msg.sender}'s consistency signature is invalid")
        self._signatures[msg.sender] = msg.signature

    def close_consistency(self) -> dict[int, UnmaskRequest]:
        """Fix the signers; send each the signatures, unless too few signed or some secret would lack shares."""
        if self.stage != "consistency":
            raise SecAggError(f"close_consistency in stage {self.stage!r}")
        signers = sorted(self._signatures)
        self._need(len(signers), "signed the alive list")
        signer_set = set(signers)
        for u in self.sharers:  # each needs t shares: its seed if alive, its mask key if dropped
            live = len(self._holders(u) & signer_set)
            if live < self.share_threshold:
                raise self._abort(f"the shares of party {u} are held by only {live} signers, below "
                                  f"{self.share_threshold}")
        self.signers = signers
        self.stage = "unmask"
        signatures = [self._signatures[v] for v in signers]
        return {v: UnmaskRequest(self.round_id, self.session, v, signers, signatures) for v in signers}

    # -- stage 5: unmasking ----------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskShares) -> None:
        self._expect("unmask", msg, msg.sender, self.signers)
        if msg.sender in self._replies:
            raise SecAggError(f"party {msg.sender} answered the unmask request twice")
        held = self._holders(msg.sender)  # whose shares it holds: the relation is symmetric
        seeds = sorted(v for v in held if v in self._inputs)
        keys = sorted(v for v in held if v not in self._inputs)
        if msg.seed_owners != seeds or msg.key_owners != keys:
            raise SecAggError(f"party {msg.sender} revealed seed shares of {msg.seed_owners} and key shares "
                              f"of {msg.key_owners}; the request called for {seeds} and {keys}")
        self._replies[msg.sender] = msg

    def finish(self) -> ServerResult:
        """Rebuild every needed secret, check it, remove the masks and decode the sum."""
        if self.stage != "unmask":
            raise SecAggError(f"finish in stage {self.stage!r}")
        responders = sorted(self._replies)
        self._need(len(responders), "answered the unmask request")
        t = self.share_threshold
        dropped = [u for u in self.sharers if u not in self._inputs]
        plan: dict[tuple[str, int], dict[int, bytes]] = {}
        for h in responders:
            reply = self._replies[h]
            for owner, share in zip(reply.seed_owners, reply.seed_shares, strict=True):
                plan.setdefault(("seed", owner), {})[h] = share
            for owner, share in zip(reply.key_owners, reply.key_shares, strict=True):
                plan.setdefault(("key", owner), {})[h] = share
        needed = [("seed", u) for u in self.alive] + [("key", d) for d in dropped]
        for kind, owner in needed:
            got = len(plan.get((kind, owner), {}))
            if got < t:
                raise self._abort(f"only {got} shares of party {owner}'s {_WHAT[kind]} arrived, {t} are "
                                  "needed")
        coeff_cache: dict[tuple[int, ...], list[int]] = {}
        secrets: dict[tuple[str, int], bytes] = {}
        for kind, owner in needed:
            shares = plan[(kind, owner)]
            chosen = tuple(sorted(shares)[:t])
            if chosen not in coeff_cache:
                coeff_cache[chosen] = shamir.lagrange_at_zero(chosen)
            try:
                secret = shamir.combine({h: shares[h] for h in chosen}, coeff_cache[chosen])
            except ValueError as exc:
                raise self._abort(f"the shares of party {owner} are invalid ({exc}): a share was tampered "
                                  "with") from exc
            if kind == "seed":
                commit = crypto.seed_commitment(secret, self.session, self.round_id, owner)
                ok = commit == self._keys[owner].seed_commit
            else:
                ok = crypto.public_of(secret) == self._keys[owner].s_pk
            if not ok:
                raise self._abort(f"the rebuilt {_WHAT[kind]} of party {owner} does not match what it "
                                  "committed to: a share was tampered with")
            secrets[(kind, owner)] = secret

        total = self._sum
        for u in self.alive:
            key = crypto.self_mask_key(secrets[("seed", u)], self.session, self.round_id, u)
            np.subtract(total, crypto.prg_words(key, self.length), out=total)
        alive = set(self.alive)
        for d in dropped:
            private = X25519PrivateKey.from_private_bytes(secrets[("key", d)])
            for v in self.graph[d]:
                if v not in alive:
                    continue
                shared = crypto.agree(private, self._keys[v].s_pk, v)
                key = crypto.pair_mask_key(shared, self.session, self.round_id, d, v)
                mask = crypto.prg_words(key, self.length)
                # v added +mask if v < d, -mask if v > d: undo it.
                (np.subtract if v < d else np.add)(total, mask, out=total)
        weighted_sum, total_weight = decode(total, self.config, self.params)
        self.responders = responders
        self.stage = "done"
        self._sum = np.zeros(0, dtype=np.uint64)
        left_out = [u for u in range(self.n_parties) if u not in set(self.sharers)]
        return ServerResult(weighted_sum, total_weight, list(self.alive), dropped, left_out)
